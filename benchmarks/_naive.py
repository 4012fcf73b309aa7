"""Naive references for the speed benchmark, written clean-room after the STRUCTURE of the official code.

Nothing here is used by causeseg itself. These functions reproduce how the official CAUSE code organises
the work (cause-reference.md §5.2, §6.4-6.9, §13), so that ``benchmarks/speed.py`` can compare
causeseg's implementation against it on the same hardware:

* Step 1 (``naive_step1_loss``): the pair weight ``delta_ij = max_m tanh(C_im C_jm / tau)`` is taken
  over a materialised ``(B, k, n, n)`` tensor (official ``compute_modularity_based_codebook``);
* Step 2 bank (``NaiveBank``): a dict {concept -> tensor (n_m, d)} of teacher projections; every
  iteration ``compute`` rebuilds the flat bank by ``torch.cat`` inside a Python loop over all k
  concepts (quadratic copying, defect D8) and ``update`` loops over the concepts present in the batch
  (random half of the new features kept, FIFO of at most ``capacity``);
* Step 2 loss (``naive_contrastive_loss``): a per-image Python loop; in-batch and bank terms with their
  own SupCon-like denominators, concept distance computed on the fly from the normalised assigned
  codebook rows, mean over the list of per-image terms;
* Step 2 update (``naive_step2_update``): heads on the full grid (TR) or on the sampled tokens (MLP),
  bank rebuild, loss, backward, clip, Adam, EMA with a per-parameter loop, bank update;
* Step 3 (``naive_step3_update``): teacher head, then the Step-1 objective with k = C on a
  materialised ``(B, C, n, n)`` tensor.

Two deliberate departures, neither of which changes the amount of work: the supervised linear probe
of the official Steps 2-3 is left out (causeseg has no probe in its unsupervised steps; its cost is
one 1x1 conv), and a per-image term without any positive pair is dropped instead of producing
``mean([]) = NaN`` (defect D7), so that a long timing run cannot corrupt the weights with NaNs.
The heads themselves are causeseg's (``MLPHead``/``TRHead``): the comparison isolates the
modularity, bank, loss and EMA code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "naive_sample_grid",
    "naive_step1_loss",
    "NaiveBank",
    "naive_contrastive_loss",
    "naive_ema",
    "naive_step2_update",
    "naive_step3_update",
]


def naive_sample_grid(b: int, h: int, w: int, window: int, device: torch.device) -> torch.Tensor:
    """One random position per ``window x window`` block, drawn on ``device`` -> (B, n) flat indices."""
    gh, gw = h // window, w // window
    off = torch.randint(0, window * window, (b, gh * gw), device=device)
    blk = torch.arange(gh * gw, device=device)
    rows = (blk // gw) * window + off // window
    cols = (blk % gw) * window + off % window
    return rows * w + cols


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def naive_step1_loss(x: torch.Tensor, m: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Official-structure Step-1 loss: ``-mean_b (1/e) sum_ij W_ij max_m tanh(C_im C_jm / tau)``.

    ``x (B, n, c)`` sampled tokens, ``M (k, c)``. Materialises ``(B, k, n, n)``.
    """
    xn = F.normalize(x, dim=-1)
    a = (xn @ xn.transpose(1, 2)).clamp_min(0)
    a = a * (1 - torch.eye(a.shape[-1], device=a.device, dtype=a.dtype))
    d = a.sum(-1, keepdim=True)
    e = a.sum((-1, -2), keepdim=True)
    w = a - d @ d.transpose(1, 2) / e
    c = (xn @ F.normalize(m, dim=-1).t()).clamp_min(0).transpose(1, 2)  # (B, k, n)
    delta = torch.tanh(c.unsqueeze(-1) * c.unsqueeze(-2) / tau).max(1).values  # (B, k, n, n) -> (B, n, n)
    h = (w * delta).sum((-1, -2)) / e.reshape(-1)
    return -h.mean()


class NaiveBank:
    """Dict-of-tensors concept bank, rebuilt by ``torch.cat`` in a loop over all concepts each iteration."""

    def __init__(self, k: int, capacity: int = 100, keep: float = 0.5):
        self.k = k
        self.capacity = capacity
        self.keep = keep
        self.store: dict[int, torch.Tensor] = {}

    def fill_random(self, dim: int, device: torch.device, generator: torch.Generator | None = None) -> None:
        """Every concept at capacity (the state of the official bank after a few hundred iterations)."""
        for m in range(self.k):
            self.store[m] = torch.randn(self.capacity, dim, device=device, generator=generator)

    def size(self) -> int:
        return sum(int(v.shape[0]) for v in self.store.values())

    def compute(self, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Flat normalised bank (sum n_m, d) and the normalised owning concept vectors (sum n_m, c)."""
        feats: torch.Tensor | None = None
        owners: torch.Tensor | None = None
        for m in range(self.k):  # official: torch.cat inside a k-step Python loop
            entry = self.store.get(m)
            if entry is None or entry.shape[0] == 0:
                continue
            own = codebook[m].unsqueeze(0).expand(entry.shape[0], -1)
            feats = entry if feats is None else torch.cat([feats, entry], 0)
            owners = own if owners is None else torch.cat([owners, own], 0)
        if feats is None or owners is None:
            return None
        return F.normalize(feats, dim=-1), F.normalize(owners, dim=-1)

    @torch.no_grad()
    def update(self, concepts: torch.Tensor, proj: torch.Tensor) -> None:
        """For each concept present: keep a random half of its new features, append, keep the last ``capacity``."""
        for m in torch.unique(concepts).tolist():
            new = proj[concepts == m]
            n_keep = int(len(new) * self.keep)
            if n_keep == 0:
                continue
            new = new[torch.randperm(len(new), device=new.device)[:n_keep]].float()
            old = self.store.get(m)
            cat = new if old is None else torch.cat([old, new], 0)
            self.store[m] = cat[-self.capacity:]


def _supcon_term(s: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor | None:
    """Mean over positive pairs of ``-s_ij + log sum_{Pos u Neg} exp(s_ij')``; None without positives."""
    if not bool(pos.any()):
        return None
    s = s - s.max(dim=1, keepdim=True).values.detach()
    denom = torch.log((torch.exp(s) * (pos | neg)).sum(1, keepdim=True) + 1e-12)
    return (denom - s)[pos].mean()


def naive_contrastive_loss(
    anchors: torch.Tensor,
    cands: torch.Tensor,
    q_anchor: torch.Tensor,
    q_cand: torch.Tensor,
    codebook_n: torch.Tensor,
    bank: tuple[torch.Tensor, torch.Tensor] | None,
    tau: float = 0.07,
    phi_pos: float = 0.3,
    phi_neg: float = 0.1,
) -> torch.Tensor:
    """Per-image loop of the official concept-wise contrastive loss (SupCon-like form).

    ``anchors (B, n, d)`` student projections, ``cands (B, n, d)`` teacher projections,
    ``q_anchor``/``q_cand (B, n)`` concepts, ``codebook_n (k, c)`` normalised codebook rows,
    ``bank`` = (normalised features (U, d), normalised owner rows (U, c)) or None.
    """
    b, n, d = anchors.shape
    z = F.normalize(cands.detach().reshape(-1, d), dim=-1)
    zc = codebook_n[q_cand.reshape(-1)]
    terms: list[torch.Tensor] = []
    for i in range(b):  # official: Python loop over the images of the batch
        a = F.normalize(anchors[i], dim=-1)
        ac = codebook_n[q_anchor[i]]
        s = a @ z.t() / tau
        dist = ac @ zc.t()
        pos = dist > phi_pos
        neg = dist < phi_neg
        self_idx = torch.arange(n, device=a.device)
        pos[self_idx, i * n + self_idx] = False
        neg[self_idx, i * n + self_idx] = False
        t = _supcon_term(s, pos, neg)
        if t is not None:
            terms.append(t)
        if bank is not None:
            bf, bo = bank
            sb = a @ bf.t().to(a.dtype) / tau
            db = ac @ bo.t()
            t = _supcon_term(sb, db > phi_pos, db < phi_neg)
            if t is not None:
                terms.append(t)
    if not terms:
        return 0.0 * anchors.sum()
    return torch.stack(terms).mean()


@torch.no_grad()
def naive_ema(teacher: nn.Module, student: nn.Module, decay: float = 0.99) -> None:
    """Per-parameter Python loop: ``theta_T <- decay theta_T + (1 - decay) theta_S``."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.data = decay * pt.data + (1 - decay) * ps.data


def naive_step2_update(
    student: nn.Module,
    teacher: nn.Module,
    bank: NaiveBank,
    codebook: torch.Tensor,
    feats: torch.Tensor,
    opt: torch.optim.Optimizer,
    *,
    head_kind: str,
    run_head: Any,
    autocast: Any,
    grid: int = 4,
    grad_clip: float = 2.0,
    ema: float = 0.99,
) -> float:
    """One Step-2 iteration in the official order (§6.9), with the naive bank and per-image loss loop.

    ``student``/``teacher`` have ``.head`` and ``.projection``; ``run_head(head, t, codebook, (h, w), q)``
    applies a head to tokens; ``autocast`` is a zero-argument callable returning the AMP context.
    """
    b, c, h, w = feats.shape
    t = feats.flatten(2).transpose(1, 2)
    cb_n = F.normalize(codebook, dim=-1)
    with torch.no_grad():
        q = (F.normalize(t, dim=-1) @ cb_n.t().to(t.dtype)).argmax(-1)  # (B, N)
    idx = naive_sample_grid(b, h, w, grid, feats.device)
    qs = torch.gather(q, 1, idx)
    student.train()
    teacher.train()
    with autocast():
        if head_kind == "tr":
            ys = _gather(run_head(student.head, t, codebook, (h, w), q), idx)
            with torch.no_grad():
                yt = _gather(run_head(teacher.head, t, codebook, (h, w), q), idx)
        else:
            ts = _gather(t, idx)
            ys = student.head(ts)
            with torch.no_grad():
                yt = teacher.head(ts)
        a = student.projection(ys)
        with torch.no_grad():
            z = teacher.projection(yt)
    a, z = a.float(), z.float()
    flat_bank = bank.compute(cb_n)
    loss = naive_contrastive_loss(a, z, qs, qs, cb_n, flat_bank)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip)
    opt.step()
    naive_ema(teacher, student, ema)
    bank.update(qs.reshape(-1), z.reshape(-1, z.shape[-1]))
    return float(loss.item())


def naive_step3_update(
    teacher_head: nn.Module,
    centroids: nn.Parameter,
    codebook: torch.Tensor,
    feats: torch.Tensor,
    opt: torch.optim.Optimizer,
    *,
    run_head: Any,
    autocast: Any,
    grid: int = 4,
    tau: float = 0.1,
) -> float:
    """One Step-3 iteration: teacher head (dropout on), Step-1 objective with k = C on a (B, C, n, n) tensor."""
    b, c, h, w = feats.shape
    t = feats.flatten(2).transpose(1, 2)
    teacher_head.train()
    with torch.no_grad(), autocast():
        y = run_head(teacher_head, t, codebook, (h, w))
    idx = naive_sample_grid(b, h, w, grid, feats.device)
    loss = naive_step1_loss(_gather(y.float(), idx).detach(), centroids, tau)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.item())
