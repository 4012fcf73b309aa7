"""Seeded token sampling that does not depend on batch composition or the number of processes.

Each sample's random 4x4-window positions are drawn from a generator seeded by
(seed, step name, epoch, dataset index). A sample therefore gets the same anchors whether it is
processed in a batch of 16 on one process or a batch of 8 on each of two, which makes
single-process and distributed runs comparable and resumes exact.
"""

from __future__ import annotations

import torch

from .modularity import grid_sample_indices

_SALTS = {"step1": 11, "step2": 23, "step3": 37}


def sample_seed(seed: int, stage: str, epoch: int, index: int) -> int:
    return (int(seed) * 1_000_003 + _SALTS.get(stage, 97) * 100_003 + int(epoch) * 1_009 * 65_537 + int(index)) % (2**62)


def per_sample_grid(
    indices: torch.Tensor, h: int, w: int, window: int, *, seed: int, stage: str, epoch: int, device
) -> torch.Tensor:
    """(B, n) flat token indices, one random position per window, seeded per sample."""
    rows = []
    for i in indices.tolist():
        g = torch.Generator().manual_seed(sample_seed(seed, stage, epoch, i))
        rows.append(grid_sample_indices(1, h, w, window=window, generator=g))
    return torch.cat(rows).to(device)
