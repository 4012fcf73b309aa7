"""The fused masked bank log-sum-exp against a brute-force reference written here (explicit full mask)."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors; triton reads the variable when
# it is imported (its own library functions are jit-decorated then), so it is set before anything imports it.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import causeseg.bank_lse as bank_lse
from causeseg.bank_lse import bank_logsumexp, resolve_impl, triton_selftest
from causeseg.contrastive import concept_contrastive_loss, concept_distance


# ----------------------------------------------------------------------------- reference
def brute_lse(a, bank, umask, valid, inv_norm, tau):
    """Explicit (A, k*b) mask, full logits and torch.logsumexp; placeholder log(tiny) on empty rows."""
    n_rows = a.shape[0]
    k, nb, d = bank.shape
    s = (a @ bank.reshape(k * nb, d).to(a.dtype).t()) * (inv_norm.reshape(-1).to(a.dtype) / tau)
    mask = torch.zeros(n_rows, k * nb, dtype=torch.bool)
    for i in range(n_rows):
        for m in range(k):
            for slot in range(nb):
                mask[i, m * nb + slot] = bool(umask[i, m]) and bool(valid[m, slot])
    lse = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    nonempty = mask.any(-1)
    lse = torch.where(nonempty, lse, torch.full_like(lse, math.log(torch.finfo(lse.dtype).tiny)))
    return lse, nonempty


def make(seed, n_rows=37, k=9, nb=5, d=16, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n_rows, d, generator=g, dtype=dtype), dim=-1)
    bank = scale * torch.randn(k, nb, d, generator=g, dtype=dtype)
    valid = torch.rand(k, nb, generator=g) > 0.3
    valid[0] = False  # a concept with no valid slot
    valid[1] = True  # and one full
    bank[~valid] = 1e6  # garbage in invalid slots must not matter
    umask = torch.rand(n_rows, k, generator=g) > 0.5
    umask[0] = False  # empty row
    umask[1] = False
    umask[1, 0] = True  # only a concept without valid slots: empty too
    umask[2] = True
    inv = 1.0 / bank.norm(dim=-1).clamp_min(1e-12)
    return a, bank, umask, valid, inv


def check_against_brute(a, bank, umask, valid, inv, tau, *, rtol, atol, gtol, **kw):
    g = torch.Generator().manual_seed(123)
    w = torch.randn(a.shape[0], generator=g, dtype=torch.float64)
    a1 = a.clone().requires_grad_(True)
    lse, nonempty = bank_logsumexp(a1, bank, umask, valid, inv, tau, **kw)
    (lse * w.to(device=lse.device, dtype=lse.dtype)).sum().backward()
    a2 = a.detach().cpu().double().clone().requires_grad_(True)
    ref, ref_ne = brute_lse(a2, bank.cpu().double(), umask.cpu(), valid.cpu(), inv.cpu().double(), tau)
    (torch.where(ref_ne, ref, torch.zeros_like(ref)) * w).sum().backward()
    lse, nonempty, grad = lse.cpu(), nonempty.cpu(), a1.grad.cpu()
    assert torch.equal(nonempty, ref_ne)
    assert not bool(ref_ne[0]) and not bool(ref_ne[1]) and bool(ref_ne[2])  # the case has empty rows
    torch.testing.assert_close(lse[nonempty].double(), ref[nonempty], rtol=rtol, atol=atol)
    placeholder = math.log(torch.finfo(lse.dtype).tiny)  # finite, in the result's dtype
    assert torch.all(lse[~nonempty].detach() == torch.tensor(placeholder, dtype=lse.dtype))
    assert grad.dtype == a.dtype
    assert torch.isfinite(grad).all()
    assert torch.all(grad[~nonempty] == 0)  # empty rows: zero gradient
    scale = a2.grad.abs().max()
    torch.testing.assert_close(grad.double(), a2.grad, rtol=0, atol=gtol * float(scale))
    # without a gradient the forward takes its lse-only route (no weighted mean): same values
    with torch.no_grad():
        lse_ng, _ = bank_logsumexp(a, bank, umask, valid, inv, tau, **kw)
    torch.testing.assert_close(lse_ng.cpu(), lse.detach(), rtol=rtol, atol=atol)
    return lse, grad


# ----------------------------------------------------------------------------- torch implementation
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block_rows", [None, 1, 7])  # 7 does not divide 37
def test_torch_impl_matches_brute_force(dtype, block_rows):
    a, bank, umask, valid, inv = make(0, dtype=dtype)
    tol = dict(rtol=1e-12, atol=1e-12, gtol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5,
                                                                                       gtol=1e-5)
    lse, _ = check_against_brute(a, bank, umask, valid, inv, 0.07, impl="torch", block_rows=block_rows, **tol)
    assert lse.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_impl_exact_path(dtype, monkeypatch):
    """When 2c exceeds the fixed-shift span (small tau, or forced here), no fixed shift is used and the result stays exact."""
    a, bank, umask, valid, inv = make(1, dtype=dtype)
    if dtype == torch.float64:
        monkeypatch.setitem(bank_lse._MAX_SPAN, torch.float64, 1.0)
        tau = 0.07
    else:
        tau = 0.004  # 2 / tau = 500 > 80: exp(s - c) would underflow fp32
    scale = inv.reshape(-1) / tau
    assert bank_lse._shift_bound(a, bank.reshape(-1, a.shape[1]), scale, valid.reshape(-1)) is None
    tol = dict(rtol=1e-12, atol=1e-12, gtol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-4,
                                                                                       gtol=1e-5)
    check_against_brute(a, bank, umask, valid, inv, tau, impl="torch", block_rows=5, **tol)


def test_torch_impl_unnormalised_anchors_large_logits():
    """Anchors of norm 40 (logits up to ~570): no overflow, still exact (fp32 goes the exact path)."""
    a, bank, umask, valid, inv = make(2, dtype=torch.float32)
    # fp32 logits of size ~570 carry ~570 * 6e-8 of relative error into exp(s - lse)
    check_against_brute(40 * a, bank, umask, valid, inv, 0.07, impl="torch", rtol=1e-5, atol=1e-3, gtol=2e-4)


def test_all_rows_empty_and_no_valid_entry():
    a, bank, umask, valid, inv = make(3)
    valid0 = torch.zeros_like(valid)
    a1 = a.clone().requires_grad_(True)
    lse, nonempty = bank_logsumexp(a1, bank, umask, valid0, inv, 0.07, impl="torch")
    assert not nonempty.any() and torch.isfinite(lse).all()
    lse.sum().backward()
    assert torch.equal(a1.grad, torch.zeros_like(a))


@pytest.mark.parametrize("low,lowp_matmul", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)])
def test_low_precision_inputs_close_to_fp64_reference(low, lowp_matmul, monkeypatch):
    """bf16/fp16 operands; on the CPU they are multiplied in fp32 unless the low-precision matmul path is forced
    (as on CUDA)."""
    monkeypatch.setattr(bank_lse, "_CPU_LOWP_MATMUL", lowp_matmul)
    a, bank, umask, valid, inv = make(4, n_rows=64, k=16, nb=8, d=64, dtype=torch.float32)
    bank[~valid] = 0.0  # fp16 cannot hold the 1e6 garbage
    a16 = a.to(low)
    bank16 = bank.to(low)
    # reference on the same bf16-rounded values, in fp64
    lse, grad = check_against_brute(a16, bank16, umask, valid, inv, 0.07, impl="torch", rtol=0, atol=0.03,
                                    gtol=0.02)
    assert lse.dtype == torch.float32 and grad.dtype == low
    # fp32 anchors with a low-precision compute dtype: the gradient comes back in fp32
    a1 = a.clone().requires_grad_(True)
    lse2, ne = bank_logsumexp(a1, bank, umask, valid, inv, 0.07, impl="torch", dtype=low)
    lse2.sum().backward()
    assert a1.grad.dtype == torch.float32 and torch.isfinite(a1.grad).all()
    ref, _ = brute_lse(a.double(), bank.double(), umask, valid, inv.double(), 0.07)
    torch.testing.assert_close(lse2[ne].double(), ref[ne], rtol=0, atol=0.05)


def test_argument_checks():
    a, bank, umask, valid, inv = make(5, n_rows=4, k=3, nb=2, d=5)
    with pytest.raises(ValueError, match="concept_mask"):
        bank_logsumexp(a, bank, umask[:, :2], valid, inv, 0.07)
    with pytest.raises(ValueError, match="valid"):
        bank_logsumexp(a, bank, umask, valid[:, :1], inv, 0.07)
    with pytest.raises(ValueError, match="impl"):
        bank_logsumexp(a, bank, umask, valid, inv, 0.07, impl="cuda")
    with pytest.raises(ValueError, match="tau"):
        bank_logsumexp(a, bank, umask, valid, inv, 0.0)
    with pytest.raises(ValueError, match="block_rows"):
        bank_logsumexp(a, bank, umask, valid, inv, 0.07, block_rows=0)
    with pytest.raises(ValueError, match="max_logit"):
        bank_logsumexp(a, bank, umask, valid, inv, 0.07, max_logit=0.0)
    # the torch implementation takes the exact row maximum: a host bound changes nothing
    ref, _ = bank_logsumexp(a, bank, umask, valid, inv, 0.07, impl="torch")
    assert torch.equal(bank_logsumexp(a, bank, umask, valid, inv, 0.07, impl="torch", max_logit=1 / 0.07)[0], ref)
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "torch"
    assert resolve_impl("auto", torch.device("cpu"), torch.float64) == "torch"


# ----------------------------------------------------------------------------- in the contrastive loss
def loss_case(seed, bsz=3, n=6, d=12, k=10, nb=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(k, 3, generator=g, dtype=torch.float64)  # low width: cosines spread across the thresholds
    dm = concept_distance(m)
    anchors = torch.randn(bsz, n, d, generator=g, dtype=dtype)
    cands = anchors + 0.5 * torch.randn(bsz, n, d, generator=g, dtype=dtype)
    ac = torch.randint(0, k, (bsz, n), generator=g)
    bank = torch.randn(k, nb, d, generator=g, dtype=dtype)
    valid = torch.rand(k, nb, generator=g) > 0.3
    bank[~valid] = 0.0
    return anchors, cands, ac, dm, bank, valid


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk", [None, 4])
def test_contrastive_torch_equals_reference(dtype, chunk):
    anchors, cands, ac, dm, bank, valid = loss_case(0, dtype=dtype)
    out = {}
    for impl in ("reference", "torch"):
        a = anchors.clone().requires_grad_(True)
        loss, stats = concept_contrastive_loss(a, cands, ac, ac, dm, bank=bank, bank_valid=valid, chunk_size=chunk,
                                               bank_impl=impl)
        loss.backward()
        out[impl] = (loss, a.grad, stats)
    (l_ref, g_ref, s_ref), (l_t, g_t, s_t) = out["reference"], out["torch"]
    assert s_ref == s_t and s_t["mean_bank_positives_per_anchor"] > 0
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_t, l_ref, **tol)
    torch.testing.assert_close(g_t, g_ref, **tol)


def test_contrastive_bf16_anchors_and_bank_close_to_fp32_reference():
    """AMP-style call: bf16 anchors/candidates and a bf16 bank; loss stays fp32 and near the fp32 reference."""
    anchors, cands, ac, dm, bank, valid = loss_case(1, n=8, d=32, dtype=torch.float32)
    a16, c16, b16 = anchors.bfloat16(), cands.bfloat16(), bank.bfloat16()
    a = a16.clone().requires_grad_(True)
    loss, _ = concept_contrastive_loss(a, c16, ac, ac, dm, bank=b16, bank_valid=valid, bank_impl="torch")
    loss.backward()
    assert loss.dtype == torch.float32 and a.grad.dtype == torch.bfloat16
    ref_a = a16.float().clone().requires_grad_(True)  # same bf16-rounded values, everything fp32
    ref, _ = concept_contrastive_loss(ref_a, c16.float(), ac, ac, dm, bank=b16.float(), bank_valid=valid,
                                      bank_impl="reference")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0.02)
    rel = (a.grad.float() - ref_a.grad).abs().max() / ref_a.grad.abs().max()
    assert float(rel) < 0.03


def test_contrastive_bank_impl_checked_and_paper_form_unchanged():
    anchors, cands, ac, dm, bank, valid = loss_case(2)
    with pytest.raises(ValueError, match="bank_impl"):
        concept_contrastive_loss(anchors, cands, ac, ac, dm, bank=bank, bank_valid=valid, bank_impl="fast")
    l1, _ = concept_contrastive_loss(anchors, cands, ac, ac, dm, bank=bank, bank_valid=valid, form="paper",
                                     bank_impl="torch")
    l2, _ = concept_contrastive_loss(anchors, cands, ac, ac, dm, bank=bank, bank_valid=valid, form="paper",
                                     bank_impl="reference")
    assert torch.equal(l1, l2)


# ----------------------------------------------------------------------------- triton implementation
@pytest.fixture
def triton_env(monkeypatch):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA, and triton was imported before TRITON_INTERPRET=1 could be set")
    monkeypatch.setattr(bank_lse, "_KERNELS", None)  # jit reads the variable when the kernels are defined
    yield torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(bank_lse, "_KERNELS", None)


@pytest.mark.parametrize("dtype,tau,host_bound", [(torch.float32, 0.07, False), (torch.bfloat16, 0.07, False),
                                                  (torch.float32, 0.004, False), (torch.float32, 0.07, True),
                                                  (torch.bfloat16, 0.07, True)])
def test_triton_impl_matches_brute_force(triton_env, dtype, tau, host_bound):
    """tau 0.07: fixed shift, one weights pass gives lse and gradient; 0.004: streaming lse, then the weights.
    host_bound: the shift is the caller's max_logit = 1.01 / tau (unit anchors), not computed from the data."""
    # 78 entries = 5 tiles of 16: the interpreter's forward streams 3 tiles per program over 2 splits (the last
    # tile lies past the bank), the backward writes w for chunks of 8 rows
    a, bank, umask, valid, inv = make(6, n_rows=21, k=13, nb=6, d=20, dtype=torch.float32)
    a, bank, umask, valid, inv = (t.to(triton_env) for t in (a, bank, umask, valid, inv))
    a, bank = a.to(dtype), bank.to(dtype)
    tol = dict(rtol=1e-5, atol=2e-4, gtol=1e-4) if dtype == torch.float32 else dict(rtol=0, atol=0.02, gtol=0.02)
    extra = dict(max_logit=1.01 / tau) if host_bound else {}
    lse_t, _ = check_against_brute(a, bank, umask, valid, inv, tau, impl="triton", block_rows=8, **extra, **tol)
    assert lse_t.dtype == torch.float32
    assert os.environ.get("TRITON_INTERPRET") == "1" or triton_env.type == "cuda"


def test_triton_selftest_passes(triton_env, monkeypatch):
    monkeypatch.setattr(bank_lse, "_SELFTEST", {})
    with torch.no_grad():  # as when the loss is evaluated without gradients
        assert triton_selftest(triton_env, torch.float32)
    assert bank_lse._SELFTEST[(triton_env.type, triton_env.index, torch.float32)] is True


def test_triton_selftest_failure_falls_back_with_a_warning(monkeypatch):
    """A kernel that cannot run (old Triton, compiler error, no Triton) must not break impl='auto'."""
    monkeypatch.setattr(bank_lse, "_SELFTEST", {})

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(bank_lse, "_triton_lse_and_mean", broken)
    with pytest.warns(RuntimeWarning, match="impl='auto' uses torch"):
        assert not triton_selftest(torch.device("cpu"), torch.float32)
    assert bank_lse._SELFTEST[("cpu", None, torch.float32)] is False
    monkeypatch.setattr(bank_lse, "triton_available", lambda: True)
    monkeypatch.setattr(bank_lse, "_SELFTEST", {("cuda", None, torch.bfloat16): False})
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "torch"
