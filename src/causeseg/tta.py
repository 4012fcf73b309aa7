"""Pure tensor helpers of the inference protocol: flip TTA, upsampling, cluster probabilities.

cause-reference.md §8.1 (steps 2–3): the head output of an image and of its horizontal mirror are averaged
(the mirror's output flipped back), bilinearly upsampled (``align_corners=False``) to the label size, and each
pixel is compared with the C centroids by cosine similarity. The CRF unary comes from
``softmax(α · cos)`` with α = 3 in CAUSE (STEGO/HP use α = 2).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["hflip", "flip_average", "upsample", "cluster_cosine", "cluster_probs", "cluster_argmax"]


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror along the last (width) axis."""
    return x.flip(-1)


def flip_average(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Horizontal-flip test-time augmentation: ``(fn(x) + flip(fn(flip(x)))) / 2``.

    Args:
        fn: maps images (B, 3, H, W) to dense maps (B, r, h, w) whose width axis is aligned with the image's.
        images: (B, 3, H, W).

    Returns:
        (B, r, h, w) average of the two views.
    """
    if images.ndim != 4:
        raise ValueError(f"flip_average expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    y = fn(images)
    y_flip = fn(hflip(images))
    if y.shape != y_flip.shape or y.ndim != 4:
        raise ValueError(
            f"fn must return (B, r, h, w) maps of equal shape for both views, got {tuple(y.shape)} and "
            f"{tuple(y_flip.shape)}"
        )
    return (y + hflip(y_flip)) / 2


def upsample(y: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, r, h, w) maps to ``size`` = (H, W), ``align_corners=False`` (the protocol)."""
    if y.ndim != 4:
        raise ValueError(f"upsample expects (B, r, h, w), got {tuple(y.shape)}")
    if tuple(y.shape[-2:]) == tuple(size):
        return y
    return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


def cluster_cosine(y: torch.Tensor, centroids: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarity of every pixel embedding with every centroid.

    Args:
        y: (B, r, H, W) embeddings.
        centroids: (C, r).

    Returns:
        (B, C, H, W) cosines in [-1, 1].
    """
    if y.ndim != 4 or centroids.ndim != 2 or y.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"need y (B, r, H, W) and centroids (C, r) with the same r, got {tuple(y.shape)} and "
            f"{tuple(centroids.shape)}"
        )
    yn = F.normalize(y, dim=1, eps=eps)
    zn = F.normalize(centroids.to(y.dtype), dim=1, eps=eps)
    return torch.einsum("brhw,cr->bchw", yn, zn)


def cluster_probs(y: torch.Tensor, centroids: torch.Tensor, alpha: float = 3.0) -> torch.Tensor:
    """Per-pixel cluster probabilities ``softmax_c(α · cos(y, z_c))`` (B, C, H, W); α = 3 in CAUSE."""
    return torch.softmax(alpha * cluster_cosine(y, centroids), dim=1)


def cluster_argmax(y: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine: (B, H, W) int64 cluster ids."""
    return cluster_cosine(y, centroids).argmax(dim=1)
