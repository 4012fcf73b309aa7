"""Concept bank of CAUSE Step 2: per concept a FIFO of at most ``b`` stored features (ring buffer).

Paper App. B.5: ``Y_bank in R^{k x b x r}``, ``b = 100``. The official code keeps a Python dict of
per-concept tensors rebuilt with ``torch.cat`` every iteration (defect D8); here the bank is a
preallocated ring buffer ``feats (k, b, d)`` with per-concept ``count`` (number of valid entries)
and ``ptr`` (next write slot). The valid entries of concept ``m`` occupy the ``count[m]`` slots
``start, start+1, ... (mod b)`` with ``start = (ptr[m] - count[m]) mod b``, oldest first; slots
outside that range are invalid (and hold zeros). The module does not care which feature is
stored: the 2048-d teacher projections (official code) or the ``r``-d head outputs (paper); the
caller chooses ``dim``.

Two update policies (:meth:`ConceptBank.update`, called once per iteration with the concepts and
features of the sampled tokens):

* ``"official"`` (official ``bank_update``): for every concept ``m`` present with ``n_m`` new
  features, keep a uniformly random ``floor(n_m / 2)`` of them (a concept seen once adds nothing),
  in random order (the official code permutes and keeps the first half), and append them;
  the oldest entries beyond ``b`` are overwritten (= the official "append, then keep the last
  100"). If more than ``b`` are kept for one concept in one update, only the last ``b`` of them
  (in that random order) survive.
* ``"paper"`` (App. B.5, "random removal of 50 % of the bank's patch features for each concept
  prototype, followed by random sampling of 50 % new patch features"): for every concept ``m``
  *present in the update* (also one seen once), first discard a uniformly random
  ``floor(count_m / 2)`` of its stored entries (the survivors keep their relative order), then
  add ``floor(n_m / 2)`` new ones exactly as the official policy does (FIFO cap ``b``). Concepts
  absent from the update are left untouched (the paper does not say whether absent concepts are
  also thinned; thinning only the concepts that receive new features keeps a concept's bank
  from emptying while it is not observed).

The random selections are pure functions (:func:`select_new`, :func:`select_discard`) so tests
can feed the same selection to a reference implementation; :meth:`ConceptBank.update` accepts
pre-computed selections. All operations are vectorised (sorts, cumsums and scatters; no Python
loop over concepts). With the same generator state the result is identical on every call.

What the Step-2 bank term reads is kept up to date at insertion (:meth:`ConceptBank.tensors`): the inverse
norm ``1 / ||z||`` of every slot and, per concept, the sum ``S_m = sum_slot valid z_{m,slot} / ||z_{m,slot}||``
of its normalised entries (fp64, updated by the difference of the entries written and overwritten). The
update of the default (official) policy draws its selection in a masked form of fixed shape (no host
synchronisation, no data-dependent shapes), so a CUDA training step never waits for the bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["POLICIES", "BankTensors", "ConceptBank", "select_new", "select_discard", "group_ranks", "storage_dtype",
           "inverse_norms", "normalised_sums"]

POLICIES = ("official", "paper")


def storage_dtype(compute_dtype: torch.dtype | None) -> torch.dtype:
    """Storage dtype of ``feats`` for a Step-2 run whose AMP dtype is ``compute_dtype`` (None = AMP off).

    bf16 under bf16 AMP: the stored teacher projections come out of autocast in bf16, so this loses
    nothing and halves the bank's memory and the traffic of the bank term (whose matmuls run in bf16).
    fp32 otherwise (fp16's range is not trusted for unnormalised features).
    """
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_norms(feats: torch.Tensor, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """``1 / max(||z||, 1e-12)`` over the last dimension, computed in ``acc`` (``F.normalize``'s clamp)."""
    return 1.0 / torch.linalg.vector_norm(feats, dim=-1, dtype=acc).clamp_min(1e-12)


def normalised_sums(feats: torch.Tensor, valid: torch.Tensor, inv_norm: torch.Tensor) -> torch.Tensor:
    """``S_m = sum_slot valid[m, slot] z_{m,slot} inv_norm_{m,slot}`` for ``feats (k, b, d)`` -> ``(k, d)``.

    One batched matmul in the storage dtype (fp32 accumulation inside ``bmm``; no fp32 copy of a
    low-precision bank), the result in ``inv_norm``'s dtype.
    """
    acc = inv_norm.dtype
    w = (valid.to(acc) * inv_norm.reshape(valid.shape)).unsqueeze(1)  # (k, 1, b)
    return torch.bmm(w.to(feats.dtype), feats).squeeze(1).to(acc)


@dataclass(frozen=True)
class BankTensors:
    """What the Step-2 bank term reads (paper Eq. 4 / official form; see :mod:`causeseg.contrastive`).

    ``feats (k, b, d)`` entries in their storage dtype, ``valid (k, b)`` filled slots, ``inv_norm (k, b)``
    ``1 / ||z||``, ``sums (k, d)`` per-concept sums of the normalised valid entries, ``counts (k,)`` valid
    entries per concept. :meth:`ConceptBank.tensors` hands out its caches (no pass over the bank);
    :meth:`from_tensors` computes them from a plain ``(k, b, d)`` tensor.
    """

    feats: torch.Tensor
    valid: torch.Tensor
    inv_norm: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_tensors(cls, feats: torch.Tensor, valid: torch.Tensor | None = None,
                     acc: torch.dtype = torch.float32) -> "BankTensors":
        """From entries ``(k, b, d)`` and an optional ``valid (k, b)`` mask (default: all filled)."""
        feats = feats.detach()
        k, nb = feats.shape[:2]
        valid = (torch.ones(k, nb, dtype=torch.bool, device=feats.device) if valid is None
                 else valid.to(device=feats.device, dtype=torch.bool))
        inv = inverse_norms(feats, acc)
        return cls(feats, valid, inv, normalised_sums(feats, valid, inv), valid.sum(1))


def group_ranks(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of every element inside its group, for a tensor already **sorted by group**.

    ``groups (n,)`` long, non-decreasing -> ``(rank (n,), size (n,))``: ``rank[i]`` = number of
    earlier elements with the same group, ``size[i]`` = size of ``groups[i]``'s group.
    """
    n = groups.numel()
    sizes = torch.bincount(groups, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(n, device=groups.device) - starts[groups]
    return rank, sizes[groups]


def _rand(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"ConceptBank: the generator lives on {generator.device} but the data on {device}")
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float64)


def select_new(concepts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which new features enter the bank, and in which order (official ``bank_update``; App. B.5).

    For every concept ``m`` present ``n_m`` times in ``concepts (n,)``, a uniformly random
    ``floor(n_m / 2)`` of its positions are kept, in uniformly random order (= random
    permutation, keep the first half). Returns the kept positions ``(s,)`` long, grouped by
    concept in increasing concept order, each group in its append order (oldest first).
    """
    if concepts.dim() != 1:
        raise ValueError(f"select_new: concepts must be 1-D, got shape {tuple(concepts.shape)}")
    n = concepts.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=concepts.device)
    keys = _rand((n,), concepts.device, generator)
    order = torch.argsort(keys)  # random order...
    order = order[torch.argsort(concepts[order], stable=True)]  # ...grouped by concept
    rank, size = group_ranks(concepts[order], int(concepts.max()) + 1)
    return order[rank < size // 2]


def select_discard(counts: torch.Tensor, capacity: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which stored entries the paper policy discards (App. B.5: "random removal of 50 %").

    ``counts (P,)`` = number of valid entries of ``P`` concepts -> bool ``(P, capacity)`` in **age
    order** (column ``j`` = the concept's ``j``-th oldest entry): exactly ``floor(count_p / 2)``
    uniformly random columns among the first ``count_p`` are ``True``.
    """
    if counts.dim() != 1:
        raise ValueError(f"select_discard: counts must be 1-D, got shape {tuple(counts.shape)}")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > capacity):
        raise ValueError(f"select_discard: counts must lie in [0, {capacity}]")
    p = counts.numel()
    keys = _rand((p, capacity), counts.device, generator)
    age = torch.arange(capacity, device=counts.device)
    keys = torch.where(age.unsqueeze(0) < counts.unsqueeze(1), keys, torch.full_like(keys, 2.0))  # invalid last
    key_rank = torch.argsort(torch.argsort(keys, dim=1), dim=1)
    return key_rank < (counts // 2).unsqueeze(1)


class ConceptBank(nn.Module):
    """Per-concept FIFO ring buffer of stored features (see the module docstring).

    Args:
        num_concepts: ``k``, number of concepts of the clusterbook.
        capacity: ``b``, entries per concept (100).
        dim: ``d``, stored feature dimension (2048 teacher projections officially, ``r`` in the paper).
        policy: ``"official"`` or ``"paper"``.
        dtype: storage dtype of ``feats``.

    Buffers (saved by ``state_dict``, moved by ``.to``): ``feats (k, b, d)``, ``count (k,)`` long,
    ``ptr (k,)`` long. The policy is stored as extra state and checked on load.
    """

    def __init__(self, num_concepts: int, capacity: int = 100, dim: int = 2048, policy: str = "official",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if num_concepts < 1 or capacity < 1 or dim < 1:
            raise ValueError(f"ConceptBank: num_concepts, capacity and dim must be >= 1, got "
                             f"{num_concepts}, {capacity}, {dim}")
        if policy not in POLICIES:
            raise ValueError(f"ConceptBank: policy must be one of {POLICIES}, got {policy!r}")
        self.num_concepts = int(num_concepts)
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.policy = policy
        self.register_buffer("feats", torch.zeros(num_concepts, capacity, dim, dtype=dtype))
        self.register_buffer("count", torch.zeros(num_concepts, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_concepts, dtype=torch.long))
        # caches of the bank term, kept up to date at insertion (saved with the bank so a resume is exact;
        # recomputed when a checkpoint written before they existed is loaded)
        self.register_buffer("inv_norm", inverse_norms(self.feats, _acc_dtype(dtype)))
        self.register_buffer("concept_sum", torch.zeros(num_concepts, dim, dtype=torch.float64))

    # ------------------------------------------------------------------ inspection
    def extra_repr(self) -> str:
        return f"k={self.num_concepts}, capacity={self.capacity}, dim={self.dim}, policy={self.policy!r}"

    def __len__(self) -> int:
        """Total number of stored entries."""
        return int(self.count.sum())

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers in bytes."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def counts(self) -> torch.Tensor:
        """``(k,)`` number of valid entries per concept (a copy)."""
        return self.count.clone()

    def _ages(self) -> torch.Tensor:
        """``(k, b)`` age rank of every slot (0 = oldest valid entry); valid iff ``< count``."""
        b = self.capacity
        start = (self.ptr - self.count) % b
        slot = torch.arange(b, device=self.ptr.device)
        return (slot.unsqueeze(0) - start.unsqueeze(1)) % b

    def valid_mask(self) -> torch.Tensor:
        """``(k, b)`` bool, ``True`` at filled slots."""
        return self._ages() < self.count.unsqueeze(1)

    def ordered(self, m: int) -> torch.Tensor:
        """Entries of concept ``m``, oldest to newest, shape ``(count_m, d)``."""
        if not 0 <= m < self.num_concepts:
            raise IndexError(f"ConceptBank.ordered: concept {m} outside [0, {self.num_concepts})")
        c, p = int(self.count[m]), int(self.ptr[m])
        slots = (p - c + torch.arange(c, device=self.feats.device)) % self.capacity
        return self.feats[m, slots]

    def feature_sum(self) -> torch.Tensor:
        """``(k, d)`` sum of the valid entries of every concept (fp32 accumulation for low precision)."""
        acc = torch.float32 if self.feats.dtype in (torch.float16, torch.bfloat16) else self.feats.dtype
        w = self.valid_mask().to(acc).unsqueeze(1)  # (k, 1, b)
        return torch.bmm(w, self.feats.to(acc)).squeeze(1)

    def tensors(self) -> BankTensors:
        """The bank term's inputs from the caches kept at insertion (no pass over the entries)."""
        return BankTensors(self.feats, self.valid_mask(), self.inv_norm, self.concept_sum, self.count)

    @torch.no_grad()
    def _refresh(self, rows: torch.Tensor | None = None) -> None:
        """Recompute the caches of concepts ``rows`` (all when None) from the stored entries."""
        rows = torch.arange(self.num_concepts, device=self.feats.device) if rows is None else rows
        feats = self.feats[rows]
        inv = inverse_norms(feats, self.inv_norm.dtype)
        valid = self.valid_mask()[rows]
        self.inv_norm[rows] = inv
        self.concept_sum[rows] = normalised_sums(feats, valid, inv).to(torch.float64)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty the bank."""
        self.feats.zero_()
        self.count.zero_()
        self.ptr.zero_()
        self._refresh()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        caches = [prefix + "inv_norm", prefix + "concept_sum"]
        if any(key in missing_keys for key in caches):  # a bank saved before the caches existed
            for key in caches:
                if key in missing_keys:
                    missing_keys.remove(key)
            self._refresh()

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {"policy": self.policy, "capacity": self.capacity}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("policy") != self.policy or state.get("capacity") != self.capacity:
            raise ValueError(f"ConceptBank.load_state_dict: saved bank {state!r} does not match this bank "
                             f"(policy={self.policy!r}, capacity={self.capacity})")

    # ------------------------------------------------------------------ update
    def _check(self, concepts: torch.Tensor, feats: torch.Tensor, values: bool) -> None:
        if concepts.dim() != 1 or concepts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ConceptBank.update: concepts must be a 1-D integer tensor, got "
                             f"{concepts.dtype} {tuple(concepts.shape)}")
        if feats.dim() != 2 or feats.shape[0] != concepts.shape[0] or feats.shape[1] != self.dim:
            raise ValueError(f"ConceptBank.update: feats must be (n={concepts.shape[0]}, d={self.dim}), got "
                             f"{tuple(feats.shape)}")
        if values and concepts.numel() and (int(concepts.min()) < 0 or int(concepts.max()) >= self.num_concepts):
            raise ValueError(f"ConceptBank.update: concepts outside [0, {self.num_concepts})")

    @torch.no_grad()
    def update(self, concepts: torch.Tensor, feats: torch.Tensor, generator: torch.Generator | None = None, *,
               selection: torch.Tensor | None = None, discard: torch.Tensor | None = None,
               validate: bool = True) -> None:
        """Add the features of one iteration (see the module docstring for the two policies).

        Args:
            concepts: ``(n,)`` concept of every feature.
            feats: ``(n, d)`` features (detached; cast to the bank's dtype and device).
            generator: random source of the selections (must live on the bank's device).
            selection: optional pre-computed :func:`select_new` result (positions into ``concepts``,
                grouped by concept, each group in append order).
            discard: paper policy only: optional pre-computed :func:`select_discard` result for the
                concepts present (``torch.unique(concepts)``, increasing), in age order.
            validate: check that the concepts lie in ``[0, k)`` (a host synchronisation); the training
                loop passes ``False`` for concepts that come from an arg-max over the clusterbook.

        The paper policy draws ``discard`` before ``selection`` from the generator. Without ``selection``
        the official policy runs without host synchronisation (fixed shapes, masked writes).
        """
        self._check(concepts, feats, validate)
        dev = self.feats.device
        concepts = concepts.to(device=dev, dtype=torch.long)
        feats = feats.detach().to(device=dev, dtype=self.feats.dtype)
        if concepts.numel() == 0:
            return
        if self.policy == "paper":
            self._discard(torch.unique(concepts), generator, discard)
        if selection is None:  # every feature in a random order per concept; the first floor(n_m / 2) are kept
            order = torch.argsort(_rand((concepts.numel(),), dev, generator))
            order = order[torch.argsort(concepts[order], stable=True)]
            cs = concepts[order]
            start, end = self._group_bounds(cs)
            self._append(cs, feats, order, (end - start) // 2, start)
        else:
            sel = selection.to(device=dev, dtype=torch.long)
            if sel.numel() == 0:
                return
            if sel.dim() != 1 or int(sel.min()) < 0 or int(sel.max()) >= concepts.numel():
                raise ValueError("ConceptBank.update: selection must be 1-D positions into concepts")
            cs = concepts[sel]
            if bool((cs[1:] < cs[:-1]).any()):
                raise ValueError("ConceptBank.update: selection must be grouped by concept in increasing order")
            start, end = self._group_bounds(cs)
            self._append(cs, feats, sel, end - start, start)

    def _group_bounds(self, cs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(start, end)`` of every concept's group in the sorted ``cs`` (``(k,)`` each; empty groups too)."""
        ar = torch.arange(self.num_concepts, device=cs.device)
        return torch.searchsorted(cs, ar), torch.searchsorted(cs, ar, right=True)

    def _discard(self, present: torch.Tensor, generator: torch.Generator | None, discard: torch.Tensor | None) -> None:
        """Paper policy: drop ``discard`` (age order) of the ``present`` concepts and compact them."""
        b = self.capacity
        cnt = self.count[present]
        if discard is None:
            discard = select_discard(cnt, b, generator)
        discard = discard.to(device=self.feats.device, dtype=torch.bool)
        if tuple(discard.shape) != (present.numel(), b):
            raise ValueError(f"ConceptBank.update: discard must be ({present.numel()}, {b}) for the present "
                             f"concepts, got {tuple(discard.shape)}")
        age = torch.arange(b, device=self.feats.device).unsqueeze(0)
        keep = (age < cnt.unsqueeze(1)) & ~discard  # (P, b) in age order
        start = (self.ptr[present] - cnt) % b
        slot_of_age = (start.unsqueeze(1) + age) % b  # (P, b)
        perm = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept ages first, in order
        src = torch.gather(slot_of_age, 1, perm)
        rows = self.feats[present]  # (P, b, d)
        rows = torch.gather(rows, 1, src.unsqueeze(-1).expand(-1, -1, self.dim))
        new_cnt = keep.sum(1)
        rows = rows * (age < new_cnt.unsqueeze(1)).unsqueeze(-1).to(rows.dtype)  # invalid slots hold zeros
        self.feats[present] = rows
        self.count[present] = new_cnt
        self.ptr[present] = new_cnt % b
        self._refresh(present)

    def _append(self, cs: torch.Tensor, feats: torch.Tensor, src: torch.Tensor, kept: torch.Tensor,
                start: torch.Tensor) -> None:
        """FIFO-append, per concept ``m``, the first ``kept[m]`` of its elements to its ring (fixed shapes).

        ``cs (s,)`` concepts grouped in increasing order, ``src (s,)`` the rows of ``feats`` in append order,
        ``kept (k,)``, ``start (k,)`` each group's first position in ``cs``. Every element writes one slot:
        a kept element the slot it is appended to, with the value that survives there (only the last ``b``
        kept survive when more are added at once); a dropped element rewrites the slot and value of its
        group's last kept element, or, when its group keeps none, the newest slot with its current value.
        So all writes to one slot carry the same value (the result does not depend on their order) and no
        data-dependent shape is needed. The caches are updated by the difference of the written and the
        overwritten entries, counted once per slot.
        """
        b = self.capacity
        n_keep = kept[cs]
        first = start[cs]
        rank = torch.arange(cs.numel(), device=cs.device) - first
        target = torch.minimum(rank, n_keep - 1)  # -1 when the group keeps nothing
        behind = (n_keep - b - target).clamp_min(0)  # a kept element overwritten in the same update...
        source = target + b * ((behind + b - 1) // b)  # ...writes the value of the one that survives
        has = n_keep > 0
        slot = (self.ptr[cs] + target) % b
        old = self.feats[cs, slot]
        picked = feats[src[(first + source).clamp(0, cs.numel() - 1)]]
        new = torch.where(has.unsqueeze(1), picked, old)
        inv_old = self.inv_norm[cs, slot]
        inv_new = torch.where(has, inverse_norms(new, self.inv_norm.dtype), inv_old)
        age = (slot - self.ptr[cs] + self.count[cs]) % b
        was_valid = age < self.count[cs]
        writer = has & (rank < n_keep) & (rank >= n_keep - b)  # one element per written slot
        f64 = torch.float64
        delta = new.to(f64) * inv_new.to(f64).unsqueeze(1) - old.to(f64) * (inv_old.to(f64) * was_valid).unsqueeze(1)
        self.concept_sum.index_add_(0, cs, delta * writer.unsqueeze(1))
        self.feats[cs, slot] = new
        self.inv_norm[cs, slot] = inv_new
        self.count.copy_(torch.clamp(self.count + kept, max=b))
        self.ptr.copy_((self.ptr + kept) % b)
