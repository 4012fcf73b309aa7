"""A small, resumable training loop shared by Steps 1-3.

It owns the epoch/step bookkeeping, the progress bar (loss and throughput), atomic checkpoints
every N optimiser steps and at every epoch end, exact resume (module, optimiser and RNG states,
position inside the epoch) and the optional interruption used by the tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from tqdm import tqdm

from .distributed import DistContext, barrier
from .features import FeatureSource
from .utils import atomic_torch_save

log = logging.getLogger(__name__)


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_loop(
    spec: LoopSpec,
    step_fn: Callable[[torch.Tensor, torch.Tensor, int], dict[str, float]],
    state: dict[str, Stateful],
    *,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run ``step_fn(features, indices, epoch) -> stats`` over ``spec.epochs`` epochs.

    Resumes from ``spec.checkpoint`` if it exists. Returns a summary (steps, mean loss of the
    last epoch, seconds, images per second).
    """
    ctx = spec.ctx or DistContext()
    epoch, start, global_step = 0, 0, 0
    if spec.checkpoint.exists():
        ck = torch.load(spec.checkpoint, map_location="cpu", weights_only=False)
        if ck.get("name") != spec.name:
            raise RuntimeError(f"{spec.checkpoint}: checkpoint of '{ck.get('name')}', expected '{spec.name}'")
        for key, obj in state.items():
            if key not in ck["state"]:
                raise RuntimeError(f"{spec.checkpoint}: no state for '{key}' (has {sorted(ck['state'])})")
            obj.load_state_dict(ck["state"][key])
        epoch, start, global_step = ck["epoch"], ck["step"], ck["global_step"]
        rng = ck["rng"].get(ctx.rank, ck["rng"].get(0))
        _set_rng_state(rng)
        log.info("%s: resumed from %s at epoch %d step %d", spec.name, spec.checkpoint, epoch, start)

    steps_per_epoch = spec.source.steps_per_epoch(spec.batch_size, ctx)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{spec.name}: the dataset has {spec.source.n} items, fewer than one batch of "
            f"{spec.batch_size} x {ctx.world_size} process(es); lower the batch size"
        )

    def save(ep: int, st: int) -> None:
        # every rank's RNG state is kept so a resume with the same world size is exact
        from .distributed import current

        rngs = {ctx.rank: _rng_state()}
        if current().enabled:
            import torch.distributed as dist

            gathered: list = [None] * ctx.world_size
            dist.all_gather_object(gathered, _rng_state())
            rngs = dict(enumerate(gathered))
        if ctx.is_main:
            atomic_torch_save(
                {
                    "name": spec.name,
                    "epoch": ep,
                    "step": st,
                    "global_step": global_step,
                    "world_size": ctx.world_size,
                    "state": {k: v.state_dict() for k, v in state.items()},
                    "rng": rngs,
                },
                spec.checkpoint,
            )
        barrier()

    t0 = time.perf_counter()
    images = 0
    losses: list[float] = []
    total = spec.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=min(epoch * steps_per_epoch + start, total), desc=spec.name,
               disable=not (spec.progress and ctx.is_main), unit="it")
    steps_done = 0
    while epoch < spec.epochs:
        losses = []
        for step, feats, idx in spec.source.batches(spec.batch_size, epoch, spec.seed, start=start, ctx=ctx):
            stats = step_fn(feats, idx, epoch)
            global_step += 1
            steps_done += 1
            images += feats.shape[0] * ctx.world_size
            losses.append(float(stats.get("loss", float("nan"))))
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images / max(elapsed, 1e-9):.1f}")
            bar.update(1)
            if spec.checkpoint_every and global_step % spec.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                save(epoch, step + 1)
            if stop_after is not None and steps_done >= stop_after:
                save(epoch, step + 1) if step + 1 < steps_per_epoch else save(epoch + 1, 0)
                bar.close()
                raise TrainingInterrupted(f"{spec.name}: stopped after {steps_done} steps (checkpoint saved)")
        epoch += 1
        start = 0
        save(epoch, 0)
    bar.close()
    elapsed = time.perf_counter() - t0
    return {
        "steps": global_step,
        "last_epoch_loss": sum(losses) / max(len(losses), 1) if losses else None,
        "seconds": elapsed,
        "images_per_second": images / elapsed if elapsed > 0 else None,
    }
