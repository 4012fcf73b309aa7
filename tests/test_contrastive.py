"""Concept-wise contrastive loss against a per-anchor Python-loop reference written here."""

from __future__ import annotations

import math

import pytest
import torch

from causeseg.contrastive import assign_concepts, concept_contrastive_loss, concept_distance, concept_masks

DT = torch.float64


# ----------------------------------------------------------------------------- reference


def _anchor_pair_losses(cands: list[tuple[torch.Tensor, bool, bool]], form: str) -> list[torch.Tensor]:
    """cands: (s_ij, is_pos, is_neg) for one anchor -> list of l_ij over its positive pairs."""
    pos = [s for s, p, _ in cands if p]
    neg = [s for s, _, q in cands if q]
    out = []
    if form == "official":
        if not pos:
            return out
        denom = sum(torch.exp(s) for s in pos + neg)
        for s in pos:
            out.append(-s + torch.log(denom))
    else:
        for s in pos:
            out.append(-torch.log(torch.exp(s) / (torch.exp(s) + sum((torch.exp(t) for t in neg), torch.zeros((), dtype=s.dtype)))))
    return out


def ref_loss(anchors, cands, ac, cc, dm, *, bank=None, valid=None, tau=0.07, pp=0.3, pn=0.1, form="official",
             exclude_self=True, offset=0):
    bsz, n, _ = anchors.shape
    bc, nc, _ = cands.shape
    terms = []
    for b in range(bsz):
        in_pairs, bank_pairs = [], []
        for i in range(n):
            a = anchors[b, i] / anchors[b, i].norm()
            lst = []
            for bb in range(bc):
                for j in range(nc):
                    if exclude_self and bb == b + offset and j == i:
                        continue
                    z = cands[bb, j].detach() / cands[bb, j].detach().norm()
                    d = float(dm[ac[b, i], cc[bb, j]])
                    lst.append((a @ z / tau, d > pp, d < pn))
            in_pairs += _anchor_pair_losses(lst, form)
            if bank is not None:
                lst = []
                for m in range(bank.shape[0]):
                    for slot in range(bank.shape[1]):
                        if valid is not None and not bool(valid[m, slot]):
                            continue
                        z = bank[m, slot] / bank[m, slot].norm()
                        d = float(dm[ac[b, i], m])
                        lst.append((a @ z / tau, d > pp, d < pn))
                bank_pairs += _anchor_pair_losses(lst, form)
        if in_pairs:
            terms.append(torch.stack(in_pairs).mean())
        if bank_pairs:
            terms.append(torch.stack(bank_pairs).mean())
    if not terms:
        return anchors.sum() * 0
    return torch.stack(terms).mean()


def make_case(seed: int, bsz=3, n=4, d=6, k=7, nb=3, c=3, bc=None):
    g = torch.Generator().manual_seed(seed)
    bc = bc or bsz
    m = torch.randn(k, c, generator=g, dtype=DT)  # low width: cosines spread across the thresholds
    dm = concept_distance(m)
    anchors = torch.randn(bsz, n, d, generator=g, dtype=DT)
    cands = anchors.repeat(bc // bsz + 1, 1, 1)[:bc] + 0.5 * torch.randn(bc, n, d, generator=g, dtype=DT)
    ac = torch.randint(0, k, (bsz, n), generator=g)
    cc = ac.repeat(bc // bsz + 1, 1)[:bc].clone()
    cc[bsz:] = torch.randint(0, k, (bc - bsz, n), generator=g)
    bank = torch.randn(k, nb, d, generator=g, dtype=DT)
    valid = torch.rand(k, nb, generator=g) > 0.35
    bank[~valid] = 1e6  # garbage in invalid slots must not matter
    return anchors, cands, ac, cc, dm, bank, valid


# ----------------------------------------------------------------------------- loss vs reference


@pytest.mark.parametrize("form", ["official", "paper"])
@pytest.mark.parametrize("use_bank", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_reference_value_and_gradient(form, use_bank, seed):
    anchors, cands, ac, cc, dm, bank, valid = make_case(seed)
    pos, neg = concept_masks(ac.reshape(-1), cc.reshape(-1), dm)
    assert pos.any() and neg.any() and (~pos & ~neg).any()  # the case exercises all three bands
    kw = dict(bank=bank, bank_valid=valid) if use_bank else {}
    a_ref = anchors.clone().requires_grad_(True)
    ref = ref_loss(a_ref, cands, ac, cc, dm, bank=bank if use_bank else None, valid=valid, form=form)
    ref.backward()
    impls = ("auto", "reference") if use_bank and form == "official" else ("auto",)
    for chunk, impl in [(c, i) for c in (None, 1, 5) for i in impls]:  # auto = the fused bank_logsumexp on CPU
        a = anchors.clone().requires_grad_(True)
        z = cands.clone().requires_grad_(True)
        loss, stats = concept_contrastive_loss(a, z, ac, cc, dm, form=form, chunk_size=chunk, bank_impl=impl, **kw)
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-7, atol=1e-9)
        assert z.grad is None  # candidates are detached
        assert stats["terms_used"] + stats["terms_dropped"] == (6 if use_bank else 3)


@pytest.mark.parametrize("form", ["official", "paper"])
def test_loss_with_offset_and_global_candidates(form):
    anchors, cands, ac, cc, dm, bank, valid = make_case(2, bsz=2, bc=5)
    # the anchors' own teacher tokens sit at images 2, 3 of the candidate batch
    cands = torch.cat([cands[2:4], cands[:2], cands[4:]])
    cc = torch.cat([cc[2:4], cc[:2], cc[4:]])
    a_ref = anchors.clone().requires_grad_(True)
    ref = ref_loss(a_ref, cands, ac, cc, dm, bank=bank, valid=valid, form=form, offset=2)
    ref.backward()
    a = anchors.clone().requires_grad_(True)
    loss, _ = concept_contrastive_loss(a, cands, ac, cc, dm, bank=bank, bank_valid=valid, form=form,
                                       anchor_offset=2, chunk_size=3)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, a_ref.grad)


def test_official_and_paper_forms_differ():
    anchors, cands, ac, cc, dm, bank, valid = make_case(3)
    lo, _ = concept_contrastive_loss(anchors, cands, ac, cc, dm, form="official")
    lp, _ = concept_contrastive_loss(anchors, cands, ac, cc, dm, form="paper")
    assert not torch.allclose(lo, lp)


def test_temperature_and_threshold_arguments_are_used():
    anchors, cands, ac, cc, dm, bank, valid = make_case(4)
    for kw in (dict(tau=0.5), dict(phi_pos=0.6, phi_neg=-0.2)):
        ref = ref_loss(anchors, cands, ac, cc, dm, bank=bank, valid=valid,
                       tau=kw.get("tau", 0.07), pp=kw.get("phi_pos", 0.3), pn=kw.get("phi_neg", 0.1))
        loss, _ = concept_contrastive_loss(anchors, cands, ac, cc, dm, bank=bank, bank_valid=valid, **kw)
        torch.testing.assert_close(loss, ref)


# ----------------------------------------------------------------------------- empty sets, NaN, self pair


def identity_dm(k: int) -> torch.Tensor:
    return torch.eye(k, dtype=DT)  # distinct concepts are negatives (D = 0 < 0.1)


@pytest.mark.parametrize("form", ["official", "paper"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_image_without_positive_is_dropped_not_nan(form, chunk):
    g = torch.Generator().manual_seed(5)
    anchors = torch.randn(2, 2, 4, generator=g, dtype=DT)
    cands = torch.randn(2, 2, 4, generator=g, dtype=DT)
    ac = torch.tensor([[0, 1], [2, 2]])  # image 0: unique concepts -> its only positive would be the self pair
    dm = identity_dm(3)
    bank = torch.randn(3, 2, 4, generator=g, dtype=DT)
    valid = torch.tensor([[False, False], [False, False], [True, False]])  # only concept 2 in the bank
    a = anchors.clone().requires_grad_(True)
    loss, stats = concept_contrastive_loss(a, cands, ac, ac, dm, bank=bank, bank_valid=valid, form=form,
                                           chunk_size=chunk)
    loss.backward()
    a_ref = anchors.clone().requires_grad_(True)
    ref = ref_loss(a_ref, cands, ac, ac, dm, bank=bank, valid=valid, form=form)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(a.grad, a_ref.grad)
    assert torch.all(a.grad[0] == 0)  # image 0 contributes nothing
    assert stats["terms_used"] == 2 and stats["terms_dropped"] == 2
    assert stats["anchors_without_positive"] == 2
    assert stats["mean_positives_per_anchor"] == pytest.approx(0.5)  # only image 1's two anchors, 1 each
    assert stats["mean_bank_positives_per_anchor"] == pytest.approx(0.5)


@pytest.mark.parametrize("form", ["official", "paper"])
@pytest.mark.parametrize("use_bank", [False, True])
def test_no_positive_at_all_gives_zero_loss_and_zero_grad(form, use_bank):
    anchors, cands, ac, cc, dm, bank, valid = make_case(6)
    a = anchors.clone().requires_grad_(True)
    kw = dict(bank=bank, bank_valid=valid) if use_bank else {}
    loss, stats = concept_contrastive_loss(a, cands, ac, cc, dm, phi_pos=1.5, phi_neg=0.1, form=form,
                                           chunk_size=2, **kw)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(a.grad, torch.zeros_like(a.grad))
    assert stats["terms_used"] == 0 and stats["anchors_without_positive"] == 12


@pytest.mark.parametrize("form", ["official", "paper"])
def test_empty_positive_and_negative_sets_no_nan(form):
    """All distances inside the ignore band: every row of the softmax is empty."""
    k = 4
    dm = torch.full((k, k), 0.2, dtype=DT)
    dm.fill_diagonal_(1.0)
    g = torch.Generator().manual_seed(7)
    anchors = torch.randn(1, 4, 3, generator=g, dtype=DT, requires_grad=True)
    cands = torch.randn(1, 4, 3, generator=g, dtype=DT)
    ac = torch.arange(4)[None]
    bank = torch.randn(k, 2, 3, generator=g, dtype=DT)
    valid = torch.zeros(k, 2, dtype=torch.bool)
    valid[:, 0] = True
    valid[torch.arange(k), 0] = True
    # anchors have positives only in the bank (own concept), neither positives nor negatives in-batch
    loss, stats = concept_contrastive_loss(anchors, cands, ac, ac, dm, bank=bank, bank_valid=valid, form=form)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(anchors.grad).all()
    ref = ref_loss(anchors.detach(), cands, ac, ac, dm, bank=bank, valid=valid, form=form)
    torch.testing.assert_close(loss.detach(), ref)
    if form == "paper":  # a positive without any negative has l = -log(1) = 0
        assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert stats["terms_used"] == 1


def test_self_pair_is_excluded():
    g = torch.Generator().manual_seed(8)
    anchors = torch.randn(1, 2, 5, generator=g, dtype=DT)
    cands = torch.randn(1, 2, 5, generator=g, dtype=DT)
    ac = torch.tensor([[0, 1]])
    dm = identity_dm(2)
    loss, stats = concept_contrastive_loss(anchors, cands, ac, ac, dm)
    assert loss.item() == 0.0 and stats["terms_used"] == 0  # the only D = 1 pair is the self pair
    # without the exclusion the self pair is the positive and the other token the negative
    tau = 0.07
    loss2, _ = concept_contrastive_loss(anchors, cands, ac, ac, dm, exclude_self=False, tau=tau)
    an = anchors[0] / anchors[0].norm(dim=-1, keepdim=True)
    zn = cands[0] / cands[0].norm(dim=-1, keepdim=True)
    s = an @ zn.t() / tau
    manual = sum(-s[i, i] + torch.log(torch.exp(s[i, 0]) + torch.exp(s[i, 1])) for i in range(2)) / 2
    torch.testing.assert_close(loss2, manual)
    # same concept elsewhere in the batch: the self pair is removed but the other is a positive
    ac3 = torch.tensor([[0, 0]])
    loss3, stats3 = concept_contrastive_loss(anchors, cands, ac3, ac3, dm, tau=tau)
    # Pos_i = {other token}, Neg_i = {}: l = -s + log exp(s) = 0 (with the self pair it would not be 0)
    assert abs(loss3.item()) < 1e-12
    loss4, _ = concept_contrastive_loss(anchors, cands, ac3, ac3, dm, tau=tau, exclude_self=False)
    manual4 = sum(-s[i, j] + torch.logsumexp(s[i], 0) for i in range(2) for j in range(2)) / 4
    torch.testing.assert_close(loss4, manual4)
    assert stats3["mean_positives_per_anchor"] == 1.0


def test_exclude_self_needs_matching_candidates():
    a = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="exclude_self"):
        concept_contrastive_loss(a, torch.randn(1, 2, 4), torch.zeros(1, 3, dtype=torch.long),
                                 torch.zeros(1, 2, dtype=torch.long), torch.eye(2))
    with pytest.raises(ValueError, match="form"):
        concept_contrastive_loss(a, a, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                                 torch.eye(2), form="nope")
    with pytest.raises(ValueError, match="outside"):
        concept_contrastive_loss(a, a, torch.full((1, 3), 5), torch.zeros(1, 3, dtype=torch.long), torch.eye(2))


# ----------------------------------------------------------------------------- concepts


def test_concept_distance_symmetric_unit_diagonal_and_cosine():
    g = torch.Generator().manual_seed(9)
    m = torch.randn(6, 4, generator=g)
    m[3] = 0.0  # a dead concept still has D = 1 with itself
    d = concept_distance(m)
    assert torch.equal(d, d.t())
    assert torch.equal(torch.diagonal(d), torch.ones(6))
    for i in range(6):
        for j in range(6):
            if i != j and i != 3 and j != 3:
                ref = float(m[i].double() @ m[j].double() / (m[i].double().norm() * m[j].double().norm()))
                assert float(d[i, j]) == pytest.approx(ref, abs=1e-6)


def test_assign_concepts_matches_brute_force():
    g = torch.Generator().manual_seed(10)
    t = torch.randn(2, 7, 5, generator=g) * torch.rand(2, 7, 1, generator=g) * 10
    m = torch.randn(9, 5, generator=g) * torch.rand(9, 1, generator=g) * 3  # unequal norms matter
    for chunk in (None, 1, 3, 100):
        q = assign_concepts(t, m, chunk_size=chunk)
        assert q.shape == (2, 7) and q.dtype == torch.long
        for b in range(2):
            for i in range(7):
                cs = [float(t[b, i].double() @ m[j].double() / (t[b, i].double().norm() * m[j].double().norm()))
                      for j in range(9)]
                assert int(q[b, i]) == max(range(9), key=lambda j: cs[j])
    assert not torch.equal(assign_concepts(t, m), (t @ m.t()).argmax(-1))  # cosine, not dot product


def test_concept_masks_thresholds():
    dm = torch.tensor([[1.0, 0.35, 0.2], [0.35, 1.0, 0.05], [0.2, 0.05, 1.0]])
    pos, neg = concept_masks(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), dm, 0.3, 0.1)
    assert pos.tolist() == [[True, True, False], [True, True, False]]
    assert neg.tolist() == [[False, False, False], [False, False, True]]
    with pytest.raises(ValueError):
        concept_masks(torch.tensor([0]), torch.tensor([0]), dm, 0.1, 0.3)
    assert math.isclose(float(dm[0, 1]), 0.35, rel_tol=1e-6)


# ----------------------------------------------------------------------------- bank caches, budget, statistics


@pytest.mark.parametrize("form", ["official", "paper"])
def test_concept_bank_caches_give_the_reference_loss(form):
    """The loss on ConceptBank.tensors() (inverse norms and per-concept sums kept at insertion) equals the
    Python-loop reference on the same entries, value and gradient."""
    from causeseg.bank import ConceptBank

    anchors, cands, ac, cc, dm, _, _ = make_case(3, k=7, nb=3)
    bank = ConceptBank(7, 3, anchors.shape[-1], dtype=DT)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        q = torch.randint(0, 7, (8,), generator=g)
        bank.update(q, 3 * torch.randn(8, anchors.shape[-1], generator=g, dtype=DT), generator=g)
    valid = bank.valid_mask()
    assert valid.any() and not valid.all()
    a_ref = anchors.clone().requires_grad_(True)
    ref = ref_loss(a_ref, cands, ac, cc, dm, bank=bank.feats, valid=valid, form=form)
    ref.backward()
    a = anchors.clone().requires_grad_(True)
    loss, _ = concept_contrastive_loss(a, cands, ac, cc, dm, bank=bank.tensors(), form=form)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-8)  # inv_norm cached in fp32
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="bank_valid goes with a plain bank"):
        concept_contrastive_loss(a, cands, ac, cc, dm, bank=bank.tensors(), bank_valid=valid)


@pytest.mark.parametrize("form", ["official", "paper"])
def test_default_chunks_follow_the_memory_budget(form, monkeypatch):
    """Without chunk_size, the materialised terms are chunked when their logits exceed the budget
    (checked by counting the chunks' matmuls); the result is the unchunked one."""
    import causeseg.contrastive as con

    anchors, cands, ac, cc, dm, bank, valid = make_case(4, bsz=3, n=4, k=7, nb=3)
    kw = dict(bank=bank, bank_valid=valid, form=form, bank_impl="reference")
    a0 = anchors.clone().requires_grad_(True)
    full, _ = concept_contrastive_loss(a0, cands, ac, cc, dm, **kw)
    full.backward()
    assert con.budget_rows(12, 21, torch.device("cpu")) is None  # 12 x 21 logits fit the real budget
    monkeypatch.setitem(con._LOGIT_BUDGET, "cpu", 50)  # 50 logits: 2 rows of the 21 bank entries, 4 of 12
    assert con.budget_rows(12, 21, torch.device("cpu")) == 2 and con.budget_rows(12, 12, torch.device("cpu")) == 4
    rows_seen = []
    real = con._rowwise

    def spy(fn, a, extra, chunk_size):
        rows_seen.append(chunk_size)
        return real(fn, a, extra, chunk_size)

    monkeypatch.setattr(con, "_rowwise", spy)
    a1 = anchors.clone().requires_grad_(True)
    chunked, _ = concept_contrastive_loss(a1, cands, ac, cc, dm, **kw)
    chunked.backward()
    assert rows_seen == [4, 2]  # in-batch term, bank term
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(a1.grad, a0.grad)


def test_statistics_are_tensors_and_convert_once():
    from causeseg.contrastive import stats_as_numbers

    anchors, cands, ac, cc, dm, bank, valid = make_case(0)
    _, stats = concept_contrastive_loss(anchors, cands, ac, cc, dm, bank=bank, bank_valid=valid)
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    nums = stats_as_numbers(stats)
    assert set(nums) == set(stats) and all(isinstance(v, float) for v in nums.values())
    assert nums["terms_used"] + nums["terms_dropped"] == 6
    empty = torch.zeros_like(valid)  # an empty bank: its terms are not considered, so not dropped either
    _, st2 = concept_contrastive_loss(anchors, cands, ac, cc, dm, bank=bank, bank_valid=empty)
    assert int(st2["terms_used"]) + int(st2["terms_dropped"]) == 3
    assert float(st2["mean_bank_positives_per_anchor"]) == 0.0


def test_concept_range_is_checked_by_default():
    anchors, cands, ac, cc, dm, _, _ = make_case(0)
    bad = ac.clone()
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        concept_contrastive_loss(anchors, cands, bad, cc, dm)
    with pytest.raises(ValueError, match="outside"):
        concept_contrastive_loss(anchors, cands, ac, -cc - 1, dm)
