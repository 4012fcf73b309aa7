"""A small, resumable training loop shared by Steps 1-3.

A step runs either ``epochs`` whole epochs or, with ``iterations`` set, exactly that many optimiser steps
(``ceil(iterations / steps_per_epoch)`` epochs, stopping inside the last one). The loop owns the epoch/step
bookkeeping, the progress bar (loss and throughput), atomic checkpoints every N optimiser steps, at every epoch
end and at the stop, exact resume (module, optimiser and RNG states, position inside the epoch as a sample offset),
resume with another number of processes, and the optional interruption used by the tests. Only rank 0 writes
checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from tqdm import tqdm

from .distributed import DistContext, barrier
from .features import FeatureSource
from .utils import atomic_torch_save

log = logging.getLogger(__name__)


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed (unreadable, of another step, or lacking state); names the file."""


class TrainingInterrupted(RuntimeError):
    """Raised after ``stop_after`` steps (tests and time-boxed runs); the checkpoint is on disk."""


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> Any: ...


@dataclass
class LoopSpec:
    name: str
    source: FeatureSource
    epochs: int
    batch_size: int
    seed: int
    checkpoint: Path
    checkpoint_every: int = 100
    progress: bool = True
    ctx: DistContext | None = None
    fingerprint: dict | None = None  # what the step depends on; written beside each checkpoint
    iterations: int | None = None  # optimiser steps to run in all; None = ``epochs`` whole epochs


def planned_epochs(spec: LoopSpec, steps_per_epoch: int) -> int:
    """Epochs the step visits: ``spec.epochs``, or ``ceil(iterations / steps_per_epoch)`` with ``iterations``."""
    if spec.iterations is None:
        return spec.epochs
    return math.ceil(spec.iterations / max(1, steps_per_epoch))


def _rng_state() -> dict:
    """This process's torch RNG state (CPU, and the current CUDA device when CUDA is in use)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per visible device
            dev = torch.cuda.current_device()
            if dev >= len(cuda):
                return
            cuda = cuda[dev]
        torch.cuda.set_rng_state(cuda)


_NAME_SALT = {"step1": 1, "step2": 2, "step3": 3}


def reseed_for_rank(seed: int, name: str, global_step: int, rank: int) -> None:
    """Seed torch (CPU and CUDA) from (seed, loop name, global step, rank).

    Used when a checkpoint is resumed with a different number of processes: the saved per-rank
    streams no longer map onto the ranks, so each rank gets a fresh stream that is still
    reproducible and different on every rank.
    """
    from .distributed import rank_seed

    torch.manual_seed(rank_seed(seed, _NAME_SALT.get(name, 97), global_step, rank))


def _optimizers(obj: Any) -> list[torch.optim.Optimizer]:
    """Optimisers held by a stateful object (directly or in a ``_ModuleState``-like ``objs`` dict)."""
    if isinstance(obj, torch.optim.Optimizer):
        return [obj]
    objs = getattr(obj, "objs", None)
    if isinstance(objs, dict):
        return [v for v in objs.values() if isinstance(v, torch.optim.Optimizer)]
    return []


def _rng_neutral(batches: Iterable[Any]) -> Iterator[Any]:
    """Yield from ``batches`` leaving the torch CPU RNG as it was. A data loader draws its base seed from that RNG
    when its iterator starts (every epoch of an uncached feature source, and again after a resume, at another
    point of the stream), so without this a resumed run would differ from an uninterrupted one."""
    it = iter(batches)
    while True:
        rng = torch.get_rng_state()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(rng)
        yield item


def _resume(spec: LoopSpec, state: dict[str, Stateful], ctx: DistContext) -> tuple[int, int, int]:
    """Load ``spec.checkpoint`` into ``state`` and the RNG (see the resume rule of :func:`run_loop`); returns
    ``(epoch, sample offset, global step)``, ``(0, 0, 0)`` without a checkpoint."""
    if not spec.checkpoint.exists():
        return 0, 0, 0
    try:
        ck = torch.load(spec.checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign, or holding Python objects
        raise ResumeError(f"{spec.checkpoint}: cannot read this checkpoint ({type(exc).__name__}); "
                          f"delete it to restart this step") from exc
    if ck.get("name") != spec.name:
        raise ResumeError(f"{spec.checkpoint}: checkpoint of '{ck.get('name')}', expected '{spec.name}'")
    for key in state:
        if key not in ck.get("state", {}):
            raise ResumeError(f"{spec.checkpoint}: no state for '{key}' (has {sorted(ck.get('state', {}))})")
    saved_world = int(ck.get("world_size", 1))
    lrs = {key: [[g["lr"] for g in o.param_groups] for o in _optimizers(obj)] for key, obj in state.items()}
    for key, obj in state.items():
        try:
            obj.load_state_dict(ck["state"][key])
        except KeyError as exc:
            raise ResumeError(f"{spec.checkpoint}: cannot resume '{key}': {exc.args[0] if exc.args else exc}; "
                              f"delete the checkpoint to restart this step") from exc
    epoch, global_step = int(ck["epoch"]), int(ck["global_step"])
    if "offset" in ck:
        offset = int(ck["offset"])
    else:  # older checkpoints: steps of the saving world
        offset = int(ck["step"]) * int(ck.get("batch_size", spec.batch_size)) * saved_world
    if saved_world == ctx.world_size and ctx.rank in ck["rng"]:
        _set_rng_state(ck["rng"][ctx.rank])
    else:
        for key, obj in state.items():  # keep the learning rates built for this world size
            for o, groups in zip(_optimizers(obj), lrs[key]):
                for g, lr in zip(o.param_groups, groups):
                    g["lr"] = lr
        reseed_for_rank(spec.seed, spec.name, global_step, ctx.rank)
    log.info("%s: resumed from %s at epoch %d, sample %d (written by %d process(es), now %d)",
             spec.name, spec.checkpoint, epoch, offset, saved_world, ctx.world_size)
    return epoch, offset, global_step


def run_loop(
    spec: LoopSpec,
    step_fn: Callable[[torch.Tensor, torch.Tensor, int, int], dict[str, float]],
    state: dict[str, Stateful],
    *,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run ``step_fn(features, indices, epoch, global_step) -> stats`` over ``spec.epochs`` epochs, or for
    exactly ``spec.iterations`` optimiser steps when that is set.

    ``global_step`` is the number of steps done before this one (restored on resume). With ``iterations`` the
    run goes through the epochs' seeded orders as usual and stops after global step ``iterations``, inside the
    last epoch (``ceil(iterations / steps_per_epoch)`` epochs), with a checkpoint at the stop; a resumed run ends
    at the same global step, and a checkpoint that has reached it runs no further step.

    A step is one *global* batch of ``batch_size x world_size`` samples (each rank gets its
    contiguous block of ``batch_size``). Resumes from ``spec.checkpoint`` if it exists.

    Checkpoints are written by rank 0 only and hold the epoch, the position inside the epoch as
    a **sample offset** into the epoch's seeded order (:func:`causeseg.features.epoch_order`),
    the global step, the world size and batch size that wrote them, the state of every object in
    ``state`` and the torch RNG state of every rank.

    Resume rule:

    * same world size: exact -- every rank gets back its own RNG state, and training continues
      with the same global batches as an uninterrupted run;
    * different world size (or batch size): the run continues at the same sample offset of the
      same epoch order; the remaining samples of that epoch are cut into global batches of the
      new size (the incomplete last one is dropped as usual). The model, optimiser, bank and
      generator states are restored as saved; the optimisers keep the learning rate they were
      built with now (so ``run.lr_scaling=linear`` follows the new world size); each rank's torch
      RNG is reseeded by :func:`reseed_for_rank` (seed, name, global step, rank). The result is
      reproducible but differs from an uninterrupted run by the batch composition after the
      resume point, as any change of the global batch size does.

    Returns a summary (steps, mean loss of the last epoch over all ranks, seconds, images per
    second).
    """
    from .distributed import all_gather_object, check_shared_dir

    ctx = spec.ctx or DistContext()
    check_shared_dir(spec.checkpoint.parent, "checkpoint directory")
    per_step = spec.batch_size * ctx.world_size
    epoch, offset, global_step = _resume(spec, state, ctx)

    steps_per_epoch = spec.source.steps_per_epoch(spec.batch_size, ctx)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{spec.name}: the dataset has {spec.source.n} items, fewer than one batch of "
            f"{spec.batch_size} x {ctx.world_size} process(es); lower the batch size"
        )

    def save(ep: int, off: int) -> None:
        rngs = dict(enumerate(all_gather_object(_rng_state()))) if ctx.enabled else {ctx.rank: _rng_state()}
        if ctx.is_main:
            if spec.fingerprint is not None:
                from .provenance import write_sidecar

                write_sidecar(spec.checkpoint, spec.fingerprint)
            atomic_torch_save(
                {
                    "name": spec.name,
                    "epoch": ep,
                    "offset": off,
                    "step": off // per_step,
                    "global_step": global_step,
                    "world_size": ctx.world_size,
                    "batch_size": spec.batch_size,
                    "state": {k: v.state_dict() for k, v in state.items()},
                    "rng": rngs,
                },
                spec.checkpoint,
            )
        barrier()

    t0 = time.perf_counter()
    images = 0
    losses: list[float] = []
    n_epochs = planned_epochs(spec, steps_per_epoch)
    if spec.iterations is None:
        total, initial = spec.epochs * steps_per_epoch, epoch * steps_per_epoch + offset // per_step
    else:
        total, initial = spec.iterations, global_step
    bar = tqdm(total=total, initial=min(initial, total), desc=spec.name,
               disable=not (spec.progress and ctx.is_main), unit="it")
    steps_done = 0
    # with iterations the end is a global step, so that a resume with another world size (steps per epoch) ends on time
    while (epoch < spec.epochs) if spec.iterations is None else (global_step < spec.iterations):
        losses = []
        n_steps = spec.source.steps_per_epoch(spec.batch_size, ctx, offset)
        batches = _rng_neutral(spec.source.batches(spec.batch_size, epoch, spec.seed, offset=offset, ctx=ctx))
        stop_inside = False
        for i, (_, feats, idx) in enumerate(batches):
            stats = step_fn(feats, idx, epoch, global_step)
            global_step += 1
            steps_done += 1
            images += feats.shape[0] * ctx.world_size
            losses.append(float(stats.get("loss", float("nan"))))
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            done = offset + (i + 1) * per_step
            last = i + 1 >= n_steps
            stop_inside = spec.iterations is not None and global_step >= spec.iterations and not last
            if stop_after is not None and steps_done >= stop_after:
                save(epoch, done) if not last else save(epoch + 1, 0)
                bar.close()
                raise TrainingInterrupted(f"{spec.name}: stopped after {steps_done} steps (checkpoint saved)")
            if stop_inside:  # the last iteration falls inside this epoch: checkpoint the position and stop
                save(epoch, done)
                break
            if spec.checkpoint_every and global_step % spec.checkpoint_every == 0 and not last:
                save(epoch, done)
        if not stop_inside:
            epoch += 1
            offset = 0
            save(epoch, 0)
        if ctx.is_main and losses:
            elapsed = time.perf_counter() - t0
            where = f"epoch {epoch}/{n_epochs}" if not stop_inside else f"epoch {epoch + 1}/{n_epochs} (stopped inside)"
            log.info("%s: %s: mean loss %.5f over %d steps; %.1f s so far (%.1f img/s)", spec.name, where,
                     sum(losses) / len(losses), len(losses), elapsed, images / max(elapsed, 1e-9))
    bar.close()
    elapsed = time.perf_counter() - t0
    last_loss = sum(losses) / len(losses) if losses else None
    if ctx.enabled:
        vals = [v for v in all_gather_object(last_loss) if v is not None]
        last_loss = sum(vals) / len(vals) if vals else None
    return {
        "steps": global_step,
        "last_epoch_loss": last_loss,
        "seconds": elapsed,
        "images_per_second": images / elapsed if elapsed > 0 else None,
    }
