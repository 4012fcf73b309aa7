"""torch.distributed helpers (``torchrun``): context, gathers, reductions and seeding.

Everything degrades to a no-op in a single process, so the training code calls these helpers
unconditionally. The CPU path uses the gloo backend, the GPU path NCCL. Collectives that the
helpers create themselves (counts, flags) live on :func:`comm_device`, so they work with both
backends; tensors passed in by the caller must already be on a device the backend accepts
(CUDA for NCCL).

Data-parallel training here does not wrap modules in ``DistributedDataParallel``: every rank
runs the same step on its share of the global batch and calls :func:`average_gradients` after
``backward`` (one flat all-reduce of all gradients, divided by the world size). Together with
identical initialisation on every rank this keeps the parameters, the EMA teacher and the
optimiser states identical on all ranks, exactly as DDP would.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    """Rank, world size and local rank of this process (``DistContext()`` = single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Backend: NCCL when CUDA is available and ``device`` is ``auto``/``cuda`` (each process then
    uses GPU ``LOCAL_RANK``), gloo otherwise. Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` as set by ``torchrun`` (``env://`` initialisation).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} is set but RANK is not: launch with torchrun")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistContext(rank=rank, world_size=world, local_rank=local)


def current() -> DistContext:
    """The context of the initialised process group (or a single-process context)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def comm_device() -> torch.device:
    """Where helper-made tensors for collectives live: the current CUDA device for NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``t`` from every rank along ``dim`` in rank order (equal shapes; no gradient)."""
    ctx = current()
    if not ctx.enabled:
        return t
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=dim)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``t``."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``t`` from rank ``src``; returns ``t``."""
    if current().enabled:
        dist.broadcast(t, src=src)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``obj`` on every rank."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    ctx = current()
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def global_mean_factor(count: int | float) -> float:
    """Weight turning a rank's local mean into its share of the exact global mean.

    A rank whose loss is ``S_r / n_r`` (the mean of its ``n_r`` terms) multiplies it by
    ``W * n_r / sum_r n_r`` before ``backward``; :func:`average_gradients` then divides the
    summed gradients by ``W``, which yields the gradient of ``sum_r S_r / sum_r n_r`` -- the loss
    a single process would compute on the combined batch. Without it the result is the mean of
    the per-rank means, which differs whenever ranks have different numbers of terms.
    Returns ``0.0`` when no rank has a term, ``1.0`` in a single process.
    """
    ctx = current()
    if not ctx.enabled:
        return 1.0
    total = torch.tensor([float(count)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    tot = float(total.item())
    return ctx.world_size * float(count) / tot if tot > 0 else 0.0


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce and average the gradients of ``params`` over ranks (used instead of DDP).

    Call after ``backward`` and before gradient clipping, ``GradScaler.unscale_`` and the
    optimiser step. A parameter that has a gradient on some ranks but not on others gets a zero
    gradient on the others first (so every rank reduces the same buffer and applies the same
    update); a parameter without a gradient on every rank keeps ``grad = None``.
    """
    ctx = current()
    if not ctx.enabled:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm_device())
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).to(device=dev, dtype=torch.float32) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def shard_indices(indices: torch.Tensor, ctx: DistContext, batch_size: int) -> torch.Tensor:
    """The rank's share of a global order, cut so every rank gets the same number of full batches.

    Global batch ``g`` consists of ``indices[g*B*W:(g+1)*B*W]``; rank ``r`` takes the ``r``-th
    contiguous block of ``B`` of it, so the concatenation of the ranks' batches of one step, in
    rank order, is exactly the global batch a single process would see with batch size ``B*W``.
    The incomplete last global batch is dropped. With one process this is ``indices`` cut to
    full batches.
    """
    if batch_size < 1:
        raise ValueError(f"shard_indices: batch_size must be >= 1, got {batch_size}")
    per_step = batch_size * ctx.world_size
    steps = len(indices) // per_step
    idx = indices[: steps * per_step].view(steps, ctx.world_size, batch_size)
    return idx[:, ctx.rank].reshape(-1)


def rank_seed(seed: int, *parts: int) -> int:
    """A deterministic 63-bit seed from ``seed`` and integers (stage salt, step, rank, ...).

    SplitMix64 mixing, so nearby inputs give unrelated seeds.
    """
    mask = (1 << 64) - 1
    x = int(seed) & mask
    for p in parts:
        x = (x ^ (int(p) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x & ((1 << 63) - 1)


def check_shared_dir(path: str | os.PathLike, what: str = "run directory") -> None:
    """Raise on every rank unless ``path`` is the same (shared) directory on all ranks.

    Rank 0 creates ``path`` and a marker file in it; every rank looks for the marker. Only rank
    0 writes artifacts and checkpoints, and the other ranks read them back (feature cache,
    resume, skipping finished steps), so for several nodes the run directory must be on a
    shared filesystem. A no-op in a single process.
    """
    ctx = current()
    if not ctx.enabled:
        return
    path = Path(path)
    token = None
    if ctx.is_main:
        path.mkdir(parents=True, exist_ok=True)
        token = f".causeseg-shared-{uuid.uuid4().hex}"
        (path / token).write_text("")
    token = broadcast_object(token)
    seen = all_gather_object(bool((path / token).exists()))
    barrier()
    if ctx.is_main:
        (path / token).unlink(missing_ok=True)
    missing = [r for r, ok in enumerate(seen) if not ok]
    if missing:
        raise RuntimeError(
            f"{what} {path} is not shared: ranks {missing} do not see the files rank 0 writes there; "
            f"with several nodes put the run directory on a filesystem all nodes mount"
        )


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
