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


class CentroidLearner(nn.Module):
    """The learnable (C, r) centroids and their label-free loss."""

    def __init__(self, num_classes: int, dim: int, learner: str = "modularity", tau: float = 0.1,
                 generator: torch.Generator | None = None):
        super().__init__()
        if learner not in ("modularity", "kmeans"):
            raise ValueError(f"unknown centroid learner '{learner}'")
        self.learner = learner
        self.tau = tau
        w = torch.empty(num_classes, dim)
        if learner == "modularity":
            w.uniform_(-1.0 / num_classes, 1.0 / num_classes, generator=generator)  # official init
        else:
            w.normal_(generator=generator)
        self.weight = nn.Parameter(w)

    def loss(self, sampled: torch.Tensor) -> torch.Tensor:
        """``sampled`` (B, n, r) detached head outputs at the sampled token positions."""
        sampled = sampled.detach()
        if self.learner == "modularity":
            return -modularity_objective(sampled, self.weight, tau=self.tau, variant="code").mean()
        return spherical_kmeans_loss(sampled, self.weight)
