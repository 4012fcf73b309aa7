"""Step 2 of CAUSE: concept-wise contrastive learning (paper Eq. 4 and the official variant).

Every sampled token ``i`` (anchor) gets a concept ``q(i) = argmax_m cos(t_i, m)`` from the
clusterbook ``M`` on its *backbone* feature ``t_i`` (:func:`assign_concepts`). The concept distance
of two tokens is ``D_ij = D_M[q(i), q(j)]`` with ``D_M = cos(M, M)`` (:func:`concept_distance`).
A pair is positive if ``D > phi+`` (0.3), negative if ``D < phi-`` (0.1), ignored in between
(:func:`concept_masks`); same concept gives ``D = 1``. The thresholds may instead be calibrated on the
clusterbook's own ``D_M`` (:func:`calibrated_thresholds`: quantiles of its off-diagonal entries, so that a chosen
fraction of the concept pairs is positive / negative; :func:`pair_fractions` reports those fractions).

Anchors are student projections ``a_i``, candidates teacher (EMA) projections ``z_j``, both
L2-normalised; ``s_ij = a_i . z_j / tau`` (``tau = 0.07``). Two forms of the loss
(:func:`concept_contrastive_loss`):

* ``form="official"`` (default, official code, SupCon-like): for a positive pair ``(i, j)``
  ``l_ij = -s_ij + log sum_{j' in Pos_i u Neg_i} exp(s_ij')`` -- all positives *and* negatives
  of the anchor in the denominator.
* ``form="paper"`` (Eq. 4): ``l_ij = -log( exp(s_ij) / (exp(s_ij) + sum_{j' in Neg_i} exp(s_ij')) )``
  -- one positive plus the negatives.

Both are averaged the same way, as in the official code: per image ``b`` and per term, the mean of
``l_ij`` over all positive pairs ``(i, j)`` of that image (pair-level mean: anchors with more
positives weigh more). There are two terms per image: the in-batch term (candidates = all
teacher tokens of the batch, the self pair -- same image, same position -- removed from positives
and negatives) and the bank term (candidates = every valid concept-bank entry; entry ``(m, slot)``
belongs to concept ``m``, so ``D = D_M[q(i), m]``; no self mask; its own denominator). The loss is
the mean of all available terms ``[L_1^in, L_1^bank, ..., L_B^in, L_B^bank]``. A term without any
positive pair is dropped and counted (the official code returns ``mean([]) = NaN`` there, defect D7).

Everything is vectorised over images and anchors; masked log-sum-exps are computed with ``-inf``
masking and are NaN-free in value and gradient, also for anchors with empty sets.

Fast bank term (official form). With the official sizes the bank term's logits are
``(B*n) x (k*b) = 1600 x 204,800``. Its positive part needs no logits at all
(``sum_{j in Pos_i} s_ij = a_i . (P_i @ S) / tau``, ``S_m`` = sum of concept ``m``'s normalised
entries), and its log-sum-exp over ``Pos_i u Neg_i`` is computed by
:func:`causeseg.bank_lse.bank_logsumexp` (``bank_impl="auto" | "torch" | "triton"``): the mask is
structured (``U[i, m] = Pos u Neg`` at concept level times ``valid[m, slot]``) and never built as an
``(A, k*b)`` tensor, the logits are produced chunk by chunk (Triton: tile by tile) by matmuls in the
anchors' dtype (bf16 under AMP) with fp32 accumulation and an fp32 log-sum-exp; the same pass yields the
gradient ``d lse_i / d a_i`` (an ``(A, d)`` tensor), so nothing logit-sized is kept for the backward pass.
``bank_impl="reference"`` keeps the plain fp32 masked log-sum-exp over materialised logits for comparison
(tests check both agree in value and gradient).

Layout: one short function per equation and form -- :func:`official_pair_loss` (official SupCon form),
:func:`paper_pair_loss` (Eq. 4), :func:`in_batch_term`, :func:`bank_term_official` (fused),
:func:`bank_term_materialised` (reference / Eq. 4 over the bank), :func:`mean_of_terms` -- and
:func:`concept_contrastive_loss` checks the inputs and puts them together. The bank arrives as a :class:`causeseg.bank.BankTensors` (a
:class:`~causeseg.bank.ConceptBank` keeps the entries' inverse norms and the per-concept sums ``S_m`` up to
date at insertion) or as a plain ``(k, b, d)`` tensor (both are then computed here). Statistics are returned
as 0-d tensors, so a training step needs no host synchronisation (:func:`stats_as_numbers` converts them,
one synchronisation); where a term's logits would not fit a memory budget (the paper form and the reference
bank term over ``k*b`` entries) the anchors are processed in chunks under activation checkpointing.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .bank import BankTensors
from .bank_lse import bank_logsumexp

__all__ = [
    "FORMS",
    "BANK_IMPLS",
    "concept_distance",
    "assign_concepts",
    "concept_masks",
    "calibrated_thresholds",
    "pair_fractions",
    "official_pair_loss",
    "paper_pair_loss",
    "in_batch_term",
    "bank_term_official",
    "bank_term_materialised",
    "mean_of_terms",
    "concept_contrastive_loss",
    "stats_as_numbers",
]

FORMS = ("official", "paper")
#: how the official-form bank log-sum-exp is computed (:func:`causeseg.bank_lse.bank_logsumexp`; "reference" =
#: the plain fp32 masked log-sum-exp over materialised ``(rows x k*b)`` logits, kept for comparison)
BANK_IMPLS = ("auto", "torch", "triton", "reference")

#: elements of the (tokens x k) similarity temporary of :func:`assign_concepts` (64 MB in fp32)
_ASSIGN_CHUNK_ELEMENTS = 2**24
#: elements of one chunk's materialised ``(rows x candidates)`` logits when no ``chunk_size`` is given
#: (fp32: 256 MB on CUDA, 64 MB on the CPU; masks and the backward pass take a few times that)
_LOGIT_BUDGET = {"cuda": 2**26, "cpu": 2**24}


def concept_distance(m: torch.Tensor) -> torch.Tensor:
    """Concept distance matrix ``D_M = cos(M, M)`` (paper Sec. 3.3, App. B.4), shape ``(k, k)``.

    Exactly symmetric with a unit diagonal (``D = 1`` for the same concept, also for a zero row).
    Computed without gradient: it only selects positives and negatives.
    """
    if m.dim() != 2:
        raise ValueError(f"concept_distance: expected M (k, c), got {tuple(m.shape)}")
    with torch.no_grad():
        mn = F.normalize(m.detach(), dim=-1)
        d = mn @ mn.t()
        d = (d + d.t()) / 2
        d.fill_diagonal_(1.0)
    return d


def assign_concepts(t: torch.Tensor, m: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Concept of every token: ``q = argmax_m cos(t, m)`` (paper Sec. 3.3, Eq. 8 for the TR queries).

    ``t (..., c)``, ``M (k, c)`` -> ``LongTensor (...)``. No gradient. ``chunk_size`` = tokens per
    chunk (default: as many as keep the ``chunk x k`` similarity below 2**24 elements).
    """
    if m.dim() != 2 or t.shape[-1] != m.shape[-1]:
        raise ValueError(f"assign_concepts: expected t (..., c) and M (k, c) with the same c, got "
                         f"{tuple(t.shape)} and {tuple(m.shape)}")
    lead = t.shape[:-1]
    with torch.no_grad():
        flat = t.detach().reshape(-1, t.shape[-1])
        mn = F.normalize(m.detach().to(flat.dtype), dim=-1)
        step = chunk_size or max(1, _ASSIGN_CHUNK_ELEMENTS // max(1, m.shape[0]))
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for s in range(0, flat.shape[0], step):
            out[s:s + step] = (F.normalize(flat[s:s + step], dim=-1) @ mn.t()).argmax(-1)
    return out.reshape(lead)


def concept_masks(anchor_c: torch.Tensor, cand_c: torch.Tensor, d_m: torch.Tensor, phi_pos: float = 0.3,
                  phi_neg: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive / negative masks from concept distances (paper Sec. 3.3, App. B.4).

    ``anchor_c (..., P)`` and ``cand_c (Q,)`` concept indices -> ``(pos, neg)`` bool ``(..., P, Q)``
    with ``pos = D > phi_pos``, ``neg = D < phi_neg``, ``D = D_M[anchor_c, cand_c]``.
    """
    if phi_neg > phi_pos:
        raise ValueError(f"concept_masks: phi_neg ({phi_neg}) must not exceed phi_pos ({phi_pos})")
    d = d_m[anchor_c.unsqueeze(-1), cand_c.reshape(-1)]
    return d > phi_pos, d < phi_neg


def _concept_pairs(d_m: torch.Tensor) -> torch.Tensor:
    """The concept distances of the ``k (k - 1) / 2`` unordered concept pairs ``m < m'`` (the strict upper triangle
    of ``D_M``; ``D_M`` is symmetric, so these are the off-diagonal entries, each pair once), as a flat tensor.

    Extra memory: a ``(k, k)`` bool mask and the selected values (no ``(k, k)`` index tensors).
    """
    if d_m.dim() != 2 or d_m.shape[0] != d_m.shape[1] or d_m.shape[0] < 2:
        raise ValueError(f"expected D_M (k, k) with k >= 2, got {tuple(d_m.shape)}")
    k = d_m.shape[0]
    upper = torch.ones(k, k, dtype=torch.bool, device=d_m.device).triu_(1)
    return d_m.detach()[upper]


def calibrated_thresholds(d_m: torch.Tensor, pos_frac: float, neg_frac: float) -> tuple[float, float]:
    """``(phi+, phi-)`` calibrated on the clusterbook's own concept distances (``step2.phi_rule=quantile``).

    ``phi+`` is the ``(1 - pos_frac)`` quantile and ``phi-`` the ``neg_frac`` quantile of the off-diagonal
    entries of ``D_M = cos(M, M)`` (over the unordered concept pairs; linear interpolation between order
    statistics, as ``numpy.quantile``), so about ``pos_frac`` of the concept pairs count as positive
    (``D > phi+``) and ``neg_frac`` as negative (``D < phi-``); clamped so that ``phi- <= phi+``. The paper's
    fixed 0.3 / 0.1 (Sec. 3.3, App. B.4) were set for DINO ViT features; other backbones give other ``D_M``
    distributions. Computed by one sort of the pair values (any ``k``; ``torch.quantile`` refuses inputs
    above 2**24 elements).
    """
    for name, frac in (("pos_frac", pos_frac), ("neg_frac", neg_frac)):
        if not 0 < frac < 1:
            raise ValueError(f"calibrated_thresholds: {name} must be in (0, 1), got {frac}")
    if pos_frac + neg_frac > 1 + 1e-9:
        raise ValueError(f"calibrated_thresholds: pos_frac + neg_frac must be <= 1, got {pos_frac} + {neg_frac}")
    vals = _concept_pairs(d_m).sort().values.double()

    def quantile(q: float) -> float:
        pos = q * (len(vals) - 1)
        lo = int(pos)  # floor (pos >= 0)
        hi = min(lo + 1, len(vals) - 1)
        return float(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo))

    phi_pos, phi_neg = quantile(1.0 - pos_frac), quantile(neg_frac)
    return phi_pos, min(phi_neg, phi_pos)


def pair_fractions(d_m: torch.Tensor, phi_pos: float, phi_neg: float) -> tuple[float, float]:
    """Fractions of the unordered concept pairs that are positive (``D > phi_pos``) and negative
    (``D < phi_neg``) at the given thresholds (the same rule as :func:`concept_masks`)."""
    vals = _concept_pairs(d_m)
    return float((vals > phi_pos).double().mean()), float((vals < phi_neg).double().mean())


# ------------------------------------------------------------------------------------------- pair losses
def _masked_logsumexp(s: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log sum_{mask} exp(s)`` over the last dim, NaN-free in value and gradient.

    Returns ``(lse, nonempty)``; rows with an empty mask get a finite placeholder (``log`` of
    the smallest normal number) with zero gradient -- callers must not use it.
    """
    masked = s.masked_fill(~mask, float("-inf"))
    mx = masked.amax(-1, keepdim=True).detach()
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    total = torch.exp(masked - mx).sum(-1)
    lse = torch.log(total.clamp_min(torch.finfo(s.dtype).tiny)) + mx.squeeze(-1)
    return lse, mask.any(-1)


def official_pair_loss(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Official (SupCon-like) form, per anchor row: ``sum_{j in Pos_i} l_ij`` with
    ``l_ij = -s_ij + log sum_{j' in Pos_i u Neg_i} exp(s_ij')`` (official code; the paper's Eq. 4 has one
    positive in the denominator). ``s (R, Q)`` logits, ``pos`` / ``neg`` bool ``(R, Q)``. Equals
    ``|Pos_i| * lse_i - sum_{Pos_i} s_ij``; exactly 0 for an anchor without positives."""
    lse, _ = _masked_logsumexp(s, pos | neg)
    npos = pos.sum(-1).to(s.dtype)
    spos = torch.where(pos, s, torch.zeros_like(s)).sum(-1)
    return npos * lse - spos  # npos = 0 -> exactly 0 (lse is finite)


def paper_pair_loss(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 4, per anchor row: ``sum_{j in Pos_i} -log( exp(s_ij) / (exp(s_ij) + sum_{j' in Neg_i}
    exp(s_ij')) )`` = ``sum_{Pos_i} softplus(lse_{Neg_i} - s_ij)``; a pair counts 0 when ``Neg_i`` is empty."""
    lse_neg, has_neg = _masked_logsumexp(s, neg)
    per_pair = F.softplus(lse_neg.unsqueeze(-1) - s)
    return torch.where(pos & has_neg.unsqueeze(-1), per_pair, torch.zeros_like(per_pair)).sum(-1)


PAIR_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "official": official_pair_loss, "paper": paper_pair_loss}


# ------------------------------------------------------------------------------------------- chunking
def budget_rows(n_rows: int, n_cols: int, device: torch.device) -> int | None:
    """Anchor rows per chunk that keep ``rows x n_cols`` logits within the memory budget (None: all fit)."""
    budget = _LOGIT_BUDGET.get(device.type, _LOGIT_BUDGET["cpu"])
    if n_rows * n_cols <= budget:
        return None
    return max(1, budget // max(1, n_cols))


def _rowwise(fn: Callable[..., torch.Tensor], a: torch.Tensor, extra: tuple[torch.Tensor, ...],
             chunk_size: int | None) -> torch.Tensor:
    """Apply ``fn(a_rows, *extra_rows) -> (rows, ...)`` over chunks of anchor rows.

    With ``chunk_size`` and a gradient-requiring ``a``, each chunk runs under activation
    checkpointing, so only one chunk's ``(rows x candidates)`` logits live at a time, in the
    forward and in the backward pass.
    """
    if chunk_size is None or chunk_size >= a.shape[0]:
        return fn(a, *extra)
    outs = []
    for s in range(0, a.shape[0], chunk_size):
        args = (a[s:s + chunk_size],) + tuple(e[s:s + chunk_size] for e in extra)
        if a.requires_grad and torch.is_grad_enabled():
            outs.append(checkpoint(fn, *args, use_reentrant=False))
        else:
            outs.append(fn(*args))
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------- terms
def in_batch_term(a: torch.Tensor, z: torch.Tensor, qa: torch.Tensor, qz: torch.Tensor, d_m: torch.Tensor,
                  self_idx: torch.Tensor, *, tau: float, phis: tuple[float, float], form: str,
                  chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch term: per anchor ``(sum_{j in Pos_i} l_ij, |Pos_i|)`` over the teacher tokens ``z (Q, d)``.

    ``a (A, d)`` and ``z`` L2-normalised, ``s_ij = a_i . z_j / tau``; ``qa (A,)`` / ``qz (Q,)`` concepts;
    candidate ``self_idx[i]`` (the anchor's own token, -1 for none) is neither positive nor negative.
    """
    cand_pos = torch.arange(z.shape[0], device=z.device)

    def rows(a_rows: torch.Tensor, q_rows: torch.Tensor, self_rows: torch.Tensor) -> torch.Tensor:
        s = a_rows @ z.t() / tau
        pos, neg = concept_masks(q_rows, qz, d_m, *phis)
        keep = cand_pos.unsqueeze(0) != self_rows.unsqueeze(1)
        pos, neg = pos & keep, neg & keep
        return torch.stack([PAIR_LOSSES[form](s, pos, neg), pos.sum(-1).to(s.dtype)], -1)

    chunk = chunk_size if chunk_size is not None else budget_rows(a.shape[0], z.shape[0], a.device)
    out = _rowwise(rows, a, (qa, self_idx), chunk)
    return out[:, 0].contiguous(), out[:, 1].detach().round().long()


def bank_positive_sum(a: torch.Tensor, p_con: torch.Tensor, sums: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum_{j in Pos_i} s_ij = a_i . (P_i @ S) / tau`` per anchor: with the per-concept sums of the normalised
    entries ``S (k, d)`` the positive part of the official bank term needs no logits."""
    return (a * (p_con.to(a.dtype) @ sums.to(a.dtype))).sum(-1) / tau


def bank_term_official(a: torch.Tensor, p_con: torch.Tensor, n_con: torch.Tensor, bank: BankTensors,
                       npos: torch.Tensor, *, tau: float, impl: str, chunk_size: int | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """Official-form bank term, fused: ``sum_{j in Pos_i} l_ij = |Pos_i| lse_i - a_i . (P_i @ S) / tau`` with
    ``lse_i`` over ``Pos_i u Neg_i`` from :func:`causeseg.bank_lse.bank_logsumexp` (matmuls in ``dtype``,
    nothing logit-sized kept; ``|s_ij| <= 1 / tau`` for normalised anchors bounds its Triton shift)."""
    lse, _ = bank_logsumexp(a, bank.feats, p_con | n_con, bank.valid, bank.inv_norm, tau, impl=impl,
                            block_rows=chunk_size, dtype=dtype, max_logit=1.01 / tau)
    return npos.to(a.dtype) * lse.to(a.dtype) - bank_positive_sum(a, p_con, bank.sums, tau)


def bank_term_materialised(a: torch.Tensor, p_con: torch.Tensor, n_con: torch.Tensor, bank: BankTensors,
                           npos: torch.Tensor, *, tau: float, form: str, chunk_size: int | None) -> torch.Tensor:
    """Bank term over materialised ``(rows x k*b)`` logits in ``a``'s dtype, either form (reference for the
    official form, the only path of Eq. 4). Entry ``(m, slot)`` is a positive / negative of anchor ``i``
    when concept ``m`` is (``p_con`` / ``n_con``, ``(A, k)``) and the slot is filled. Chunked under
    checkpointing by ``chunk_size`` (default: within the logit budget)."""
    k, nb, dim = bank.feats.shape
    flat = bank.feats.to(a.dtype).reshape(k * nb, dim)
    scale = (bank.inv_norm.to(a.dtype).reshape(-1) / tau).unsqueeze(0)
    valid = bank.valid

    def rows(a_rows: torch.Tensor, p_rows: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
        s = (a_rows @ flat.t()) * scale  # (R, k*b)
        pos = (p_rows.unsqueeze(-1) & valid.unsqueeze(0)).reshape(len(a_rows), -1)
        neg = (n_rows.unsqueeze(-1) & valid.unsqueeze(0)).reshape(len(a_rows), -1)
        if form == "official":  # only the log-sum-exp over Pos u Neg needs the logits
            return _masked_logsumexp(s, pos | neg)[0]
        return paper_pair_loss(s, pos, neg)

    chunk = chunk_size if chunk_size is not None else budget_rows(a.shape[0], k * nb, a.device)
    out = _rowwise(rows, a, (p_con, n_con), chunk)
    if form == "official":
        out = npos.to(a.dtype) * out - bank_positive_sum(a, p_con, bank.sums, tau)
    return out


def mean_of_terms(sums: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss = mean over the terms with a positive pair of (sum of ``l_ij`` / number of positive pairs);
    ``sums``, ``counts`` ``(T, B)``. Returns ``(loss, terms_used)``; no term gives a zero, differentiable loss.
    """
    used = counts > 0
    per_term = sums / counts.clamp_min(1).to(sums.dtype)
    n_used = used.sum()
    # times the reciprocal: what dividing by a host integer does (so the value is the one of earlier versions)
    total = torch.where(used, per_term, torch.zeros_like(per_term)).sum()
    loss = total * n_used.clamp_min(1).to(sums.dtype).reciprocal()
    return loss, n_used


# ------------------------------------------------------------------------------------------- the loss
def _check_inputs(anchors: torch.Tensor, cands: torch.Tensor, anchor_c: torch.Tensor, cand_c: torch.Tensor,
                  d_m: torch.Tensor, opts: dict) -> None:
    """Shape and argument checks (host information only); concept ranges only with ``opts["validate"]``."""
    name = "concept_contrastive_loss"
    if opts["form"] not in FORMS:
        raise ValueError(f"{name}: form must be one of {FORMS}, got {opts['form']!r}")
    if opts["bank_impl"] not in BANK_IMPLS:
        raise ValueError(f"{name}: bank_impl must be one of {BANK_IMPLS}, got {opts['bank_impl']!r}")
    if opts["tau"] <= 0:
        raise ValueError(f"{name}: tau must be > 0, got {opts['tau']}")
    if opts["phi_neg"] > opts["phi_pos"]:
        raise ValueError(f"{name}: phi_neg ({opts['phi_neg']}) must not exceed phi_pos ({opts['phi_pos']})")
    if anchors.dim() != 3 or cands.dim() != 3 or anchors.shape[-1] != cands.shape[-1]:
        raise ValueError(f"{name}: expected anchors (B, n, d) and cands (Bc, nc, d), got "
                         f"{tuple(anchors.shape)} and {tuple(cands.shape)}")
    bsz, n, _ = anchors.shape
    bc, nc, _ = cands.shape
    if tuple(anchor_c.shape) != (bsz, n) or tuple(cand_c.shape) != (bc, nc):
        raise ValueError(f"{name}: anchor_c {tuple(anchor_c.shape)} / cand_c {tuple(cand_c.shape)} do not match "
                         f"anchors {tuple(anchors.shape)} / cands {tuple(cands.shape)}")
    if d_m.dim() != 2 or d_m.shape[0] != d_m.shape[1]:
        raise ValueError(f"{name}: D_M must be (k, k), got {tuple(d_m.shape)}")
    k = d_m.shape[0]
    if opts["validate"]:
        for label, q in (("anchor_c", anchor_c), ("cand_c", cand_c)):
            if q.numel() and bool(((q < 0) | (q >= k)).any()):
                raise ValueError(f"{name}: {label} holds concepts outside [0, {k})")
    if opts["exclude_self"]:
        if nc != n:
            raise ValueError(f"{name}: exclude_self needs as many candidates per image as anchors (n={n}, "
                             f"nc={nc}); pass exclude_self=False otherwise")
        if opts["anchor_offset"] < 0 or opts["anchor_offset"] + bsz > bc:
            raise ValueError(f"{name}: anchor_offset {opts['anchor_offset']} + B {bsz} exceeds the {bc} "
                             f"candidate images")


def _bank_tensors(bank: torch.Tensor | BankTensors, bank_valid: torch.Tensor | None, k: int, dim: int,
                  dt: torch.dtype, dev: torch.device) -> BankTensors:
    """The bank as :class:`BankTensors` on ``dev`` (computed from a plain tensor; checked)."""
    if isinstance(bank, BankTensors):
        if bank_valid is not None:
            raise ValueError("concept_contrastive_loss: bank_valid goes with a plain bank tensor, not BankTensors")
        feats, valid = bank.feats, bank.valid
    else:
        feats, valid = bank, bank_valid
    if feats.dim() != 3 or feats.shape[0] != k or feats.shape[2] != dim:
        raise ValueError(f"concept_contrastive_loss: bank must be (k={k}, b, d={dim}), got {tuple(feats.shape)}")
    nb = feats.shape[1]
    if valid is not None and tuple(valid.shape) != (k, nb):
        raise ValueError(f"concept_contrastive_loss: bank_valid must be ({k}, {nb}), got {tuple(valid.shape)}")
    if isinstance(bank, BankTensors):
        return BankTensors(*(t.to(dev) for t in (bank.feats, bank.valid, bank.inv_norm, bank.sums, bank.counts)))
    return BankTensors.from_tensors(feats.detach().to(dev), valid, acc=dt)


def concept_contrastive_loss(
    anchors: torch.Tensor,
    cands: torch.Tensor,
    anchor_c: torch.Tensor,
    cand_c: torch.Tensor,
    d_m: torch.Tensor,
    *,
    bank: torch.Tensor | BankTensors | None = None,
    bank_valid: torch.Tensor | None = None,
    tau: float = 0.07,
    phi_pos: float = 0.3,
    phi_neg: float = 0.1,
    form: str = "official",
    exclude_self: bool = True,
    chunk_size: int | None = None,
    anchor_offset: int = 0,
    bank_impl: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Concept-wise contrastive loss of CAUSE Step 2 (paper Eq. 4 / official SupCon-like form).

    Args:
        anchors: ``(B, n, d)`` student projections (receive the gradient).
        cands: ``(Bc, nc, d)`` teacher projections of the in-batch candidates (detached here).
            Usually ``Bc = B`` and ``nc = n``; in distributed runs the all-gathered global batch.
        anchor_c: ``(B, n)`` concepts of the anchors (:func:`assign_concepts` on backbone tokens).
        cand_c: ``(Bc, nc)`` concepts of the candidates.
        d_m: ``(k, k)`` concept distance matrix (:func:`concept_distance`).
        bank: optional concept bank of teacher projections: :meth:`causeseg.bank.ConceptBank.tensors` (entries
            with their cached inverse norms and per-concept sums) or a plain ``(k, b, d)`` tensor (row ``m``
            holds concept ``m``'s entries; detached here). Not normalised: the inverse norms do that.
        bank_valid: with a plain bank tensor, optional ``(k, b)`` bool mask of filled slots (default: all).
        tau: temperature of ``s_ij = a_i . z_j / tau`` (0.07).
        phi_pos, phi_neg: positive if ``D > phi_pos``, negative if ``D < phi_neg`` (0.3 / 0.1).
        form: ``"official"`` (:func:`official_pair_loss`) or ``"paper"`` (Eq. 4, :func:`paper_pair_loss`).
        exclude_self: remove the self pair (anchor ``(b, i)`` vs candidate ``(b + anchor_offset, i)``)
            from the in-batch positives and negatives; requires ``nc == n``.
        chunk_size: anchors per chunk of the materialised terms (activation checkpointing: only one chunk's
            logits live at a time; same result). Default: chosen from a memory budget (about 2**24 logits
            per chunk on the CPU, 2**26 on CUDA), no chunking when all fit. The fused bank term takes it as
            its ``block_rows`` (by default it bounds its chunks itself).
        anchor_offset: index of the anchors' first image inside ``cands`` (distributed: rank * B).
        bank_impl: official form only -- ``"auto"`` / ``"torch"`` / ``"triton"`` use the fused
            :func:`causeseg.bank_lse.bank_logsumexp` (:func:`bank_term_official`); ``"reference"`` the masked
            log-sum-exp over materialised logits (:func:`bank_term_materialised`, as the paper form always).
        validate: check that the concept indices lie in ``[0, k)`` (one host synchronisation; the training
            step passes ``False``: its concepts come from an arg-max over the clusterbook).

    Precision: the in-batch term, the positive sums and the loss are computed in fp32 (fp64 for fp64
    anchors) whatever the anchors' dtype; with fp16/bf16 anchors (AMP) the official bank term's matmuls
    run in that dtype (the bank is cast to it unless stored so) with fp32 accumulation and log-sum-exp.

    Returns:
        ``(loss, stats)``. ``loss`` = mean of the available per-image terms
        ``[L_1^in, L_1^bank, ..., L_B^in, L_B^bank]``, each the mean of ``l_ij`` over that image's
        positive pairs; terms without a positive pair are dropped (never NaN); with no term at all
        the loss is zero (and differentiable). ``stats`` (detached 0-d tensors; :func:`stats_as_numbers`):
        ``terms_used``, ``terms_dropped`` (bank terms are considered only when the bank holds a
        valid entry), ``anchors_without_positive`` (no positive in any term),
        ``mean_positives_per_anchor`` (in-batch), ``mean_bank_positives_per_anchor``.
    """
    opts = dict(form=form, bank_impl=bank_impl, tau=tau, phi_pos=phi_pos, phi_neg=phi_neg, validate=validate,
                exclude_self=exclude_self, anchor_offset=anchor_offset)
    _check_inputs(anchors, cands, anchor_c, cand_c, d_m, opts)
    bsz, n, dim = anchors.shape
    bc, nc, _ = cands.shape
    k = d_m.shape[0]
    dev = anchors.device
    dt = torch.promote_types(anchors.dtype, torch.float32)  # in-batch term, positives and loss: >= fp32
    low = anchors.dtype if anchors.dtype in (torch.float16, torch.bfloat16) else dt  # fast bank term matmuls
    d_m = d_m.to(device=dev)
    a = F.normalize(anchors.reshape(bsz * n, dim).to(dt), dim=-1)  # (A, d)
    qa = anchor_c.reshape(-1).to(dev)
    img = torch.arange(bsz, device=dev).repeat_interleave(n)
    z = F.normalize(cands.detach().reshape(bc * nc, dim).to(dt), dim=-1)  # (Q, d)
    self_idx = ((img + anchor_offset) * nc + torch.arange(n, device=dev).repeat(bsz) if exclude_self
                else torch.full((bsz * n,), -1, dtype=torch.long, device=dev))
    sum_in, npos_in = in_batch_term(a, z, qa, cand_c.reshape(-1).to(dev), d_m, self_idx, tau=tau,
                                    phis=(phi_pos, phi_neg), form=form, chunk_size=chunk_size)
    sums, counts = [sum_in.reshape(bsz, n).sum(1)], [npos_in.reshape(bsz, n).sum(1)]
    npos_bank = torch.zeros_like(npos_in)
    bank_any = torch.zeros((), dtype=torch.bool, device=dev)
    if bank is not None:
        bt = _bank_tensors(bank, bank_valid, k, dim, dt, dev)
        p_con, n_con = concept_masks(qa, torch.arange(k, device=dev), d_m, phi_pos, phi_neg)  # (A, k)
        npos_bank = (p_con.to(torch.float32) @ bt.counts.to(torch.float32)).round().long()  # exact (< 2**24)
        if form == "official" and bank_impl != "reference":
            out = bank_term_official(a, p_con, n_con, bt, npos_bank, tau=tau, impl=bank_impl,
                                     chunk_size=chunk_size, dtype=low)
        else:
            out = bank_term_materialised(a, p_con, n_con, bt, npos_bank, tau=tau, form=form, chunk_size=chunk_size)
        sums.append(out.reshape(bsz, n).sum(1))
        counts.append(npos_bank.reshape(bsz, n).sum(1))
        bank_any = bt.counts.sum() > 0
    loss, n_used = mean_of_terms(torch.stack(sums), torch.stack(counts))
    with torch.no_grad():
        considered = bsz * (1 + bank_any.long())
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        stats = {
            "terms_used": n_used,
            "terms_dropped": considered - n_used,
            "anchors_without_positive": ((npos_in + npos_bank) == 0).sum(),
            "mean_positives_per_anchor": npos_in.double().mean() if npos_in.numel() else zero,
            "mean_bank_positives_per_anchor": npos_bank.double().mean() if npos_bank.numel() else zero,
        }
    return loss, stats


def stats_as_numbers(stats: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The statistics as Python floats (one host synchronisation for all of them)."""
    keys = [key for key, v in stats.items() if torch.is_tensor(v)]
    out = {key: float(v) for key, v in stats.items() if not torch.is_tensor(v)}
    if keys:
        vals = torch.stack([stats[key].detach().to(torch.float64).reshape(()) for key in keys]).cpu().tolist()
        out.update(zip(keys, vals))
    return out
