"""Step 3: the C class centroids, learned without labels on detached head outputs.

Two learners:

* ``modularity`` (official code): maximise the Step-1 modularity objective with k = C
  concepts on the r-dimensional outputs of the EMA head (4x4-window token sampling, tau 0.1).
* ``kmeans`` (STEGO/HP "cluster probe", the minibatch spherical k-means the paper's text cites,
  Caron et al. 2018): minimise ``-sum_c onehot(argmax cos) * cos``.

Both receive detached features only; nothing here can reach the head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modularity import modularity_objective


def spherical_kmeans_loss(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cluster-probe loss: minus the mean cosine of each token to its nearest centroid.

    ``x`` (..., r) features, ``centroids`` (C, r). The hard assignment is the argmax cosine;
    the gradient flows into the winning centroid only (minibatch spherical k-means).
    """
    cos = F.normalize(x.reshape(-1, x.shape[-1]), dim=-1) @ F.normalize(centroids, dim=-1).t()
    onehot = F.one_hot(cos.argmax(-1), centroids.shape[0]).to(cos.dtype)
    return -(onehot * cos).sum(-1).mean()


def kmeanspp_seeds(x: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """``k`` k-means++ seeds (scikit-learn's ``kmeans_plusplus``) of the unit vectors of ``x`` (n, r).

    On unit vectors the squared Euclidean distance is ``2 - 2 cos``, so this is k-means++ in the cosine
    geometry the centroids are used in. Deterministic for a given ``seed``; returns unit vectors (k, r).
    """
    from sklearn.cluster import kmeans_plusplus

    x = F.normalize(x.detach().reshape(-1, x.shape[-1]).double(), dim=-1)
    if len(x) < k:
        raise ValueError(f"k-means++ needs at least k={k} tokens, got {len(x)}")
    _, idx = kmeans_plusplus(x.cpu().numpy(), n_clusters=k, random_state=seed)
    return x[torch.from_numpy(idx)].float()


class CentroidLearner(nn.Module):
    """The learnable (C, r) centroids and their label-free loss."""

    def __init__(self, num_classes: int, dim: int, learner: str = "modularity", tau: float = 0.1,
                 generator: torch.Generator | None = None, gamma: float = 1.0):
        super().__init__()
        if learner not in ("modularity", "kmeans"):
            raise ValueError(f"unknown centroid learner '{learner}'")
        self.learner = learner
        self.tau = tau
        self.gamma = gamma
        w = torch.empty(num_classes, dim)
        if learner == "modularity":
            w.uniform_(-1.0 / num_classes, 1.0 / num_classes, generator=generator)  # official init
        else:
            w.normal_(generator=generator)
        self.weight = nn.Parameter(w)

    @torch.no_grad()
    def init_from(self, x: torch.Tensor, seed: int = 0) -> None:
        """Seed the centroids from data: k-means++ (Arthur & Vassilvitskii 2007) on unit vectors.

        ``x`` (n, r) detached head outputs. Uniform random centroids can start (or end) with a
        negative cosine to every token; ``max(0, cos)`` then gives them no gradient and they stay
        empty. Seeding on the data starts every centroid inside the data's cone.
        """
        self.weight.copy_(kmeanspp_seeds(x, self.weight.shape[0], seed).to(self.weight))

    def loss(self, sampled: torch.Tensor) -> torch.Tensor:
        """``sampled`` (B, n, r) detached head outputs at the sampled token positions."""
        sampled = sampled.detach()
        if self.learner == "modularity":
            return -modularity_objective(sampled, self.weight, tau=self.tau, variant="code", gamma=self.gamma).mean()
        return spherical_kmeans_loss(sampled, self.weight)
