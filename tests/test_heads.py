"""Heads vs independent references (nn.MultiheadAttention sequence-first), dropout, EMA teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causeseg.heads import (MLPHead, ProjectionHead, TRHead, concept_queries, ema_decay, ema_update, interpolate_pos,
                            make_teacher)

C, R, FFN = 8, 5, 16


def test_mlp_head_matches_reference_eval():
    torch.manual_seed(0)
    head = MLPHead(C, R).eval()
    t = torch.randn(2, 7, C)
    w1, b1 = head.f1.weight, head.f1.bias
    wa, ba, wb, bb = head.f2[0].weight, head.f2[0].bias, head.f2[2].weight, head.f2[2].bias
    exp = torch.zeros(2, 7, R)
    for i in range(2):
        for j in range(7):
            x = t[i, j]
            exp[i, j] = w1 @ x + b1 + wb @ torch.clamp(wa @ x + ba, min=0) + bb
    assert torch.allclose(head(t), exp, atol=1e-5)
    assert set(head.state_dict()) == {"f1.weight", "f1.bias", "f2.0.weight", "f2.0.bias", "f2.2.weight",
                                      "f2.2.bias"}


def test_mlp_head_dropout_independent_masks():
    torch.manual_seed(0)
    head = MLPHead(C, R, dropout=0.5)
    outs = []
    handle = head.dropout.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    t = torch.randn(3, 10, C) + 5.0  # no zeros in the input
    head.train()
    y1 = head(t)
    assert len(outs) == 2  # two independent draws, one per branch
    assert not torch.equal(outs[0] == 0, outs[1] == 0)
    assert not torch.allclose(y1, head(t))  # fresh masks on each call
    head.eval()
    outs.clear()
    assert torch.equal(head(t), head(t))
    assert all(torch.equal(o, t) for o in outs)  # no dropout in eval
    handle.remove()


# --------------------------------------------------------------------------- TR reference
class RefDecoder(nn.Module):
    """Built from sequence-first nn.MultiheadAttention (as the official code), same parameter names."""

    def __init__(self, c: int, r: int, nq: int, ffn: int, extra_residual: bool):
        super().__init__()
        self.extra_residual = extra_residual
        self.pos = nn.Parameter(torch.zeros(nq, c))
        self.self_attn = nn.MultiheadAttention(c, 1, dropout=0.1)
        self.cross_attn = nn.MultiheadAttention(c, 1, dropout=0.1)
        self.linear1, self.linear2 = nn.Linear(c, ffn), nn.Linear(ffn, c)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(c), nn.LayerNorm(c), nn.LayerNorm(c)
        self.f1 = nn.Linear(c, r)
        self.f2 = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, r))

    def forward(self, t: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        # step 1: brute-force cosine argmax, raw codebook rows
        q = torch.zeros_like(t)
        for i in range(b):
            for j in range(n):
                cos = torch.stack([torch.dot(t[i, j], m) / (t[i, j].norm() * m.norm()) for m in codebook])
                q[i, j] = codebook[int(cos.argmax())]
        tq = t.transpose(0, 1)  # sequence-first (N, B, c)
        q = q.transpose(0, 1)
        pos = self.pos.unsqueeze(1)
        u = self.norm1(q + self.self_attn(q + pos, q + pos, q)[0])  # step 3
        u = self.norm2(u + self.cross_attn(u + pos, tq, tq)[0])  # step 4
        u = u + self.linear2(F.relu(self.linear1(u)))  # step 5
        u = tq + self.norm3(u) if self.extra_residual else self.norm3(u)  # step 6
        u = u.transpose(0, 1)
        return self.f1(u) + self.f2(u)  # step 7


def _codebook(k: int = 6) -> torch.Tensor:
    return torch.randn(k, C) * torch.linspace(0.2, 5.0, k).unsqueeze(1)  # rows of very different norms


@pytest.mark.parametrize("extra_residual", [True, False])
def test_tr_head_matches_reference_eval(extra_residual):
    torch.manual_seed(0)
    head = TRHead(C, R, num_queries=9, ffn_dim=FFN, extra_residual=extra_residual).eval()
    with torch.no_grad():  # non-trivial norms / biases so that every parameter matters
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = RefDecoder(C, R, 9, FFN, extra_residual).eval()
    ref.load_state_dict(head.state_dict(), strict=True)  # parameter names are nn.MultiheadAttention's
    t, book = torch.randn(2, 9, C), _codebook()
    y = head(t, book)
    assert y.shape == (2, 9, R)
    assert torch.allclose(y, ref(t, book), atol=1e-5)
    # pre-computed query indices give the same result; grid equal to the square is the same
    idx = (F.normalize(t, dim=-1) @ F.normalize(book, dim=-1).t()).argmax(-1)
    assert torch.allclose(head(t, book, concepts=idx), y, atol=0)
    assert torch.allclose(head(t, book, grid=(3, 3)), y, atol=0)
    # queries are the RAW rows: a normalised codebook (same argmax) changes the output
    assert not torch.allclose(head(t, F.normalize(book, dim=-1)), y, atol=1e-3)


def test_extra_residual_switch_changes_output():
    torch.manual_seed(0)
    a = TRHead(C, R, num_queries=4, ffn_dim=FFN, extra_residual=True).eval()
    b = TRHead(C, R, num_queries=4, ffn_dim=FFN, extra_residual=False).eval()
    b.load_state_dict(a.state_dict())
    t, book = torch.randn(1, 4, C), _codebook()
    assert not torch.allclose(a(t, book), b(t, book), atol=1e-3)


def test_query_argmax_is_cosine_not_dot():
    t = torch.tensor([[[1.0, 0.0]]])
    book = torch.tensor([[10.0, 10.0], [1.0, 0.05], [-3.0, 0.0]])
    assert int((t[0, 0] @ book.t()).argmax()) == 0  # the raw dot product would pick row 0
    q = concept_queries(t, book)
    assert torch.equal(q[0, 0], book[1])  # cosine picks row 1 and returns it un-normalised
    with pytest.raises(ValueError):
        concept_queries(t, torch.zeros(3, 5))


def test_tr_head_dropout_train_vs_eval_and_grads():
    torch.manual_seed(0)
    head = TRHead(C, R, num_queries=16, ffn_dim=FFN, dropout=0.3)
    t, book = torch.randn(2, 16, C), _codebook()
    head.train()
    torch.manual_seed(1)
    y1 = head(t, book)
    torch.manual_seed(1)
    y1b = head(t, book)
    torch.manual_seed(2)
    y2 = head(t, book)
    assert torch.equal(y1, y1b)  # same seed -> same result
    assert not torch.allclose(y1, y2)  # dropout active
    head.eval()
    assert torch.equal(head(t, book), head(t, book))
    head.train()
    head(t, book).square().sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert head.pos.grad.abs().sum() > 0


def test_attention_dropout_is_active_in_training():
    """With every other dropout off, the attention-weight dropout alone changes the output."""
    torch.manual_seed(0)
    head = TRHead(C, R, num_queries=16, ffn_dim=FFN, dropout=0.5).train()
    for m in (head.dropout1, head.dropout2, head.dropout3, head.ffn_dropout, head.dropout):
        m.p = 0.0
    t, book = torch.randn(1, 16, C), _codebook()
    torch.manual_seed(1)
    y1 = head(t, book)
    torch.manual_seed(2)
    assert not torch.allclose(y1, head(t, book))
    head.self_attn.dropout = head.cross_attn.dropout = 0.0
    assert torch.allclose(head(t, book), head.eval()(t, book), atol=1e-6)


def test_pos_interpolation():
    pos = torch.randn(16, 3)
    assert interpolate_pos(pos, (4, 4)) is pos
    out = interpolate_pos(pos, (2, 6))
    assert out.shape == (12, 3)
    const = torch.full((16, 3), 0.7)
    assert torch.allclose(interpolate_pos(const, (5, 7)), torch.full((35, 3), 0.7))
    # 2x downsampling of a 4x4 grid with align_corners=False averages 2x2 blocks
    img = torch.arange(16.0).reshape(16, 1)
    down = interpolate_pos(img, (2, 2)).flatten()
    assert torch.allclose(down, torch.tensor([2.5, 4.5, 10.5, 12.5]))
    with pytest.raises(ValueError, match="square"):
        interpolate_pos(torch.randn(12, 3), (2, 2))
    torch.manual_seed(0)
    head = TRHead(C, R, num_queries=16, ffn_dim=FFN).eval()
    t, book = torch.randn(1, 12, C), _codebook()
    assert head(t, book, grid=(3, 4)).shape == (1, 12, R)
    with pytest.raises(ValueError, match="grid"):
        head(t, book)
    with pytest.raises(ValueError, match="does not match"):
        head(t, book, grid=(3, 3))


def test_projection_head():
    torch.manual_seed(0)
    p = ProjectionHead(R, 11)
    y = torch.randn(2, 3, R)
    assert torch.allclose(p(y), y @ p.linear.weight.t() + p.linear.bias, atol=1e-6)
    assert p(y).shape == (2, 3, 11)


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.register_buffer("stat", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def test_make_teacher_and_ema_update_exact():
    torch.manual_seed(0)
    student = _WithBuffer()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert all(tp.data_ptr() != sp.data_ptr() for tp, sp in zip(teacher.parameters(), student.parameters()))
    hand = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    lam = 0.9
    for step in range(5):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
            student.stat.add_(1.0)
            student.steps.add_(1)
        ema_update(teacher, student, lam)
        for n, p in student.named_parameters():
            hand[n] = lam * hand[n] + (1 - lam) * p.detach()
        for n, p in teacher.named_parameters():
            assert torch.allclose(p, hand[n], rtol=0, atol=1e-12), (step, n)
        assert torch.equal(teacher.stat, student.stat) and int(teacher.steps) == step + 1
    assert all(p.grad is None for p in teacher.parameters())
    # a teacher never follows the student outside ema_update
    with torch.no_grad():
        student.lin.weight.add_(100.0)
    assert torch.allclose(teacher.lin.weight, hand["lin.weight"])


def test_ema_decay_constant_and_mean_teacher_ramp():
    assert [ema_decay(t, 0.99) for t in (0, 1, 500)] == [0.99, 0.99, 0.99]
    assert [ema_decay(t, 0.99, warmup=True) for t in (0, 1, 3, 98, 99, 100, 10_000)] == [
        0.0, 0.5, 0.75, 1 - 1 / 99, 0.99, 0.99, 0.99]
    with pytest.raises(ValueError, match="step"):
        ema_decay(-1, 0.99, warmup=True)


def test_ema_warmup_teacher_is_running_mean_of_students():
    """With the ramp, after n <= 100 updates the teacher is the plain mean of the n student states."""
    torch.manual_seed(0)
    student = _WithBuffer()
    teacher = make_teacher(student)
    with torch.no_grad():
        teacher.lin.weight.fill_(1e6)  # the initial teacher must drop out entirely
    states = []
    for step in range(7):
        with torch.no_grad():
            student.lin.weight.copy_(torch.randn_like(student.lin.weight))
        states.append(student.lin.weight.detach().clone())
        ema_update(teacher, student, ema_decay(step, 0.99, warmup=True))
        assert torch.allclose(teacher.lin.weight, torch.stack(states).mean(0), rtol=0, atol=1e-9), step


def test_ema_update_on_tr_head_includes_pos_and_rejects_mismatch():
    torch.manual_seed(0)
    s = TRHead(C, R, num_queries=4, ffn_dim=FFN)
    t = make_teacher(s)
    with torch.no_grad():
        s.pos.add_(1.0)
    before = t.pos.clone()
    ema_update(t, s, 0.99)
    assert torch.allclose(t.pos, 0.99 * before + 0.01 * s.pos, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        ema_update(MLPHead(C, R), s)
    with pytest.raises(ValueError, match="shape"):
        ema_update(MLPHead(C, R), MLPHead(C, R + 1))
