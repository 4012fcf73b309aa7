"""Supervised linear probe — an evaluation tool only (paper Table 2), never part of the unsupervised model.

A 1×1 linear layer maps frozen, detached per-pixel embeddings (B, r, h, w) to C class logits, which are
bilinearly upsampled (``align_corners=False``) to the label size and trained with cross-entropy
(``ignore_index=-1``) by the probe's **own** Adam optimiser and own (optional) gradient clipping.

Why this is kept apart (cause-reference.md §7.3, §12 D3/D4): the official Step 3 trains the clustered head
through the probe's label loss and shares one optimiser and one clip norm with it, so the published numbers
are not label-free. Here the probe receives detached features only; the batches are even *produced* under
``torch.no_grad()`` (the iterator is advanced inside a no-grad block), so no graph to any other module exists
and no other parameter can receive a gradient. The caller should keep its feature extractor in ``eval()``
mode so that no buffer (e.g. BatchNorm statistics) changes either.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import SupervisedMetrics

__all__ = ["LinearProbe", "train_linear_probe", "evaluate_probe"]

FeatureBatches = Union[Iterable[tuple[torch.Tensor, torch.Tensor]], Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]]


class LinearProbe(nn.Module):
    """Per-pixel linear classifier: a 1×1 convolution r → C (a Linear layer on the channel axis)."""

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        if in_dim <= 0 or num_classes <= 0:
            raise ValueError(f"in_dim and num_classes must be positive, got {in_dim}, {num_classes}")
        self.in_dim = int(in_dim)
        self.num_classes = int(num_classes)
        self.linear = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        self.history: list[float] = []  # mean training loss per epoch

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, r, h, w) → (B, C, h, w) logits."""
        return self.linear(feats)

    def logits_at(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Logits bilinearly upsampled (``align_corners=False``) to ``size`` = (H, W)."""
        logits = self(feats)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) int64 class ids."""
        return self.logits_at(feats.detach(), size).argmax(1)


def _epoch_iterable(feature_batches: FeatureBatches, epoch: int, epochs: int) -> Iterator[Any]:
    if callable(feature_batches):
        return iter(feature_batches())
    it = iter(feature_batches)
    if it is feature_batches and epochs > 1:
        raise ValueError(
            "feature_batches is a one-shot iterator but epochs > 1; pass a list, a re-iterable object or a "
            "callable returning a fresh iterable per epoch"
        )
    return it


def _check_batch(feats: Any, labels: Any, in_dim: int, num_classes: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(feats, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"probe batch {index}: expected (features, labels) tensors")
    if feats.ndim != 4 or feats.shape[1] != in_dim:
        raise ValueError(f"probe batch {index}: features must be (B, {in_dim}, h, w), got {tuple(feats.shape)}")
    if labels.ndim != 3 or labels.shape[0] != feats.shape[0]:
        raise ValueError(
            f"probe batch {index}: labels must be (B, H, W) with B = {feats.shape[0]}, got {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise ValueError(f"probe batch {index}: labels must be integers, got {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"probe batch {index}: label values must be in [0, {num_classes}) or -1 (ignore), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    return feats.detach(), labels


def _batches(feature_batches: FeatureBatches, epoch: int, epochs: int) -> Iterator[tuple[Any, Any]]:
    """Yield batches, advancing the source inside ``torch.no_grad()`` (no graph into any other module)."""
    it = _epoch_iterable(feature_batches, epoch, epochs)
    while True:
        with torch.no_grad():
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


def train_linear_probe(
    feature_batches: FeatureBatches,
    in_dim: int,
    num_classes: int,
    epochs: int = 1,
    lr: float = 1e-3,
    *,
    weight_decay: float = 0.0,
    grad_clip: float | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    ignore_index: int = -1,
) -> LinearProbe:
    """Train a :class:`LinearProbe` on (features, labels) batches with its own Adam optimiser.

    Args:
        feature_batches: iterable of ``(feats (B, r, h, w), labels (B, H, W))`` with ``-1`` = ignore, or a
            callable returning a fresh such iterable (needed when ``epochs > 1`` and the source is a generator).
            Features are detached defensively; the source is advanced under ``torch.no_grad()``.
        in_dim: r.
        num_classes: C.
        epochs: passes over ``feature_batches``.
        lr, weight_decay: Adam settings of the probe's own optimiser.
        grad_clip: optional max grad-norm, applied to the probe's parameters only.
        device: where the probe lives; default: the device of the first feature batch.
        seed: initialisation seed (the global RNG state is left untouched).
        ignore_index: label value ignored by the loss (-1 by convention).

    Returns:
        The trained probe in ``eval()`` mode; ``probe.history`` holds the mean loss of each epoch.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(in_dim, num_classes)
    optimiser: torch.optim.Optimizer | None = None
    dev = torch.device(device) if device is not None else None
    if dev is not None:
        probe.to(dev)
        optimiser = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    n_batches = 0
    for epoch in range(epochs):
        total, count = 0.0, 0
        for i, (feats, labels) in enumerate(_batches(feature_batches, epoch, epochs)):
            feats, labels = _check_batch(feats, labels, in_dim, num_classes, i)
            if optimiser is None:
                dev = feats.device
                probe.to(dev)
                optimiser = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
            assert dev is not None
            feats = feats.to(dev, torch.float32)
            labels = labels.to(dev)
            if not bool((labels != ignore_index).any()):
                continue  # every pixel ignored: CE would be NaN
            with torch.enable_grad():
                logits = probe.logits_at(feats, tuple(labels.shape[-2:]))
                loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(probe.parameters(), grad_clip)
            optimiser.step()
            total += float(loss.detach())
            count += 1
            n_batches += 1
        probe.history.append(total / count if count else math.nan)
    if n_batches == 0:
        raise ValueError("train_linear_probe: no batch with labelled pixels was given")
    return probe.eval()


@torch.no_grad()
def evaluate_probe(
    probe: LinearProbe,
    feature_batches: FeatureBatches,
    num_classes: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Score a probe with :class:`~causeseg.metrics.SupervisedMetrics` (identity mapping, no matching).

    Returns the metrics dict (``miou``, ``pacc``, ``per_class_iou``, ...) plus ``"supervised": True``.
    """
    num_classes = num_classes or probe.num_classes
    if num_classes != probe.num_classes:
        raise ValueError(f"probe predicts {probe.num_classes} classes, evaluation asked for {num_classes}")
    probe.eval()
    dev = torch.device(device) if device is not None else next(probe.parameters()).device
    metrics = SupervisedMetrics(num_classes)
    for i, (feats, labels) in enumerate(_batches(feature_batches, 0, 1)):
        feats, labels = _check_batch(feats, labels, probe.in_dim, num_classes, i)
        pred = probe.predict(feats.to(dev, torch.float32), tuple(labels.shape[-2:]))
        metrics.update(pred.cpu(), labels.cpu())
    out = metrics.compute()
    out["supervised"] = True
    return out
