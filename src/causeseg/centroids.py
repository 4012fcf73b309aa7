"""Step 3: the C class centroids, learned without labels on detached head outputs.

Three learners:

* ``modularity`` (official code): maximise the Step-1 modularity objective with k = C
  concepts on the r-dimensional outputs of the EMA head (4x4-window token sampling, tau 0.1).
* ``kmeans`` (STEGO/HP "cluster probe", the minibatch spherical k-means the paper's text cites,
  Caron et al. 2018): minimise ``-sum_c onehot(argmax cos) * cos``.
* ``sinkhorn`` (not in the paper; SwAV's balanced assignments, Caron et al. 2020): soft codes from
  Sinkhorn-Knopp equipartition over the tokens of a batch, then cross-entropy of
  ``softmax(cos / tau)`` against them. Every one of the C centroids receives an equal share of
  the batch's tokens while it is learned, so none can stay empty (the modularity learner keeps
  only the largest communities when the head outputs lie in a narrow cone).

Both receive detached features only; nothing here can reach the head.
"""

from __future__ import annotations

import math

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


def sinkhorn_codes(scores: torch.Tensor, eps: float = 0.05, iters: int = 3, balance: float = 1.0) -> torch.Tensor:
    """Balanced soft assignments of n tokens to C clusters: Sinkhorn-Knopp as in SwAV (Caron et al. 2020).

    ``scores`` (n, C) similarities (cosines), kernel ``K = exp(scores / eps)``. Scaling form
    ``Q = diag(u) K diag(v)``, started from ``K / sum(K)``, then ``iters`` rounds of
    ``v = (b / K^T u) ** balance`` (clusters, target mass ``b = 1/C``) and ``u = a / K v`` (tokens, ``a = 1/n``).
    ``balance = 1`` is SwAV's equipartition; ``balance < 1`` relaxes the cluster marginal with a KL penalty
    (unbalanced optimal transport, Chizat et al. 2018: ``balance = rho / (rho + eps)``), so clusters may
    stay unequal; ``balance = 0`` gives ``softmax(scores / eps)``. Returns ``n * Q`` (n, C), no gradient:
    each row sums to 1 (a token's code); with ``balance = 1`` each column sums to n/C once converged
    (SwAV stops after 3). Computed in float64 log space (no underflow for a small ``eps``).
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn_codes expects (n, C) scores, got shape {tuple(scores.shape)}")
    n, c = scores.shape
    log_k = scores.detach().double() / eps
    log_u = (-torch.logsumexp(log_k.reshape(-1), 0)).expand(n)  # Q = K / sum(K), as SwAV
    log_v = log_k.new_zeros(c)
    for _ in range(iters):
        log_v = balance * (-math.log(c) - torch.logsumexp(log_k + log_u[:, None], dim=0))  # clusters -> 1/C
        log_u = -math.log(n) - torch.logsumexp(log_k + log_v[None, :], dim=1)  # tokens: mass 1/n each
    return (log_k + log_u[:, None] + log_v[None, :] + math.log(n)).exp().to(scores.dtype)


def sinkhorn_assignment_loss(x: torch.Tensor, centroids: torch.Tensor, tau: float = 0.1, eps: float = 0.05,
                             iters: int = 3, balance: float = 1.0) -> torch.Tensor:
    """SwAV-style balanced clustering loss (Caron et al. 2020) of tokens ``x`` (..., r) to ``centroids`` (C, r).

    ``-mean_i sum_c Q_ic log softmax_c(cos_ic / tau)`` with ``Q = sinkhorn_codes(cos, eps, iters, balance)``
    over all the tokens passed (one batch); ``Q`` is a fixed target, the gradient reaches ``centroids``
    (and ``x`` if it requires one) through the softmax only. Under ``torchrun`` each process balances its own
    share of the batch (SwAV all-reduces the Sinkhorn sums; this does not), so a data-parallel run is not
    step-for-step the single-process run, unlike the other learners.
    """
    cos = F.normalize(x.reshape(-1, x.shape[-1]), dim=-1) @ F.normalize(centroids, dim=-1).t()
    q = sinkhorn_codes(cos, eps, iters, balance)
    return -(q * F.log_softmax(cos / tau, dim=-1)).sum(-1).mean()


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


LEARNERS = ("modularity", "kmeans", "sinkhorn")


class CentroidLearner(nn.Module):
    """The learnable (C, r) centroids and their label-free loss."""

    def __init__(self, num_classes: int, dim: int, learner: str = "modularity", tau: float = 0.1,
                 generator: torch.Generator | None = None, gamma: float = 1.0, eps: float = 0.05,
                 iters: int = 3, balance: float = 1.0):
        super().__init__()
        if learner not in LEARNERS:
            raise ValueError(f"unknown centroid learner '{learner}' (expected one of {LEARNERS})")
        self.learner = learner
        self.tau = tau
        self.gamma = gamma
        self.eps = eps
        self.iters = iters
        self.balance = balance
        w = torch.empty(num_classes, dim)
        if learner in ("modularity", "sinkhorn"):
            w.uniform_(-1.0 / num_classes, 1.0 / num_classes, generator=generator)  # official init (and its scale)
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
        if self.learner == "sinkhorn":
            return sinkhorn_assignment_loss(sampled, self.weight, self.tau, self.eps, self.iters, self.balance)
        return spherical_kmeans_loss(sampled, self.weight)
