"""Step-2 segmentation heads of CAUSE (MLP and TR), projection head and EMA teacher.

Token convention: heads take backbone tokens ``t (B, N, c)`` (``N = h*w``, row-major) and return
``(B, N, r)`` (``r = 90``). Dropout lives inside the heads (``nn.Dropout(0.1)``, element-wise as
in the official code); it is active in ``train()`` mode -- the official teacher also runs with
dropout -- and absent in ``eval()``.

* :class:`MLPHead` -- CAUSE-MLP (= STEGO head, reference §6.2):
  ``y = f1(drop(t)) + f2(drop(t))``, ``f1 = Linear(c, r)``, ``f2 = Linear(c, c) -> ReLU -> Linear(c, r)``,
  the two ``drop`` calls draw independent masks. The official code uses 1x1 convolutions; their
  weights map to these linears by dropping the trailing ``(1, 1)``.
* :class:`TRHead` -- CAUSE-TR (paper Eq. 8, App. B.2; official ``Decoder``/``TRDecoder``, §6.3): one
  post-norm transformer decoder layer with concept queries, then the same ``f1 + f2`` reduction.
* :class:`ProjectionHead` -- per-token ``Linear(r, 2048)`` (official 1x1 conv with bias).
* :func:`make_teacher`, :func:`ema_update` -- the EMA teacher (§6.8).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contrastive import assign_concepts

__all__ = [
    "MLPHead",
    "TRHead",
    "ProjectionHead",
    "MultiheadAttention",
    "concept_queries",
    "interpolate_pos",
    "make_teacher",
    "ema_decay",
    "ema_update",
]


def _reduce(u: torch.Tensor, f1: nn.Module, f2: nn.Module, drop: nn.Module) -> torch.Tensor:
    """``f1(drop(u)) + f2(drop(u))`` with two independent dropout draws (official ``HeadSegment``)."""
    return f1(drop(u)) + f2(drop(u))


def _reduction(in_dim: int, out_dim: int) -> tuple[nn.Linear, nn.Sequential]:
    f1 = nn.Linear(in_dim, out_dim)
    f2 = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))
    return f1, f2


class MLPHead(nn.Module):
    """CAUSE-MLP head: ``y = f1(drop(t)) + f2(drop(t))`` (reference §6.2; STEGO's head).

    Args:
        in_dim: ``c``, backbone width.
        out_dim: ``r`` (90).
        dropout: probability of the element-wise input dropout (0.1).

    ``forward(t (..., c)) -> (..., r)``; per token, so sub-sampling tokens before or after the head
    gives the same result.
    """

    def __init__(self, in_dim: int, out_dim: int = 90, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.f1, self.f2 = _reduction(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] != self.in_dim:
            raise ValueError(f"MLPHead: expected tokens (..., {self.in_dim}), got {tuple(t.shape)}")
        return _reduce(t, self.f1, self.f2, self.dropout)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention on ``F.scaled_dot_product_attention``.

    Same parameters and names as ``nn.MultiheadAttention`` (``in_proj_weight (3c, c)``,
    ``in_proj_bias (3c,)``, ``out_proj.weight/bias``), the same initialisation and the same
    maths (scale ``1/sqrt(c/heads)``, dropout on the attention weights in training), so official
    (sequence-first ``nn.MultiheadAttention``) weights load unchanged.
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = int(embed_dim), int(num_heads), float(dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """``query (B, Nq, c)``, ``key``/``value (B, Nk, c)`` -> ``(B, Nq, c)``."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        h = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(-1, (h, -1)).transpose(1, 2)  # (B, h, N, c/h)

        q, k, v = split(F.linear(query, wq, bq)), split(F.linear(key, wk, bk)), split(F.linear(value, wv, bv))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).flatten(-2))


def concept_queries(t: torch.Tensor, codebook: torch.Tensor, concepts: torch.Tensor | None = None) -> torch.Tensor:
    """Concept queries of CAUSE-TR (paper Eq. 8): ``Q_i = M[argmax_m cos(t_i, m)]``.

    Returns the **raw** (un-normalised) codebook rows, as the official code does; ``concepts``
    (the argmax indices, ``(B, N)``) may be passed to skip the cosine argmax. No gradient flows
    into the codebook.
    """
    if codebook.dim() != 2 or codebook.shape[1] != t.shape[-1]:
        raise ValueError(f"TRHead: codebook must be (k, {t.shape[-1]}), got {tuple(codebook.shape)}")
    if concepts is None:
        concepts = assign_concepts(t, codebook)
    if tuple(concepts.shape) != tuple(t.shape[:-1]):
        raise ValueError(f"TRHead: concepts {tuple(concepts.shape)} do not match tokens {tuple(t.shape)}")
    return codebook.detach()[concepts.to(codebook.device)].to(device=t.device, dtype=t.dtype)


def interpolate_pos(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a square-grid positional embedding ``(s*s, c)`` to ``(h*w, c)`` (bilinear).

    Identity (the same tensor) when ``(h, w) == (s, s)``. ``align_corners=False``.
    """
    n, c = pos.shape
    s = math.isqrt(n)
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (s, s) and s * s == n:
        return pos
    if s * s != n:
        raise ValueError(f"TRHead: cannot interpolate a positional embedding of {n} queries (not a square grid) "
                         f"to the token grid {h}x{w}; train and test at the same resolution")
    img = pos.reshape(1, s, s, c).permute(0, 3, 1, 2)
    out = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(h * w, c)


class TRHead(nn.Module):
    """CAUSE-TR head: one post-norm transformer decoder layer with concept queries (reference §6.3).

    For backbone tokens ``T (B, N, c)`` and the clusterbook ``M (k, c)``:

    1. ``Q = M[argmax_m cos(t, m)]`` -- raw codebook rows (paper Eq. 8; :func:`concept_queries`);
    2. ``pos (N_q, c)``, learnable, initialised ``randn`` (std 1), shared over the batch;
    3. ``u = LN1(Q + Drop(SA(q=Q+pos, k=Q+pos, v=Q)))``;
    4. ``u = LN2(u + Drop(CA(q=u+pos, k=T, v=T)))`` (no positional embedding on keys/values);
    5. ``u = u + Drop(W2 Drop(ReLU(W1 u)))`` (FFN ``c -> ffn_dim -> c``);
    6. ``u = T + LN3(u)`` (official, ``extra_residual=True``; not in the paper) or ``u = LN3(u)``;
    7. ``y = f1(drop(u)) + f2(drop(u))`` as in :class:`MLPHead`.

    Attention weights have dropout ``dropout`` (as ``nn.MultiheadAttention(dropout=0.1)``); every
    ``Drop`` above is an independent ``nn.Dropout(dropout)``. LayerNorm eps 1e-5. Parameter names
    follow ``nn.TransformerDecoderLayer``/``nn.MultiheadAttention`` (``self_attn``, ``cross_attn``,
    ``linear1``, ``linear2``, ``norm1..3``) plus ``pos``, ``f1``, ``f2``. The codebook is an
    argument of ``forward``, not a parameter (the caller stores it).

    The protocol trains and tests at the same resolution (``N = num_queries``). For another token
    grid ``(h, w)``, ``pos`` is resized bilinearly from its square ``s x s`` grid
    (:func:`interpolate_pos`) -- a convenience for inference on non-square inputs, not the protocol.
    """

    def __init__(self, in_dim: int, out_dim: int = 90, num_queries: int = 1600, ffn_dim: int = 2048,
                 dropout: float = 0.1, extra_residual: bool = True, num_heads: int = 1):
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"TRHead: num_queries must be >= 1, got {num_queries}")
        self.in_dim, self.out_dim, self.num_queries = int(in_dim), int(out_dim), int(num_queries)
        self.extra_residual = bool(extra_residual)
        self.pos = nn.Parameter(torch.randn(num_queries, in_dim))
        self.self_attn = MultiheadAttention(in_dim, num_heads, dropout)
        self.cross_attn = MultiheadAttention(in_dim, num_heads, dropout)
        self.linear1 = nn.Linear(in_dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, in_dim)
        self.norm1 = nn.LayerNorm(in_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(in_dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(in_dim, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)  # SA residual branch
        self.dropout2 = nn.Dropout(dropout)  # CA residual branch
        self.dropout3 = nn.Dropout(dropout)  # FFN residual branch
        self.ffn_dropout = nn.Dropout(dropout)  # FFN inner activation
        self.f1, self.f2 = _reduction(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)  # decoder output, before f1 / f2

    def positional(self, n: int, grid: tuple[int, int] | None) -> torch.Tensor:
        """Positional embedding for ``n`` tokens on ``grid`` (``(N_q, c)`` or interpolated)."""
        if grid is not None:
            if int(grid[0]) * int(grid[1]) != n:
                raise ValueError(f"TRHead: grid {tuple(grid)} does not match {n} tokens")
            if n == self.num_queries and math.isqrt(n) ** 2 != n:
                return self.pos
            return interpolate_pos(self.pos, grid)
        if n != self.num_queries:
            raise ValueError(f"TRHead: {n} tokens but the head was built for {self.num_queries} queries; pass "
                             f"grid=(h, w) to interpolate the positional embedding")
        return self.pos

    def forward(self, t: torch.Tensor, codebook: torch.Tensor, concepts: torch.Tensor | None = None,
                grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``t (B, N, c)``, ``codebook (k, c)`` -> ``(B, N, r)``.

        ``concepts (B, N)``: optional pre-computed ``argmax_m cos(t, m)``; ``grid = (h, w)``: the
        token grid (needed only when ``N != num_queries`` or the grid is not square).
        """
        if t.dim() != 3 or t.shape[-1] != self.in_dim:
            raise ValueError(f"TRHead: expected tokens (B, N, {self.in_dim}), got {tuple(t.shape)}")
        q = concept_queries(t, codebook, concepts)
        pos = self.positional(t.shape[1], grid).to(t.dtype).unsqueeze(0)
        qp = q + pos
        u = self.norm1(q + self.dropout1(self.self_attn(qp, qp, q)))
        u = self.norm2(u + self.dropout2(self.cross_attn(u + pos, t, t)))
        u = u + self.dropout3(self.linear2(self.ffn_dropout(F.relu(self.linear1(u)))))
        u = t + self.norm3(u) if self.extra_residual else self.norm3(u)
        return _reduce(u, self.f1, self.f2, self.dropout)


class ProjectionHead(nn.Module):
    """Per-token projection ``Linear(r, 2048)`` with bias (official 1x1 conv ``90 -> 2048``)."""

    def __init__(self, in_dim: int = 90, out_dim: int = 2048):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(y)


def make_teacher(module: nn.Module) -> nn.Module:
    """EMA teacher: a deep copy of ``module`` with ``requires_grad=False`` on every parameter (§6.8)."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def ema_decay(step: int, decay: float, warmup: bool = False) -> float:
    """EMA decay of the ``step``-th teacher update (0-based).

    Without warm-up it is the constant ``decay`` (official: 0.99 per iteration, reference §6.8). With
    warm-up it is the mean-teacher ramp ``min(decay, 1 - 1/(step + 1))`` (Tarvainen & Valpola, 2017): the
    first update copies the student and the teacher is the running mean of all student states until
    the ramp reaches ``decay`` (step 99 for 0.99). A constant 0.99 leaves ``0.99**n`` of the random
    initialisation in the teacher after ``n`` updates, half of it after 69; official schedules run
    thousands of iterations, short ones on small data sets do not.
    """
    if step < 0:
        raise ValueError(f"ema_decay: step must be >= 0, got {step}")
    if not warmup:
        return decay
    return min(decay, 1.0 - 1.0 / (step + 1))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float = 0.99) -> None:
    """EMA step ``theta_T <- decay * theta_T + (1 - decay) * theta_S`` for every parameter (§6.8).

    Buffers are copied from the student. ``teacher`` and ``student`` must have the same parameter
    and buffer names and shapes.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must lie in [0, 1], got {decay}")
    tp, sp = dict(teacher.named_parameters()), dict(student.named_parameters())
    if tp.keys() != sp.keys():
        raise ValueError(f"ema_update: teacher and student parameters differ: "
                         f"{sorted(tp.keys() ^ sp.keys())[:10]}")
    names = list(tp)
    for n in names:
        if tp[n].shape != sp[n].shape:
            raise ValueError(f"ema_update: parameter {n} has shape {tuple(tp[n].shape)} in the teacher and "
                             f"{tuple(sp[n].shape)} in the student")
    if names:
        t_list = [tp[n] for n in names]
        s_list = [sp[n].detach().to(tp[n].dtype) for n in names]
        torch._foreach_mul_(t_list, decay)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - decay)
    tb, sb = dict(teacher.named_buffers()), dict(student.named_buffers())
    if tb.keys() != sb.keys():
        raise ValueError(f"ema_update: teacher and student buffers differ: {sorted(tb.keys() ^ sb.keys())[:10]}")
    for n, buf in tb.items():
        buf.copy_(sb[n])
