"""Concept bank: ring buffer vs a list-of-lists reference fed with the same random selections."""

from __future__ import annotations

import pytest
import torch

from causeseg.bank import ConceptBank, group_ranks, select_discard, select_new


class RefBank:
    """Per-concept Python lists; official: append then keep the last b; paper: remove, then append."""

    def __init__(self, k: int, b: int, policy: str):
        self.k, self.b, self.policy = k, b, policy
        self.lists: list[list[torch.Tensor]] = [[] for _ in range(k)]

    def update(self, concepts: torch.Tensor, feats: torch.Tensor, sel: torch.Tensor, discard=None) -> None:
        if self.policy == "paper" and concepts.numel():
            present = sorted(set(concepts.tolist()))
            for p, m in enumerate(present):
                self.lists[m] = [e for j, e in enumerate(self.lists[m]) if not bool(discard[p, j])]
        for i in sel.tolist():
            m = int(concepts[i])
            self.lists[m].append(feats[i].clone())
            self.lists[m] = self.lists[m][-self.b:]


def random_update(g: torch.Generator, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random batch: sometimes empty, often one dominant concept (more than 2b at once), singletons."""
    kind = int(torch.randint(0, 5, (1,), generator=g))
    if kind == 0:
        n = 0
    elif kind == 1:
        n = int(torch.randint(1, 4, (1,), generator=g))
    else:
        n = int(torch.randint(4, 40, (1,), generator=g))
    if kind == 4 and n:  # skewed: concept 0 dominates
        concepts = torch.where(torch.rand(n, generator=g) < 0.8, torch.zeros(n, dtype=torch.long),
                               torch.randint(0, k, (n,), generator=g))
    else:
        concepts = torch.randint(0, k, (n,), generator=g)
    feats = torch.randn(n, d, generator=g)
    return concepts, feats


def assert_same(bank: ConceptBank, ref: RefBank) -> None:
    counts = torch.tensor([len(l) for l in ref.lists])
    assert torch.equal(bank.counts(), counts)
    assert len(bank) == int(counts.sum())
    assert torch.equal(bank.valid_mask().sum(1), counts)
    for m in range(ref.k):
        exp = torch.stack(ref.lists[m]) if ref.lists[m] else torch.zeros(0, bank.dim)
        assert torch.equal(bank.ordered(m), exp), f"concept {m}"
    exp_sum = torch.stack([torch.stack(l).sum(0) if l else torch.zeros(bank.dim) for l in ref.lists])
    assert torch.allclose(bank.feature_sum(), exp_sum, atol=1e-5)
    # invalid slots hold zeros; valid slots hold exactly the reference entries (as a multiset per row)
    assert torch.all(bank.feats[~bank.valid_mask()] == 0)


@pytest.mark.parametrize("policy", ["official", "paper"])
def test_bank_matches_reference(policy):
    k, b, d = 5, 6, 3
    bank, ref = ConceptBank(k, b, d, policy=policy), RefBank(k, b, policy)
    g = torch.Generator().manual_seed(0)
    sel_g = torch.Generator().manual_seed(1)
    seen_big = seen_single = seen_empty = seen_full = 0
    for _ in range(120):
        concepts, feats = random_update(g, k, d)
        discard = None
        if policy == "paper" and concepts.numel():
            present = torch.unique(concepts)
            discard = select_discard(bank.counts()[present], b, sel_g)
        sel = select_new(concepts, sel_g)
        ref.update(concepts, feats, sel, discard)
        bank.update(concepts, feats, selection=sel, discard=discard)
        assert_same(bank, ref)
        n_m = torch.bincount(concepts, minlength=k)
        seen_big += int((n_m // 2 > b).any())
        seen_single += int((n_m == 1).any())
        seen_empty += int(concepts.numel() == 0)
        seen_full += int((bank.counts() == b).any())
    assert seen_big and seen_single and seen_empty and seen_full  # the interesting cases occurred


@pytest.mark.parametrize("policy", ["official", "paper"])
def test_generator_path_equals_explicit_selection(policy):
    """update(generator=g) draws discard (paper) then selection from g: same as feeding them."""
    k, b, d = 4, 5, 2
    a, c = ConceptBank(k, b, d, policy=policy), ConceptBank(k, b, d, policy=policy)
    g_data = torch.Generator().manual_seed(3)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(30):
        concepts, feats = random_update(g_data, k, d)
        a.update(concepts, feats, generator=g1)
        if concepts.numel():
            disc = select_discard(c.counts()[torch.unique(concepts)], b, g2) if policy == "paper" else None
            c.update(concepts, feats, selection=select_new(concepts, g2), discard=disc)
    assert torch.equal(a.feats, c.feats) and torch.equal(a.count, c.count) and torch.equal(a.ptr, c.ptr)


def test_select_new_counts_order_and_uniformity():
    g = torch.Generator().manual_seed(0)
    concepts = torch.tensor([3, 1, 3, 3, 0, 1, 3, 2, 1, 1, 1])
    for _ in range(20):
        sel = select_new(concepts, g)
        assert len(set(sel.tolist())) == len(sel)
        cs = concepts[sel]
        assert torch.all(cs[1:] >= cs[:-1])  # grouped by concept
        assert torch.equal(torch.bincount(cs, minlength=4), torch.tensor([0, 2, 0, 2]))  # floor(n/2): 1,5,1,4
    # uniform: each of 4 same-concept items kept about half the time, both append orders occur
    concepts = torch.zeros(4, dtype=torch.long)
    hits = torch.zeros(4)
    orders = set()
    for _ in range(800):
        sel = select_new(concepts, g)
        hits[sel] += 1
        orders.add(tuple(sel.tolist()))
    assert torch.all((hits / 800 - 0.5).abs() < 0.08)
    assert len(orders) == 12  # all ordered pairs of 4 items
    assert select_new(torch.zeros(0, dtype=torch.long), g).numel() == 0


def test_select_discard_counts_and_uniformity():
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 1, 2, 5, 8])
    hits = torch.zeros(5, 8)
    for _ in range(600):
        m = select_discard(counts, 8, g)
        assert torch.equal(m.sum(1), counts // 2)
        assert not m[torch.arange(8).unsqueeze(0) >= counts.unsqueeze(1)].any()  # only stored entries
        hits += m
    assert torch.all((hits[3, :5] / 600 - 2 / 5).abs() < 0.08)
    assert torch.all((hits[4] / 600 - 0.5).abs() < 0.08)


def test_group_ranks():
    groups = torch.tensor([0, 0, 2, 2, 2, 5])
    rank, size = group_ranks(groups, 6)
    assert rank.tolist() == [0, 1, 0, 1, 2, 0]
    assert size.tolist() == [2, 2, 3, 3, 3, 1]


def test_official_fifo_by_hand():
    bank = ConceptBank(2, 3, 1)
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    c = torch.zeros(10, dtype=torch.long)
    bank.update(c[:2], x[:2], selection=torch.tensor([1]))
    bank.update(c[:4], x[2:6], selection=torch.tensor([3, 0]))
    assert bank.ordered(0).flatten().tolist() == [1, 5, 2]
    bank.update(c[:2], x[6:8], selection=torch.tensor([0]))
    assert bank.ordered(0).flatten().tolist() == [5, 2, 6]  # oldest overwritten
    bank.update(c[:10], x, selection=torch.tensor([9, 8, 7, 6, 5]))
    assert bank.ordered(0).flatten().tolist() == [7, 6, 5]  # more than b at once: last b kept
    assert bank.counts().tolist() == [3, 0] and bank.ordered(1).shape == (0, 1)


def test_paper_policy_by_hand():
    bank = ConceptBank(2, 4, 1, policy="paper")
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    c = torch.zeros(10, dtype=torch.long)
    bank.update(c[:8], x[:8], selection=torch.tensor([0, 1, 2, 3]), discard=torch.zeros(1, 4, dtype=torch.bool))
    assert bank.ordered(0).flatten().tolist() == [0, 1, 2, 3]
    disc = torch.tensor([[False, True, False, True]])
    bank.update(c[:2], x[8:10], selection=torch.tensor([1]), discard=disc)
    assert bank.ordered(0).flatten().tolist() == [0, 2, 9]
    # a concept seen once: half of its stored entries discarded, nothing added
    bank.update(c[:1], x[:1], selection=torch.zeros(0, dtype=torch.long),
                discard=torch.tensor([[True, False, False, False]]))
    assert bank.ordered(0).flatten().tolist() == [2, 9]
    # concept 1 untouched by updates of concept 0
    assert bank.counts().tolist() == [2, 0]


@pytest.mark.parametrize("policy", ["official", "paper"])
def test_state_dict_round_trip(policy):
    k, b, d = 4, 5, 3
    bank = ConceptBank(k, b, d, policy=policy)
    g_data = torch.Generator().manual_seed(5)
    g = torch.Generator().manual_seed(6)
    for _ in range(15):
        bank.update(*random_update(g_data, k, d), generator=g)
    assert len(bank) > 0
    sd = bank.state_dict()
    assert {"feats", "count", "ptr"} <= set(sd)
    other = ConceptBank(k, b, d, policy=policy)
    other.load_state_dict(sd)
    assert torch.equal(other.feats, bank.feats) and torch.equal(other.count, bank.count)
    g2 = torch.Generator().manual_seed(0)
    g2.set_state(g.get_state())
    for _ in range(5):
        cc, ff = random_update(g_data, k, d)
        bank.update(cc, ff, generator=g)
        other.update(cc, ff, generator=g2)
    assert torch.equal(other.feats, bank.feats) and torch.equal(other.ptr, bank.ptr)
    with pytest.raises(ValueError, match="does not match"):
        ConceptBank(k, b, d, policy="paper" if policy == "official" else "official").load_state_dict(sd)
    bank.reset()
    assert len(bank) == 0 and not bank.valid_mask().any() and bank.ordered(0).shape == (0, d)


def test_bad_input_and_misc():
    bank = ConceptBank(3, 4, 2)
    with pytest.raises(ValueError, match="outside"):
        bank.update(torch.tensor([3]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="feats must be"):
        bank.update(torch.tensor([0, 1]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer"):
        bank.update(torch.tensor([0.0]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="policy"):
        ConceptBank(3, 4, 2, policy="fifo")
    with pytest.raises(IndexError):
        bank.ordered(3)
    assert bank.nbytes == 3 * 4 * 2 * 4 + 2 * 3 * 8 + 3 * 4 * 4 + 3 * 2 * 8  # feats, count/ptr, inv_norm, concept_sum
    half = ConceptBank(3, 4, 2, dtype=torch.float16)
    half.update(torch.tensor([1, 1]), torch.ones(2, 2), selection=torch.tensor([0]))
    assert half.feats.dtype == torch.float16 and half.feature_sum().tolist()[1] == [1.0, 1.0]


def _brute_caches(bank: ConceptBank) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 inverse norms of every slot and per-concept sums of the normalised valid entries, by hand."""
    feats = bank.feats.double()
    inv = 1.0 / feats.norm(dim=-1).clamp_min(1e-12)
    sums = torch.stack([(feats[m] * inv[m, :, None])[bank.valid_mask()[m]].sum(0) for m in range(bank.num_concepts)])
    return inv, sums


@pytest.mark.parametrize("policy", ["official", "paper"])
@pytest.mark.parametrize("explicit", [False, True])
def test_caches_follow_the_entries(policy, explicit):
    """inv_norm and concept_sum, updated at insertion, equal a recomputation after every update (overwrites,
    more than b at once, singletons, the paper policy's discards)."""
    k, b, d = 5, 6, 3
    bank = ConceptBank(k, b, d, policy=policy)
    g, sel_g = torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)
    for _ in range(80):
        concepts, feats = random_update(g, k, d)
        feats = feats * torch.rand(len(feats), 1, generator=g) * 5  # entries of different norms
        if explicit and concepts.numel():
            disc = select_discard(bank.counts()[torch.unique(concepts)], b, sel_g) if policy == "paper" else None
            bank.update(concepts, feats, selection=select_new(concepts, sel_g), discard=disc)
        else:
            bank.update(concepts, feats, generator=sel_g, validate=False)
        inv, sums = _brute_caches(bank)
        valid = bank.valid_mask()
        assert torch.allclose(bank.inv_norm.double()[valid], inv[valid], rtol=1e-6)
        assert torch.allclose(bank.concept_sum, sums, atol=1e-6)
        t = bank.tensors()
        assert torch.equal(t.counts, valid.sum(1)) and torch.equal(t.valid, valid) and t.sums is bank.concept_sum


def test_state_dict_without_caches_loads_and_recomputes():
    """A bank saved before the caches existed (feats, count, ptr only) loads; its caches are recomputed."""
    bank = ConceptBank(4, 5, 3)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        bank.update(*random_update(g, 4, 3), generator=g)
    old = {key: v for key, v in bank.state_dict().items() if key not in ("inv_norm", "concept_sum")}
    other = ConceptBank(4, 5, 3)
    other.load_state_dict(old)
    assert torch.allclose(other.concept_sum, bank.concept_sum, atol=1e-6)
    assert torch.equal(other.inv_norm, bank.inv_norm)
    with pytest.raises(RuntimeError, match="Missing key"):
        ConceptBank(4, 5, 3).load_state_dict({key: v for key, v in old.items() if key != "ptr"})
