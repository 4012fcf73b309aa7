"""Step 1: the concept clusterbook M (the mediator of the front-door adjustment).

``Clusterbook`` is the artifact (k x c prototypes plus metadata). It is learned either by
modularity maximisation (the CAUSE default, :func:`causeseg.modularity.modularity_objective`) or,
for the paper's ablation (Table 4), by a classical discretiser over sampled backbone tokens:
k-means++, spectral, agglomerative (average linkage, cosine) or Ward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

FORMAT = "causeseg-clusterbook-v1"


class Codebook(nn.Module):
    """The learnable k x c prototypes, initialised U(-1/k, 1/k) as in the official code."""

    def __init__(self, k: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        w = torch.empty(k, dim)
        w.uniform_(-1.0 / k, 1.0 / k, generator=generator)
        self.weight = nn.Parameter(w)


@dataclass
class Clusterbook:
    prototypes: torch.Tensor  # (k, c), rows not normalised
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.prototypes.shape[0])

    def save(self, path: str | Path) -> None:
        from .utils import atomic_torch_save

        atomic_torch_save({"format": FORMAT, "prototypes": self.prototypes.detach().cpu(), "meta": self.meta}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Clusterbook":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{path}: not a causeseg clusterbook (expected format {FORMAT})")
        return cls(obj["prototypes"], obj.get("meta", {}))


def _centroids_from_labels(x: np.ndarray, labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((k, x.shape[1]), dtype=np.float32)
    present = np.unique(labels)
    for c in present:
        out[c] = x[labels == c].mean(0)
    missing = np.setdiff1d(np.arange(k), present)
    if len(missing):  # degenerate clusterings: fill with random samples
        out[missing] = x[rng.choice(len(x), size=len(missing), replace=len(missing) > len(x))]
    return out


def discretise(tokens: torch.Tensor, k: int, method: str, seed: int = 0) -> torch.Tensor:
    """Cluster (n, c) tokens into k prototypes with a classical method (paper Table 4 ablation).

    Tokens are L2-normalised first (all CAUSE users compare by cosine). Methods: ``kmeans++``
    (scikit-learn KMeans with k-means++ seeding), ``spectral`` (nearest-neighbour affinity),
    ``agglomerative`` (average linkage, cosine distance) and ``ward``.
    """
    from sklearn.cluster import AgglomerativeClustering, KMeans, SpectralClustering

    x = F.normalize(tokens.float(), dim=1).cpu().numpy()
    if len(x) < k:
        raise ValueError(f"need at least k={k} tokens to build a clusterbook with {method}, got {len(x)}")
    rng = np.random.default_rng(seed)
    if method == "kmeans++":
        model = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed, max_iter=100)
        return torch.from_numpy(model.fit(x).cluster_centers_.astype(np.float32))
    if method == "spectral":
        model = SpectralClustering(
            n_clusters=k, affinity="nearest_neighbors", n_neighbors=min(10, len(x) - 1), random_state=seed,
            assign_labels="cluster_qr",
        )
        labels = model.fit_predict(x)
    elif method == "agglomerative":
        labels = AgglomerativeClustering(n_clusters=k, linkage="average", metric="cosine").fit_predict(x)
    elif method == "ward":
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
    else:
        raise ValueError(f"unknown discretiser '{method}'")
    return torch.from_numpy(_centroids_from_labels(x, labels, k, rng))
