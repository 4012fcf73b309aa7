"""One Step-2 iteration of CAUSE: heads, anchors, concept-wise contrastive loss, update, EMA teacher, bank.

:class:`Step2State` holds everything an iteration reads or changes (student, teacher, bank, clusterbook,
concept distances, optimiser, loss scaler, bank generator, configuration); :func:`step2_update` runs one
iteration on a batch of frozen backbone features. The maths lives elsewhere: the loss in
:mod:`causeseg.contrastive` (paper Eq. 4 and the official form), the bank in :mod:`causeseg.bank`, the heads
and the EMA in :mod:`causeseg.heads`.

Host synchronisation. Nothing in an iteration waits for the device: the loss statistics come back as 0-d
tensors (the training loop reads the loss once per iteration for its progress bar; :func:`stats_as_numbers`
converts the rest), the concept ids are not range-checked (they come from an arg-max over the clusterbook),
the bank's default update is written in a masked, fixed-shape form, and the fused bank term's Triton shift is
known on the host. What remains: the GradScaler's inf check under fp16 AMP, the all-reduces of a distributed
run, the bank's paper policy (``torch.unique`` over the concepts present) and the first call's one-time
Triton self-test.

Concept cache. With the feature cache on, an item's features are the same in every epoch, so are its
concepts ``argmax_m cos(t, m)``: :class:`ConceptCache` keeps them, ``(n_items, h*w)``, filled lazily by
dataset index (which items are filled is known on the host, so a lookup costs no synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import distributed as D
from .bank import ConceptBank
from .config import Config
from .contrastive import assign_concepts, calibrated_thresholds, concept_contrastive_loss, pair_fractions
from .features import autocast_context
from .heads import ema_decay, ema_update
from .model import run_head, tokens
from .modularity import gather_tokens
from .sampling import per_sample_grid

__all__ = ["ConceptCache", "Step2State", "phi_thresholds", "step2_update"]


class ConceptCache:
    """Concept ids of the frozen features of every item, ``(n_items, n_tokens)``, filled lazily by dataset index.

    Only valid when an item's features do not change between epochs (the feature cache is on). Stored as
    int16 when ``k <= 32768`` (int32 otherwise) on ``device``; which items are filled is a host-side array.
    """

    def __init__(self, n_items: int, n_tokens: int, num_concepts: int, device: torch.device | str):
        dtype = torch.int16 if num_concepts <= 2**15 else torch.int32
        self.ids = torch.zeros(n_items, n_tokens, dtype=dtype, device=device)
        self.filled = np.zeros(n_items, dtype=bool)

    def get(self, idx: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Concepts ``(B, n_tokens)`` long of the items ``idx`` (a host tensor); ``compute()`` gives them for the
        whole batch when one of its items is not filled yet."""
        keys = idx.cpu().numpy()
        rows = idx.to(self.ids.device)
        if self.filled[keys].all():
            return self.ids[rows].long()
        q = compute()
        self.ids[rows] = q.to(self.ids.dtype)
        self.filled[keys] = True
        return q


@dataclass
class Step2State:
    """Everything one Step-2 iteration reads or changes.

    ``student`` / ``teacher``: modules with ``.head`` and ``.projection`` (the EMA teacher has no
    gradients); ``codebook (k, c)`` the clusterbook ``M``; ``d_m (k, k)`` its concept distances;
    ``bank`` the concept bank (None without one); ``bank_gen`` the bank's random source (on its device);
    ``scaler`` a GradScaler under fp16 AMP; ``concepts`` an optional :class:`ConceptCache`; ``phi_pos`` /
    ``phi_neg`` the positive / negative thresholds on ``D_M`` (:func:`phi_thresholds`; None: ``cfg.step2``'s
    fixed ``phi_pos`` / ``phi_neg``).
    """

    cfg: Config
    student: nn.Module
    teacher: nn.Module
    codebook: torch.Tensor
    d_m: torch.Tensor
    opt: torch.optim.Optimizer
    device: torch.device
    bank: ConceptBank | None = None
    bank_gen: torch.Generator | None = None
    scaler: Any = None
    concepts: ConceptCache | None = None
    phi_pos: float | None = None
    phi_neg: float | None = None

    def __post_init__(self) -> None:
        if self.phi_pos is None:
            self.phi_pos = self.cfg.step2.phi_pos
        if self.phi_neg is None:
            self.phi_neg = self.cfg.step2.phi_neg

    def checkpoint_objects(self) -> dict[str, Any]:
        """The objects a resume needs (the concept cache is rebuilt lazily)."""
        objs: dict[str, Any] = dict(student=self.student, teacher=self.teacher, opt=self.opt, bank_gen=self.bank_gen)
        if self.bank is not None:
            objs["bank"] = self.bank
        return objs


def phi_thresholds(cfg: Config, d_m: torch.Tensor) -> tuple[float, float, str]:
    """``(phi+, phi-, description)`` of the Step-2 positive / negative rule (``step2.phi_rule``).

    ``fixed``: ``step2.phi_pos`` / ``step2.phi_neg`` as configured. ``quantile``: calibrated on the clusterbook's
    own concept distances ``D_M`` (:func:`causeseg.contrastive.calibrated_thresholds`) so that
    ``step2.phi_pos_frac`` of the concept pairs are positive and ``step2.phi_neg_frac`` negative. The description
    (for the log) names the rule and the fractions of concept pairs the thresholds make positive / negative.
    """
    s = cfg.step2
    if s.phi_rule == "quantile":
        phi_pos, phi_neg = calibrated_thresholds(d_m, s.phi_pos_frac, s.phi_neg_frac)
        return phi_pos, phi_neg, (f"quantile rule: {100 * s.phi_pos_frac:g} % positive, "
                                  f"{100 * s.phi_neg_frac:g} % negative pairs")
    pos, neg = pair_fractions(d_m, s.phi_pos, s.phi_neg)
    return s.phi_pos, s.phi_neg, f"fixed rule: {100 * pos:.1f} % positive, {100 * neg:.1f} % negative pairs"


def _concepts(state: Step2State, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` concept of every token on the backbone features (from the cache when there is one)."""
    if state.concepts is None:
        return assign_concepts(t, state.codebook)
    return state.concepts.get(idx, lambda: assign_concepts(t, state.codebook))


def _projections(state: Step2State, t: torch.Tensor, q: torch.Tensor, grid: torch.Tensor,
                 hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Student anchors ``a`` and teacher candidates ``z`` ``(B, n, d)`` at the sampled tokens, in the autocast
    dtype (bf16 under AMP: the bank term runs its matmuls in it; the loss upcasts what it needs)."""
    s, student, teacher = state.cfg.step2, state.student, state.teacher
    student.train()
    teacher.train()  # official: the teacher runs with dropout active
    with autocast_context(state.device, state.cfg.run.amp):
        if s.head == "tr":  # the decoder needs the whole grid; sample afterwards
            ys = gather_tokens(run_head(student.head, t, state.codebook, hw, q), grid)
            with torch.no_grad():
                yt = gather_tokens(run_head(teacher.head, t, state.codebook, hw, q), grid)
        else:  # per-token MLP: sample first (equivalent, cheaper)
            ts = gather_tokens(t, grid)
            ys = student.head(ts)
            with torch.no_grad():
                yt = teacher.head(ts)
        a = student.projection(ys)
        with torch.no_grad():
            z = teacher.projection(yt)
    return a, z


def _apply_gradients(state: Step2State, objective: torch.Tensor) -> None:
    """Backward, gradient all-reduce, (un)scaling, clipping of the head's gradients, optimiser step."""
    s, opt, scaler = state.cfg.step2, state.opt, state.scaler
    opt.zero_grad(set_to_none=True)
    (scaler.scale(objective) if scaler is not None else objective).backward()
    D.average_gradients(state.student.parameters())  # before unscale_: all ranks see the same inf/NaN
    if scaler is not None:
        scaler.unscale_(opt)
    if s.grad_clip and s.grad_clip > 0:  # covers the unsupervised head only
        torch.nn.utils.clip_grad_norm_(state.student.parameters(), s.grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


def step2_update(state: Step2State, feats: torch.Tensor, idx: torch.Tensor, epoch: int,
                 ema_step: int = 0) -> dict[str, torch.Tensor]:
    """One Step-2 iteration on backbone features ``feats (B, c, h, w)`` of the items ``idx`` (host tensor).

    ``ema_step`` is the number of EMA updates done before this one (it sets the decay under
    ``step2.ema_warmup``). Returns the loss and the statistics of
    :func:`causeseg.contrastive.concept_contrastive_loss` as detached 0-d tensors (no host synchronisation).
    """
    cfg, s = state.cfg, state.cfg.step2
    b, _, h, w = feats.shape
    t = tokens(feats)
    q = _concepts(state, t, idx)
    grid = per_sample_grid(idx, h, w, s.grid, seed=cfg.run.seed, stage="step2", epoch=epoch, device=state.device)
    qs = torch.gather(q, 1, grid)
    a, z = _projections(state, t, q, grid, (h, w))
    z_all = D.all_gather_cat(z)  # the in-batch candidates are the global batch's teacher features
    q_all = D.all_gather_cat(qs)
    ctx = D.current()
    use_bank = state.bank is not None and s.use_bank
    loss, stats = concept_contrastive_loss(
        a, z_all, qs, q_all, state.d_m, bank=state.bank.tensors() if use_bank else None,
        tau=s.tau, phi_pos=state.phi_pos, phi_neg=state.phi_neg, form=s.loss_form, chunk_size=s.loss_chunk,
        bank_impl=s.bank_impl, anchor_offset=ctx.rank * b if ctx.enabled else 0, validate=False,
    )
    # distributed: weight so the averaged gradient is that of the global mean over all ranks' terms
    _apply_gradients(state, loss * D.global_mean_factor(stats["terms_used"]) if ctx.enabled else loss)
    ema_update(state.teacher, state.student, ema_decay(ema_step, s.ema, s.ema_warmup))
    if use_bank:
        state.bank.update(q_all.reshape(-1), z_all.reshape(-1, z_all.shape[-1]), generator=state.bank_gen,
                          validate=False)
    return {"loss": loss.detach(), **stats}
