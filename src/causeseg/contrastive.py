"""Step 2 of CAUSE: concept-wise contrastive learning (paper Eq. 4 and the official variant).

Every sampled token ``i`` (anchor) gets a concept ``q(i) = argmax_m cos(t_i, m)`` from the
clusterbook ``M`` on its *backbone* feature ``t_i`` (:func:`assign_concepts`). The concept distance
of two tokens is ``D_ij = D_M[q(i), q(j)]`` with ``D_M = cos(M, M)`` (:func:`concept_distance`).
A pair is positive if ``D > phi+`` (0.3), negative if ``D < phi-`` (0.1), ignored in between
(:func:`concept_masks`); same concept gives ``D = 1``.

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
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .bank_lse import bank_logsumexp

__all__ = [
    "FORMS",
    "BANK_IMPLS",
    "concept_distance",
    "assign_concepts",
    "concept_masks",
    "concept_contrastive_loss",
]

FORMS = ("official", "paper")
#: how the official-form bank log-sum-exp is computed (:func:`causeseg.bank_lse.bank_logsumexp`; "reference" =
#: the plain fp32 masked log-sum-exp over materialised ``(rows x k*b)`` logits, kept for comparison)
BANK_IMPLS = ("auto", "torch", "triton", "reference")

#: elements of the (tokens x k) similarity temporary of :func:`assign_concepts` (64 MB in fp32)
_ASSIGN_CHUNK_ELEMENTS = 2**24


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


def _pair_losses(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, form: str) -> torch.Tensor:
    """Per anchor row: ``sum_{j in Pos_i} l_ij`` for logits ``s (R, Q)`` and masks ``(R, Q)``."""
    if form == "official":
        lse, _ = _masked_logsumexp(s, pos | neg)
        npos = pos.sum(-1).to(s.dtype)
        spos = torch.where(pos, s, torch.zeros_like(s)).sum(-1)
        return npos * lse - spos  # npos = 0 -> exactly 0 (lse is finite)
    lse_neg, has_neg = _masked_logsumexp(s, neg)
    # Eq. 4: -log(e^s / (e^s + sum_neg e^s')) = softplus(lse_neg - s); = 0 when Neg_i is empty
    per_pair = F.softplus(lse_neg.unsqueeze(-1) - s)
    return torch.where(pos & has_neg.unsqueeze(-1), per_pair, torch.zeros_like(per_pair)).sum(-1)


def _bank_positive_sum(a: torch.Tensor, p_con: torch.Tensor, flat: torch.Tensor, valid: torch.Tensor,
                       inv_norm: torch.Tensor, tau: float, dt: torch.dtype) -> torch.Tensor:
    """``sum_{j in Pos_i} s_ij = a_i . (P_i @ S) / tau`` per anchor, ``S_m = sum_slot valid z_{m,slot} / ||z||``.

    ``flat (k*b, d)`` in its storage dtype: a low-precision bank is reduced in its own dtype (fp32
    accumulation inside ``bmm``), so no fp32 copy of the bank is made; the result is in ``dt``.
    """
    k, nb = valid.shape
    w = (valid.to(dt) * inv_norm.reshape(k, nb).to(dt)).unsqueeze(1)  # (k, 1, b)
    s_con = torch.bmm(w.to(flat.dtype), flat.reshape(k, nb, -1)).squeeze(1).to(dt)  # (k, d), no bank-sized temporary
    return (a * (p_con.to(dt) @ s_con)).sum(-1) / tau


def _rowwise(fn: Callable[..., torch.Tensor], a: torch.Tensor, extra: tuple[torch.Tensor, ...],
             chunk_size: int | None) -> torch.Tensor:
    """Apply ``fn(a_rows, *extra_rows) -> (rows,)`` over chunks of anchor rows.

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


def concept_contrastive_loss(
    anchors: torch.Tensor,
    cands: torch.Tensor,
    anchor_c: torch.Tensor,
    cand_c: torch.Tensor,
    d_m: torch.Tensor,
    *,
    bank: torch.Tensor | None = None,
    bank_valid: torch.Tensor | None = None,
    tau: float = 0.07,
    phi_pos: float = 0.3,
    phi_neg: float = 0.1,
    form: str = "official",
    exclude_self: bool = True,
    chunk_size: int | None = None,
    anchor_offset: int = 0,
    bank_impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Concept-wise contrastive loss of CAUSE Step 2 (paper Eq. 4 / official SupCon-like form).

    Args:
        anchors: ``(B, n, d)`` student projections (receive the gradient).
        cands: ``(Bc, nc, d)`` teacher projections of the in-batch candidates (detached here).
            Usually ``Bc = B`` and ``nc = n``; in distributed runs the all-gathered global batch.
        anchor_c: ``(B, n)`` concepts of the anchors (:func:`assign_concepts` on backbone tokens).
        cand_c: ``(Bc, nc)`` concepts of the candidates.
        d_m: ``(k, k)`` concept distance matrix (:func:`concept_distance`).
        bank: optional ``(k, b, d)`` concept bank of teacher projections (ring-buffer layout:
            row ``m`` holds concept ``m``'s entries; detached here; cast to the anchors' dtype).
        bank_valid: optional ``(k, b)`` bool mask of filled slots (default: all valid).
        tau: temperature of ``s_ij = a_i . z_j / tau`` (0.07).
        phi_pos, phi_neg: positive if ``D > phi_pos``, negative if ``D < phi_neg`` (0.3 / 0.1).
        form: ``"official"`` -- ``l_ij = -s_ij + log sum_{Pos_i u Neg_i} exp(s_ij')``;
            ``"paper"`` (Eq. 4) -- ``l_ij = -log(exp(s_ij) / (exp(s_ij) + sum_{Neg_i} exp(s_ij')))``.
        exclude_self: remove the self pair (anchor ``(b, i)`` vs candidate ``(b + anchor_offset, i)``)
            from the in-batch positives and negatives; requires ``nc == n``.
        chunk_size: if given, anchors are processed ``chunk_size`` rows at a time under
            activation checkpointing, so the peak memory of a term is about
            ``chunk_size x (number of candidates)`` logits plus masks (for the bank term
            ``chunk_size x k*b``) instead of ``B*n x (number of candidates)``. Same result. The fused
            bank term (``bank_impl`` other than ``"reference"``) takes it as its rows per chunk and
            keeps no logits for the backward pass; by default it bounds its chunks itself.
        anchor_offset: index of the anchors' first image inside ``cands`` (distributed: rank * B).
        bank_impl: official form only -- how the bank log-sum-exp is computed: ``"auto"`` / ``"torch"`` /
            ``"triton"`` use :func:`causeseg.bank_lse.bank_logsumexp` (no ``(rows x k*b)`` mask, matmuls in
            the anchors' dtype when that is fp16/bf16, fp32 log-sum-exp, ``chunk_size`` = its
            ``block_rows``); ``"reference"`` the plain masked log-sum-exp over materialised fp32 logits
            (chunked with checkpointing by ``chunk_size``). The paper form always uses the latter.

    Precision: the in-batch term, the positive sums and the loss are computed in fp32 (fp64 for fp64
    anchors) whatever the anchors' dtype; with fp16/bf16 anchors (AMP) the official bank term's matmuls
    run in that dtype (the bank is cast to it unless stored so) with fp32 accumulation and log-sum-exp.

    Returns:
        ``(loss, stats)``. ``loss`` = mean of the available per-image terms
        ``[L_1^in, L_1^bank, ..., L_B^in, L_B^bank]``, each the mean of ``l_ij`` over that image's
        positive pairs; terms without a positive pair are dropped (never NaN); with no term at all
        the loss is ``0 * anchors.sum()`` (zero, differentiable). ``stats`` (Python numbers):
        ``terms_used``, ``terms_dropped`` (bank terms are considered only when the bank holds a
        valid entry), ``anchors_without_positive`` (no positive in any term),
        ``mean_positives_per_anchor`` (in-batch), ``mean_bank_positives_per_anchor``.

    For the official form the bank term uses the ``(k, b, d)`` layout: the positive sum
    ``sum_{j in Pos_i} s_ij = a_i . (P_i @ S) / tau`` with ``S_m = sum_slot valid z_{m,slot}`` and
    ``P_i = [D_M[q_i] > phi_pos]``, so only the log-sum-exp needs the ``(B*n) x (k*b)`` logits, and
    :func:`causeseg.bank_lse.bank_logsumexp` computes it chunk by chunk (or tile by tile) without keeping
    them. Bank entries are normalised through their norms (the bank is never copied normalised).
    """
    if form not in FORMS:
        raise ValueError(f"concept_contrastive_loss: form must be one of {FORMS}, got {form!r}")
    if bank_impl not in BANK_IMPLS:
        raise ValueError(f"concept_contrastive_loss: bank_impl must be one of {BANK_IMPLS}, got {bank_impl!r}")
    if tau <= 0:
        raise ValueError(f"concept_contrastive_loss: tau must be > 0, got {tau}")
    if phi_neg > phi_pos:
        raise ValueError(f"concept_contrastive_loss: phi_neg ({phi_neg}) must not exceed phi_pos ({phi_pos})")
    if anchors.dim() != 3 or cands.dim() != 3 or anchors.shape[-1] != cands.shape[-1]:
        raise ValueError(f"concept_contrastive_loss: expected anchors (B, n, d) and cands (Bc, nc, d), got "
                         f"{tuple(anchors.shape)} and {tuple(cands.shape)}")
    bsz, n, dim = anchors.shape
    bc, nc, _ = cands.shape
    if tuple(anchor_c.shape) != (bsz, n) or tuple(cand_c.shape) != (bc, nc):
        raise ValueError(f"concept_contrastive_loss: anchor_c {tuple(anchor_c.shape)} / cand_c "
                         f"{tuple(cand_c.shape)} do not match anchors {tuple(anchors.shape)} / cands "
                         f"{tuple(cands.shape)}")
    if d_m.dim() != 2 or d_m.shape[0] != d_m.shape[1]:
        raise ValueError(f"concept_contrastive_loss: D_M must be (k, k), got {tuple(d_m.shape)}")
    k = d_m.shape[0]
    for name, q in (("anchor_c", anchor_c), ("cand_c", cand_c)):
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= k):
            raise ValueError(f"concept_contrastive_loss: {name} holds concepts outside [0, {k})")
    if exclude_self:
        if nc != n:
            raise ValueError(f"concept_contrastive_loss: exclude_self needs as many candidates per image as "
                             f"anchors (n={n}, nc={nc}); pass exclude_self=False otherwise")
        if anchor_offset < 0 or anchor_offset + bsz > bc:
            raise ValueError(f"concept_contrastive_loss: anchor_offset {anchor_offset} + B {bsz} exceeds the "
                             f"{bc} candidate images")

    dev = anchors.device
    dt = torch.promote_types(anchors.dtype, torch.float32)  # in-batch term, positives and loss: >= fp32
    low = anchors.dtype if anchors.dtype in (torch.float16, torch.bfloat16) else dt  # fast bank term matmuls
    d_m = d_m.to(device=dev)
    a = F.normalize(anchors.reshape(bsz * n, dim).to(dt), dim=-1)  # (A, d)
    qa = anchor_c.reshape(-1).to(dev)
    img = torch.arange(bsz, device=dev).repeat_interleave(n)

    # ---------------------------------------------------------------- in-batch term
    z = F.normalize(cands.detach().reshape(bc * nc, dim).to(dt), dim=-1)  # (Q, d)
    qz = cand_c.reshape(-1).to(dev)
    if exclude_self:
        self_idx = (img + anchor_offset) * nc + torch.arange(n, device=dev).repeat(bsz)
    else:
        self_idx = torch.full((bsz * n,), -1, dtype=torch.long, device=dev)
    cand_pos = torch.arange(bc * nc, device=dev)

    def in_batch(a_rows: torch.Tensor, q_rows: torch.Tensor, self_rows: torch.Tensor) -> torch.Tensor:
        s = a_rows @ z.t() / tau
        pos, neg = concept_masks(q_rows, qz, d_m, phi_pos, phi_neg)
        keep = cand_pos.unsqueeze(0) != self_rows.unsqueeze(1)
        return _pair_losses(s, pos & keep, neg & keep, form)

    with torch.no_grad():  # positives per anchor, chunked like the loss
        step = chunk_size or max(1, bsz * n)
        npos_in = torch.cat([
            (concept_masks(qa[s:s + step], qz, d_m, phi_pos, phi_neg)[0]
             & (cand_pos.unsqueeze(0) != self_idx[s:s + step].unsqueeze(1))).sum(-1)
            for s in range(0, bsz * n, step)]) if bsz * n else torch.zeros(0, dtype=torch.long, device=dev)
    sum_in = _rowwise(in_batch, a, (qa, self_idx), chunk_size)  # (A,)
    terms_sum = [sum_in.reshape(bsz, n).sum(1)]
    terms_cnt = [npos_in.reshape(bsz, n).sum(1)]
    npos_bank = torch.zeros_like(npos_in)

    # ---------------------------------------------------------------- bank term
    if bank is not None:
        if bank.dim() != 3 or bank.shape[0] != k or bank.shape[2] != dim:
            raise ValueError(f"concept_contrastive_loss: bank must be (k={k}, b, d={dim}), got {tuple(bank.shape)}")
        nb = bank.shape[1]
        valid = (torch.ones(k, nb, dtype=torch.bool, device=dev) if bank_valid is None
                 else bank_valid.to(device=dev, dtype=torch.bool))
        if tuple(valid.shape) != (k, nb):
            raise ValueError(f"concept_contrastive_loss: bank_valid must be ({k}, {nb}), got {tuple(valid.shape)}")
        if bool(valid.any()):
            p_con, n_con = concept_masks(qa, torch.arange(k, device=dev), d_m, phi_pos, phi_neg)  # (A, k)
            cnt = valid.sum(1).to(torch.float32)  # exact counts (< 2**24)
            npos_bank = (p_con.to(torch.float32) @ cnt).round().long()
            if form == "official" and bank_impl != "reference":
                # fast path: lse over Pos u Neg without (rows x k*b) masks; the bank keeps its storage dtype
                zb = bank.detach().to(device=dev)
                flat = zb.reshape(k * nb, dim)
                inv_norm = 1.0 / torch.linalg.vector_norm(flat, dim=-1, dtype=dt).clamp_min(1e-12)
                lse, _ = bank_logsumexp(a, zb, p_con | n_con, valid, inv_norm.reshape(k, nb), tau, impl=bank_impl,
                                        block_rows=chunk_size, dtype=low)
                out = npos_bank.to(dt) * lse.to(dt) - _bank_positive_sum(a, p_con, flat, valid, inv_norm, tau, dt)
            else:
                flat = bank.detach().to(device=dev, dtype=dt).reshape(k * nb, dim)  # view when possible
                inv_norm = 1.0 / flat.norm(dim=-1).clamp_min(1e-12)  # F.normalize semantics

                def bank_rows(a_rows: torch.Tensor, p_rows: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
                    s = (a_rows @ flat.t()) * (inv_norm / tau).unsqueeze(0)  # (R, k*b)
                    if form == "official":  # only the log-sum-exp over Pos u Neg needs the full logits
                        union = ((p_rows | n_rows).unsqueeze(-1) & valid.unsqueeze(0)).reshape(len(a_rows), -1)
                        return _masked_logsumexp(s, union)[0]
                    pos = (p_rows.unsqueeze(-1) & valid.unsqueeze(0)).reshape(len(a_rows), -1)
                    neg = (n_rows.unsqueeze(-1) & valid.unsqueeze(0)).reshape(len(a_rows), -1)
                    return _pair_losses(s, pos, neg, form)

                out = _rowwise(bank_rows, a, (p_con, n_con), chunk_size)
                if form == "official":
                    out = npos_bank.to(dt) * out - _bank_positive_sum(a, p_con, flat, valid, inv_norm, tau, dt)
            terms_sum.append(out.reshape(bsz, n).sum(1))
            terms_cnt.append(npos_bank.reshape(bsz, n).sum(1))

    sums = torch.stack(terms_sum)  # (T, B)
    cnts = torch.stack(terms_cnt)
    used = cnts > 0
    per_term = sums / cnts.clamp_min(1).to(dt)
    n_used = int(used.sum())
    if n_used > 0:
        loss = torch.where(used, per_term, torch.zeros_like(per_term)).sum() / n_used
    else:
        loss = 0.0 * anchors.sum().to(dt)
    has_any = (npos_in + npos_bank) > 0
    stats = {
        "terms_used": n_used,
        "terms_dropped": int(used.numel()) - n_used,
        "anchors_without_positive": int((~has_any).sum()),
        "mean_positives_per_anchor": float(npos_in.double().mean()) if npos_in.numel() else 0.0,
        "mean_bank_positives_per_anchor": float(npos_bank.double().mean()) if npos_bank.numel() else 0.0,
    }
    return loss, stats
