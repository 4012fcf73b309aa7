"""Linear probe: never touches other modules, learns a separable toy problem, deterministic."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causeseg.probe import LinearProbe, evaluate_probe, train_linear_probe


def toy_problem(seed: int, n: int = 6, r: int = 4, c: int = 3, h: int = 8, up: int = 2):
    """Features whose class is a fixed linear function's argmax; labels at `up`× the feature size."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(c, r, generator=g)
    batches = []
    for _ in range(n):
        f = torch.randn(2, r, h, h, generator=g)
        lab = torch.einsum("cr,brhw->bchw", w_true, f).argmax(1)
        lab = F.interpolate(lab[:, None].float(), scale_factor=up, mode="nearest")[:, 0].long()
        lab[:, 0, :] = -1  # some ignored pixels
        batches.append((f, lab))
    return batches


def test_probe_never_changes_the_feature_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    images = [torch.rand(2, 3, 6, 6) for _ in range(3)]
    labels = [torch.randint(-1, 4, (2, 12, 12)) for _ in range(3)]
    # eager list: features still attached to net's graph (the probe must detach them itself)
    eager = [(net(x), y) for x, y in zip(images, labels)]
    assert eager[0][0].requires_grad
    probe = train_linear_probe(eager, in_dim=8, num_classes=4, epochs=2, lr=0.1)
    # generator source, re-created every epoch: produced under the probe's no_grad block
    produced_with_grad = []

    def source():
        for x, y in zip(images, labels):
            f = net(x)
            produced_with_grad.append(f.requires_grad)
            yield f, y

    probe2 = train_linear_probe(source, in_dim=8, num_classes=4, epochs=2, lr=0.1)
    evaluate_probe(probe2, source())
    assert produced_with_grad and not any(produced_with_grad)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, p in net.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad  # the probe did not freeze/unfreeze anything either
    # the probes themselves did learn something (their weights moved away from the seeded init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = LinearProbe(8, 4)
    assert not torch.equal(init.linear.weight, probe.linear.weight)


def test_probe_learns_separable_toy_problem():
    data = toy_problem(0, n=8, up=1)  # labels at feature resolution: exactly linearly separable
    train, test = data[:6], data[6:]  # test batches are unseen features of the same true map
    probe = train_linear_probe(train, in_dim=4, num_classes=3, epochs=30, lr=0.05, seed=1)
    assert probe.history[-1] < probe.history[0] * 0.5
    res = evaluate_probe(probe, test, num_classes=3)
    assert res["supervised"] is True and res["mapping"] == [0, 1, 2]
    assert res["pacc"] > 0.95, res["pacc"]


def test_probe_upsamples_logits_to_label_size():
    data = toy_problem(1, n=2, up=2)
    probe = train_linear_probe(data, in_dim=4, num_classes=3, epochs=1)
    f, y = data[0]
    assert probe.predict(f, tuple(y.shape[-2:])).shape == y.shape == (2, 16, 16)
    expected = F.interpolate(probe(f), size=(16, 16), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(probe.predict(f, (16, 16)), expected)


def test_probe_is_deterministic_and_leaves_global_rng_alone():
    data = toy_problem(3, n=2)
    state = torch.random.get_rng_state()
    a = train_linear_probe(data, 4, 3, epochs=2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_linear_probe(data, 4, 3, epochs=2, seed=7)
    c = train_linear_probe(data, 4, 3, epochs=2, seed=8)
    assert torch.equal(a.linear.weight, b.linear.weight) and a.history == b.history
    assert not torch.equal(a.linear.weight, c.linear.weight)


def test_probe_input_errors():
    data = toy_problem(4, n=2)
    with pytest.raises(ValueError, match="one-shot iterator"):
        train_linear_probe(iter(data), 4, 3, epochs=2)
    with pytest.raises(ValueError, match=r"batch 0: features must be \(B, 5"):
        train_linear_probe(data, 5, 3)
    bad = [(data[0][0], data[0][1] + 3)]
    with pytest.raises(ValueError, match=r"label values must be in \[0, 3\)"):
        train_linear_probe(bad, 4, 3)
    all_ignored = [(data[0][0], torch.full_like(data[0][1], -1))]
    with pytest.raises(ValueError, match="no batch with labelled pixels"):
        train_linear_probe(all_ignored, 4, 3)
    # a one-shot generator is fine for a single epoch
    assert train_linear_probe(iter(data), 4, 3, epochs=1).history
