"""torch.distributed helpers (``torchrun``): context, gathers and reductions.

Everything degrades to a no-op in a single process, so the training code calls these helpers
unconditionally. The CPU path uses the gloo backend, the GPU path NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
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
    """Initialise the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
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
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``t`` from every rank along ``dim`` (equal shapes on all ranks; no gradient)."""
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
    if current().enabled:
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def average_gradients(params) -> None:
    """All-reduce and average the gradients of ``params`` (used where DDP cannot wrap a module)."""
    ctx = current()
    if not ctx.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
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
    contiguous block of ``B`` of it. With one process this is ``indices`` cut to full batches.
    """
    per_step = batch_size * ctx.world_size
    steps = len(indices) // per_step
    idx = indices[: steps * per_step].view(steps, ctx.world_size, batch_size)
    return idx[:, ctx.rank].reshape(-1)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
