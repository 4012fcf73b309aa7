"""Step-1 modularity maths against naive references written here."""

from __future__ import annotations

import math

import pytest
import torch

from causeseg.modularity import (
    affinity_graph,
    gather_tokens,
    grid_sample_indices,
    modularity_from_assignments,
    modularity_loss,
    modularity_matrix,
    modularity_objective,
    modularity_trace,
    pair_weights,
    soft_assignments,
)

DT = torch.float64


# ----------------------------------------------------------------------------- naive references


def cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u @ v) / (u.norm() * v.norm())


def naive_objective(x: torch.Tensor, m: torch.Tensor, tau: float, variant: str) -> torch.Tensor:
    """Per-image loops; the 'code' variant materialises (k, n, n) and takes the max over k."""
    hs = []
    for b in range(x.shape[0]):
        xb = x[b]
        n = xb.shape[0]
        a = torch.stack([torch.stack([cos(xb[i], xb[j]).clamp_min(0) if i != j else xb.new_zeros(())
                                      for j in range(n)]) for i in range(n)])
        d = a.sum(1)
        e = a.sum()
        w = a - torch.outer(d, d) / e
        c = torch.stack([torch.stack([cos(xb[i], m[q]).clamp_min(0) for q in range(m.shape[0])]) for i in range(n)])
        if variant == "paper":
            delta = torch.tanh(c @ c.t() / tau)
        else:
            full = torch.tanh(c.t()[:, :, None] * c.t()[:, None, :] / tau)  # (k, n, n)
            delta = full.max(0).values
        hs.append((w * delta).sum() / e)
    return torch.stack(hs)


def newman_q(a: torch.Tensor, labels: list[int]) -> float:
    """Newman's modularity Q = (1/2m) sum_ij (A_ij - k_i k_j / 2m) [c_i = c_j], by loops."""
    n = a.shape[0]
    deg = [sum(float(a[i, j]) for j in range(n)) for i in range(n)]
    two_m = sum(deg)
    q = 0.0
    for i in range(n):
        for j in range(n):
            if labels[i] == labels[j]:
                q += float(a[i, j]) - deg[i] * deg[j] / two_m
    return q / two_m


# ----------------------------------------------------------------------------- objective


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("b,n,k,c", [(2, 6, 9, 5), (3, 8, 4, 7), (1, 5, 5, 3)])
def test_objective_matches_naive_value_and_gradient(variant, b, n, k, c):
    g = torch.Generator().manual_seed(b * 100 + n * 10 + k)
    x0 = torch.randn(b, n, c, generator=g, dtype=DT)
    m0 = torch.randn(k, c, generator=g, dtype=DT)
    for tau in (0.1, 0.7):
        m1 = m0.clone().requires_grad_(True)
        x1 = x0.clone().requires_grad_(True)
        h1 = modularity_objective(x1, m1, tau=tau, variant=variant, chunk_size=7)  # tiny chunks
        (h1 * torch.arange(1, b + 1, dtype=DT)).sum().backward()
        m2 = m0.clone().requires_grad_(True)
        x2 = x0.clone().requires_grad_(True)
        h2 = naive_objective(x2, m2, tau, variant)
        (h2 * torch.arange(1, b + 1, dtype=DT)).sum().backward()
        torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m1.grad, m2.grad, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)
        assert m1.grad.abs().sum() > 0


def test_code_variant_chunking_does_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 6, generator=g, dtype=DT)
    m = torch.randn(10, 6, generator=g, dtype=DT, requires_grad=True)
    ref = modularity_objective(x, m, variant="code", chunk_size=None)
    (gref,) = torch.autograd.grad(ref.sum(), m)
    for cs in (1, 5, 24, 100, 10**9):
        h = modularity_objective(x, m, variant="code", chunk_size=cs)
        (gh,) = torch.autograd.grad(h.sum(), m)
        assert torch.equal(h, ref)
        assert torch.equal(gh, gref)


def test_code_and_paper_differ_on_soft_assignments():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 10, 4, generator=g, dtype=DT)
    m = torch.randn(6, 4, generator=g, dtype=DT)
    hc = modularity_objective(x, m, tau=1.0, variant="code")
    hp = modularity_objective(x, m, tau=1.0, variant="paper")
    assert not torch.allclose(hc, hp)


def test_modularity_loss_is_negative_mean():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 4, generator=g, dtype=DT)
    m = torch.randn(5, 4, generator=g, dtype=DT)
    for v in ("code", "paper"):
        torch.testing.assert_close(modularity_loss(x, m, variant=v), -modularity_objective(x, m, variant=v).mean())


def random_affinity(n: int, g: torch.Generator) -> torch.Tensor:
    a = torch.rand(n, n, generator=g, dtype=DT)
    a = (a + a.t()) / 2
    a = a * (torch.rand(n, n, generator=g, dtype=DT) > 0.3)  # some missing edges (kept symmetric below)
    a = torch.minimum(a, a.t())
    a.fill_diagonal_(0)
    return a


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_one_hot_assignments_give_newman_modularity(variant):
    g = torch.Generator().manual_seed(6)
    tau = 0.3
    n, k = 9, 4
    a = torch.stack([random_affinity(n, g) for _ in range(2)])
    labels = [torch.randint(0, k, (n,), generator=g).tolist() for _ in range(2)]
    c = torch.stack([torch.nn.functional.one_hot(torch.tensor(lb), k).to(DT) for lb in labels])
    h = modularity_from_assignments(a, c, tau=tau, variant=variant)
    q = torch.tensor([newman_q(a[i], labels[i]) for i in range(2)], dtype=DT)
    torch.testing.assert_close(h, math.tanh(1 / tau) * q, rtol=1e-12, atol=1e-12)
    # Eq. 3 / Eq. 5 without the tanh is Q itself
    w, e = modularity_matrix(a)
    torch.testing.assert_close(modularity_trace(w, e, c), q, rtol=1e-12, atol=1e-12)


def test_one_hot_through_features_and_clusterbook():
    """x rows are basis vectors and M the identity, so C is exactly one-hot."""
    tau = 0.1
    labels = [0, 0, 1, 2, 2, 2, 1, 3]
    c_dim = 5
    x = torch.nn.functional.one_hot(torch.tensor(labels), c_dim).to(DT)
    m = torch.eye(c_dim, dtype=DT)
    a = affinity_graph(x[None])[0]
    q = newman_q(a, labels)
    for v in ("code", "paper"):
        h = modularity_objective(x[None], m, tau=tau, variant=v)
        torch.testing.assert_close(h, torch.tensor([math.tanh(1 / tau) * q], dtype=DT))
    assert q > 0


def test_trace_eq3_equals_eq5():
    g = torch.Generator().manual_seed(7)
    a = random_affinity(6, g)[None]
    c = torch.rand(1, 6, 3, generator=g, dtype=DT)
    w, e = modularity_matrix(a)
    eq5 = torch.trace(c[0] @ c[0].t() @ w[0]) / e[0]
    torch.testing.assert_close(modularity_trace(w, e, c)[0], eq5)


def test_affinity_graph_and_modularity_matrix_properties():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 3, generator=g, dtype=DT)
    a = affinity_graph(x)
    assert torch.all(a >= 0)
    assert torch.all(torch.diagonal(a, dim1=1, dim2=2) == 0)
    torch.testing.assert_close(a, a.transpose(1, 2))
    for b in range(2):
        for i in range(7):
            for j in range(7):
                if i != j:
                    torch.testing.assert_close(a[b, i, j], cos(x[b, i], x[b, j]).clamp_min(0))
    w, e = modularity_matrix(a)
    torch.testing.assert_close(e, a.sum((1, 2)))
    torch.testing.assert_close(w.sum(-1), torch.zeros(2, 7, dtype=DT))  # rows of W sum to zero


def test_empty_graph_gives_zero_not_nan():
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=DT)  # cos = -1 -> no edge
    m = torch.randn(3, 2, dtype=DT, requires_grad=True)
    h = modularity_objective(x, m)
    h.sum().backward()
    assert torch.equal(h, torch.zeros(1, dtype=DT))
    assert torch.isfinite(m.grad).all()


def test_soft_assignments_and_pair_weights_bounds():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 4, generator=g)
    m = torch.randn(6, 4, generator=g)
    c = soft_assignments(x, m)
    assert c.shape == (2, 5, 6) and torch.all(c >= 0) and torch.all(c <= 1 + 1e-6)
    for v in ("code", "paper"):
        d = pair_weights(c, tau=0.1, variant=v)
        assert torch.all(d >= 0) and torch.all(d <= 1)  # Eq. 7


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="variant"):
        modularity_objective(torch.randn(1, 3, 2), torch.randn(2, 2), variant="nope")
    with pytest.raises(ValueError, match="width"):
        modularity_objective(torch.randn(1, 3, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="block"):
        grid_sample_indices(1, 3, 8, window=4)


# ----------------------------------------------------------------------------- sampling


def test_grid_sample_one_index_per_block():
    g = torch.Generator().manual_seed(0)
    h, w, win = 23, 18, 4  # 5 x 4 blocks, 3 rows and 2 columns dropped
    idx = grid_sample_indices(6, h, w, window=win, generator=g)
    assert idx.shape == (6, 20) and idx.dtype == torch.long
    rows, cols = idx // w, idx % w
    for b in range(6):
        for blk in range(20):
            by, bx = divmod(blk, 4)
            r, c = int(rows[b, blk]), int(cols[b, blk])
            assert by * win <= r < (by + 1) * win and bx * win <= c < (bx + 1) * win
        blocks = sorted((int(r) // win) * 4 + int(c) // win for r, c in zip(rows[b], cols[b]))
        assert blocks == list(range(20))  # every block covered exactly once


def test_grid_sample_deterministic_with_seed():
    a = grid_sample_indices(3, 16, 16, generator=torch.Generator().manual_seed(42))
    b = grid_sample_indices(3, 16, 16, generator=torch.Generator().manual_seed(42))
    c = grid_sample_indices(3, 16, 16, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_grid_sample_roughly_uniform_and_independent():
    g = torch.Generator().manual_seed(1)
    draws = 4000
    idx = grid_sample_indices(draws, 8, 8, window=4, generator=g)  # 4 blocks of 16 positions
    rows, cols = idx // 8, idx % 8
    offs = (rows % 4) * 4 + cols % 4  # (draws, 4) position inside the block
    expected = draws / 16
    for blk in range(4):
        counts = torch.bincount(offs[:, blk], minlength=16).to(DT)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 45.0, chi2  # 15 dof: P(chi2 > 45) < 1e-4
    # different blocks / images are not copies of each other
    assert (offs[:, 0] == offs[:, 1]).double().mean() < 0.15
    assert (offs[:-1, 0] == offs[1:, 0]).double().mean() < 0.15


def test_gather_tokens():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    idx = torch.tensor([[4, 0], [1, 1]])
    out = gather_tokens(x, idx)
    assert torch.equal(out[0, 0], x[0, 4]) and torch.equal(out[0, 1], x[0, 0])
    assert torch.equal(out[1, 0], x[1, 1]) and torch.equal(out[1, 1], x[1, 1])
    with pytest.raises(ValueError):
        gather_tokens(x, torch.tensor([0, 1]))


def newman_q_gamma(a: torch.Tensor, labels: list[int], gamma: float) -> float:
    """Reichardt-Bornholdt modularity (1/2m) sum_ij (A_ij - gamma k_i k_j / 2m) [c_i = c_j], by loops."""
    n = a.shape[0]
    deg = [sum(float(a[i, j]) for j in range(n)) for i in range(n)]
    two_m = sum(deg)
    return sum(float(a[i, j]) - gamma * deg[i] * deg[j] / two_m
               for i in range(n) for j in range(n) if labels[i] == labels[j]) / two_m


@pytest.mark.parametrize("gamma", [0.5, 1.0, 1.7])
def test_resolution_gamma_gives_reichardt_bornholdt_modularity(gamma):
    g = torch.Generator().manual_seed(9)
    n, k = 8, 3
    a = random_affinity(n, g).unsqueeze(0)
    labels = torch.randint(0, k, (n,), generator=g).tolist()
    c = torch.nn.functional.one_hot(torch.tensor(labels), k).to(DT).unsqueeze(0)
    w, e = modularity_matrix(a, gamma)
    assert modularity_trace(w, e, c).item() == pytest.approx(newman_q_gamma(a[0], labels, gamma), abs=1e-12)
    h = modularity_from_assignments(a, c, tau=0.5, gamma=gamma)
    assert h.item() == pytest.approx(math.tanh(2.0) * newman_q_gamma(a[0], labels, gamma), abs=1e-12)
    # the whole objective: gamma = 1 is the default (Eq. 3)
    x, m = torch.randn(2, 6, 5, generator=g, dtype=DT), torch.randn(4, 5, generator=g, dtype=DT)
    if gamma == 1.0:
        torch.testing.assert_close(modularity_objective(x, m, gamma=gamma), modularity_objective(x, m))
    else:
        assert not torch.allclose(modularity_objective(x, m, gamma=gamma), modularity_objective(x, m))
