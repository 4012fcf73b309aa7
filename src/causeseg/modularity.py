"""Step 1 of CAUSE: the modularity objective that learns the concept clusterbook M.

Notation (CAUSE paper, Sec. 3.2 / Eq. 3-7): ``x`` are frozen backbone tokens of one image
(``n`` tokens of width ``c``), ``M`` the clusterbook (``k`` concepts of width ``c``).

* affinity ``A_ij = max(0, cos(x_i, x_j))`` with self-loops removed (``A_ii = 0``);
* degree ``d = A 1`` and ``e = sum_ij A_ij`` (``e`` is Newman's ``2m``: every undirected edge is
  counted twice);
* modularity matrix ``W = A - d d^T / e``;
* soft assignments ``C = max(0, cos(x, M))`` of shape ``(n, k)``.

Paper, Eq. 3: ``H = (1/2e) Tr(C^T [A - d d^T / 2e] C)``; Eq. 5 (trace property): the same as
``(1/2e) Tr(C C^T [A - d d^T / 2e])``; Eq. 6 (the form that is optimised):
``H ~ (1/2e) Tr(tanh(C C^T / tau) [A - d d^T / 2e])`` with ``0 <= tanh(.) < 1`` (Eq. 7).
The paper's ``2e`` is the sum of the affinity matrix, i.e. our ``e``, so every function here
divides by ``e = sum A``.

Two variants of the pair weight ``delta_ij`` are offered (``variant=``):

* ``"paper"`` (Eq. 6): ``delta_ij = tanh((C C^T)_ij / tau) = tanh(sum_m C_im C_jm / tau)``;
* ``"code"`` (the official implementation, the default): ``delta_ij = max_m tanh(C_im C_jm / tau)
  = tanh(max_m C_im C_jm / tau)`` (tanh is monotone). The official code materialises a
  ``(B, k, n, n)`` tensor to take this maximum. Here the arg-max concept ``idx_ij`` is found in
  no-grad chunks and ``delta_ij = tanh(C_{i,idx_ij} C_{j,idx_ij} / tau)`` is gathered: identical
  forward value, and identical gradient because the gradient of a maximum flows only through its
  arg-max. Memory is ``O(B n^2)`` plus one bounded chunk.

``H_b = (1/e_b) sum_ij W_ij delta_ij`` is computed per image (one graph per image, no cross-image
edges) and the loss is ``-mean_b H_b``. With hard one-hot assignments ``delta_ij =
tanh(1/tau) [c_i = c_j]`` in both variants, so ``H = tanh(1/tau) Q`` with ``Q`` Newman's modularity.

Callers (Step 1 and the Step-3 centroid learner) pass detached features: the gradient they use
is the one with respect to ``M``. If ``x`` requires grad, its exact gradient is computed too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "grid_sample_indices",
    "gather_tokens",
    "affinity_graph",
    "modularity_matrix",
    "soft_assignments",
    "modularity_trace",
    "pair_weights",
    "modularity_from_assignments",
    "modularity_objective",
    "modularity_loss",
    "VARIANTS",
]

VARIANTS = ("code", "paper")

#: default bound on the number of elements of the temporary used to find the arg-max concept
#: of each pair in the ``"code"`` variant (2**24 elements = 64 MB in float32).
DEFAULT_CHUNK_ELEMENTS = 2**24


def grid_sample_indices(
    batch: int,
    h: int,
    w: int,
    window: int = 4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One uniformly random token per non-overlapping ``window x window`` block (paper App. B.3).

    The ``h x w`` token grid is split into ``(h // window) x (w // window)`` blocks; rows and
    columns beyond a multiple of ``window`` are dropped (23x23 with window 4 gives 5x5 blocks).
    In each block one position is drawn uniformly, independently per block and per image.

    Returns a ``LongTensor (batch, (h // window) * (w // window))`` of flat row-major token
    indices into the ``h x w`` grid, blocks in row-major order. The random numbers are drawn on
    the generator's device (CPU when no generator is given), so a seeded CPU generator gives the
    same indices whatever ``device`` the result is moved to.
    """
    if batch < 0 or h <= 0 or w <= 0 or window <= 0:
        raise ValueError(f"grid_sample_indices: need batch >= 0 and h, w, window > 0, got "
                         f"batch={batch}, h={h}, w={w}, window={window}")
    gh, gw = h // window, w // window
    if gh == 0 or gw == 0:
        raise ValueError(f"grid_sample_indices: a {h}x{w} token grid holds no {window}x{window} block")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    offset = torch.randint(0, window * window, (batch, gh * gw), generator=generator, device=draw_device)
    dy, dx = offset // window, offset % window
    block = torch.arange(gh * gw, device=draw_device)
    rows = (block // gw) * window + dy
    cols = (block % gw) * window + dx
    idx = rows * w + cols
    return idx.to(device) if device is not None else idx


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select tokens: ``x (B, N, c)``, ``idx (B, n)`` flat indices -> ``(B, n, c)``."""
    if x.dim() != 3 or idx.dim() != 2 or idx.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: expected x (B, N, c) and idx (B, n), got {tuple(x.shape)} "
                         f"and {tuple(idx.shape)}")
    idx = idx.to(device=x.device, dtype=torch.long)
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def affinity_graph(x: torch.Tensor) -> torch.Tensor:
    """Affinity ``A_ij = max(0, cos(x_i, x_j))`` with self-loops removed (paper Sec. 3.2, Eq. 3).

    ``x (B, n, c)`` -> ``A (B, n, n)``, symmetric, non-negative, zero diagonal.
    """
    if x.dim() != 3:
        raise ValueError(f"affinity_graph: expected x (B, n, c), got {tuple(x.shape)}")
    xn = F.normalize(x, dim=-1)
    a = (xn @ xn.transpose(1, 2)).clamp_min(0)
    eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
    return a.masked_fill(eye, 0.0)


def modularity_matrix(a: torch.Tensor, gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Newman's modularity matrix of Eq. 3: ``W = A - gamma d d^T / e`` with ``d = A 1``, ``e = sum A``.

    ``e`` is the paper's ``2e`` (Newman's ``2m``). Returns ``(W (B, n, n), e (B,))``. An image
    whose graph has no edge (``e = 0``) gets ``W = 0`` instead of NaN.

    ``gamma`` is the resolution parameter of Reichardt & Bornholdt (2006): ``1`` is Eq. 3 (CAUSE
    everywhere); ``gamma > 1`` weighs the null model more and favours more, smaller communities
    (it counters modularity's resolution limit, which merges small communities).
    """
    if a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"modularity_matrix: expected A (B, n, n), got {tuple(a.shape)}")
    d = a.sum(-1)
    e = a.sum((-1, -2))
    e_safe = torch.where(e > 0, e, torch.ones_like(e))
    w = a - gamma * d.unsqueeze(-1) * d.unsqueeze(-2) / e_safe[:, None, None]
    return w, e


def soft_assignments(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Concept assignments ``C = max(0, cos(x, M))``: ``x (B, n, c)``, ``M (k, c)`` -> ``(B, n, k)``."""
    if x.dim() != 3 or m.dim() != 2 or x.shape[-1] != m.shape[-1]:
        raise ValueError(f"soft_assignments: expected x (B, n, c) and M (k, c), got {tuple(x.shape)} "
                         f"and {tuple(m.shape)}")
    return (F.normalize(x, dim=-1) @ F.normalize(m, dim=-1).t()).clamp_min(0)


def modularity_trace(w: torch.Tensor, e: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Untempered modularity of Eq. 3 / Eq. 5: ``H = (1/e) Tr(C^T W C) = (1/e) Tr(C C^T W)``.

    ``W (B, n, n)``, ``e (B,)`` from :func:`modularity_matrix`, ``C (B, n, k)``. Returns ``(B,)``.
    Not what is optimised (see :func:`pair_weights` for Eq. 6 and the official variant); with
    one-hot ``C`` it is exactly Newman's modularity Q.
    """
    e_safe = torch.where(e > 0, e, torch.ones_like(e))
    return torch.einsum("bij,bim,bjm->b", w, c, c) / e_safe


def _argmax_pair_concept(c: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """``idx_ij = argmax_m C_im C_jm`` for ``C (B, n, k)``, without a ``(B, n, n, k)`` tensor.

    Chunked over rows ``i`` and concepts ``m`` so that the temporary holds at most
    ``chunk_elements`` elements. Ties resolve to the first maximal concept, as ``torch.max``.
    """
    b, n, k = c.shape
    idx = torch.empty(b, n, n, dtype=torch.long, device=c.device)
    if n == 0 or b == 0:
        return idx
    cm = max(1, min(k, chunk_elements // max(1, b * n)))
    ci = max(1, min(n, chunk_elements // max(1, b * n * cm)))
    with torch.no_grad():
        c = c.detach()
        for i0 in range(0, n, ci):
            ci_rows = c[:, i0:i0 + ci]  # (B, r, k)
            best_val = None
            best_idx = None
            for m0 in range(0, k, cm):
                prod = ci_rows[:, :, None, m0:m0 + cm] * c[:, None, :, m0:m0 + cm]  # (B, r, n, cm)
                val, arg = prod.max(-1)
                arg = arg + m0
                if best_val is None:
                    best_val, best_idx = val, arg
                else:
                    better = val > best_val  # strict: keep the first maximum on ties
                    best_val = torch.where(better, val, best_val)
                    best_idx = torch.where(better, arg, best_idx)
            idx[:, i0:i0 + ci] = best_idx
    return idx


def pair_weights(c: torch.Tensor, tau: float = 0.1, variant: str = "code",
                 chunk_size: int | None = None) -> torch.Tensor:
    """Pair weights ``delta (B, n, n)`` that replace ``C C^T`` in the trace of Eq. 5.

    * ``"paper"``, Eq. 6: ``delta_ij = tanh((C C^T)_ij / tau)``.
    * ``"code"`` (official): ``delta_ij = tanh(max_m C_im C_jm / tau)``, computed by finding the
      arg-max concept in no-grad chunks (``chunk_size`` = maximum number of elements of the
      temporary, default :data:`DEFAULT_CHUNK_ELEMENTS`) and gathering
      ``tanh(C_{i,idx} C_{j,idx} / tau)``: same value and same gradient as the naive maximum over
      a materialised ``(B, k, n, n)`` tensor.
    """
    if variant not in VARIANTS:
        raise ValueError(f"pair_weights: variant must be one of {VARIANTS}, got {variant!r}")
    if tau <= 0:
        raise ValueError(f"pair_weights: tau must be > 0, got {tau}")
    if variant == "paper":
        return torch.tanh((c @ c.transpose(1, 2)) / tau)
    idx = _argmax_pair_concept(c, chunk_size or DEFAULT_CHUNK_ELEMENTS)
    ci = torch.gather(c, 2, idx)  # C[b, i, idx[b, i, j]]
    cj = torch.gather(c, 2, idx.transpose(1, 2)).transpose(1, 2)  # C[b, j, idx[b, i, j]]
    return torch.tanh(ci * cj / tau)


def modularity_from_assignments(a: torch.Tensor, c: torch.Tensor, tau: float = 0.1, variant: str = "code",
                                chunk_size: int | None = None, gamma: float = 1.0) -> torch.Tensor:
    """Tempered modularity of Eq. 6 (or the official variant) from an affinity and assignments.

    ``H_b = (1/e_b) sum_ij W_ij delta_ij`` with ``W, e`` from :func:`modularity_matrix` (``A``) and
    ``delta`` from :func:`pair_weights` (``C``). ``A (B, n, n)``, ``C (B, n, k)`` -> ``H (B,)``.
    An image with an empty graph gets ``H = 0``. ``gamma``: resolution, see :func:`modularity_matrix`.
    """
    if a.dim() != 3 or c.dim() != 3 or a.shape[:2] != c.shape[:2] or a.shape[1] != a.shape[2]:
        raise ValueError(f"modularity_from_assignments: expected A (B, n, n) and C (B, n, k), got "
                         f"{tuple(a.shape)} and {tuple(c.shape)}")
    w, e = modularity_matrix(a, gamma)
    delta = pair_weights(c, tau=tau, variant=variant, chunk_size=chunk_size)
    e_safe = torch.where(e > 0, e, torch.ones_like(e))
    return (w * delta).sum((-1, -2)) / e_safe


def modularity_objective(x: torch.Tensor, m: torch.Tensor, tau: float = 0.1, variant: str = "code",
                         chunk_size: int | None = None, gamma: float = 1.0) -> torch.Tensor:
    """Per-image modularity ``H (B,)`` of tokens ``x (B, n, c)`` under clusterbook ``M (k, c)``.

    Paper Eq. 3 -> Eq. 5 -> Eq. 6: ``H = (1/e) Tr(delta W)`` with ``A = max(0, cos(x, x))``
    (no self-loops), ``e = sum A`` (the paper's ``2e``), ``W = A - d d^T / e``,
    ``C = max(0, cos(x, M))`` and

    * ``variant="code"`` (official default): ``delta_ij = tanh(max_m C_im C_jm / tau)``;
    * ``variant="paper"`` (Eq. 6): ``delta_ij = tanh((C C^T)_ij / tau)``.

    ``tau = 0.1`` in CAUSE. ``chunk_size`` bounds the temporary of the ``"code"`` arg-max search
    (number of elements, default 2**24). The objective is maximised; see :func:`modularity_loss`.
    ``x`` is normally detached (gradients go to ``M``); if it requires grad its gradient is exact.
    ``gamma`` is the resolution parameter of :func:`modularity_matrix` (1 = Eq. 3).
    """
    if x.dim() != 3 or m.dim() != 2:
        raise ValueError(f"modularity_objective: expected x (B, n, c) and M (k, c), got {tuple(x.shape)} "
                         f"and {tuple(m.shape)}")
    if x.shape[-1] != m.shape[-1]:
        raise ValueError(f"modularity_objective: feature width of x ({x.shape[-1]}) != width of M ({m.shape[-1]})")
    if variant not in VARIANTS:
        raise ValueError(f"modularity_objective: variant must be one of {VARIANTS}, got {variant!r}")
    a = affinity_graph(x)
    c = soft_assignments(x, m)
    return modularity_from_assignments(a, c, tau=tau, variant=variant, chunk_size=chunk_size, gamma=gamma)


def modularity_loss(x: torch.Tensor, m: torch.Tensor, tau: float = 0.1, variant: str = "code",
                    chunk_size: int | None = None) -> torch.Tensor:
    """Step-1 loss ``-mean_b H_b`` (see :func:`modularity_objective`)."""
    return -modularity_objective(x, m, tau=tau, variant=variant, chunk_size=chunk_size).mean()
