"""Flip TTA, upsampling and cluster probabilities against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from causeseg.tta import cluster_argmax, cluster_cosine, cluster_probs, flip_average, hflip, upsample


def symmetric_conv(seed: int) -> nn.Conv2d:
    """A conv whose kernels are left-right symmetric: flip-equivariant (with symmetric padding)."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv


def test_flip_tta_is_exact_on_symmetric_input_with_equivariant_fn():
    torch.manual_seed(0)
    half = torch.rand(2, 3, 8, 5)
    x = torch.cat([half, half.flip(-1)], dim=-1)  # left-right symmetric image
    assert torch.equal(x, hflip(x))
    fn = symmetric_conv(1).double()
    x = x.double()
    with torch.no_grad():
        y = fn(x)
        out = flip_average(fn, x)
    # exact up to float64 summation order (the two views give the same map)
    torch.testing.assert_close(out, y, rtol=0, atol=1e-12)


def test_flip_tta_of_equivariant_fn_equals_single_view_on_any_input():
    # fails if the mirrored output were not flipped back before averaging
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 9, dtype=torch.float64)
    fn = symmetric_conv(2).double()
    with torch.no_grad():
        torch.testing.assert_close(flip_average(fn, x), fn(x), rtol=0, atol=1e-12)
        assert not torch.allclose(fn(hflip(x)), fn(x))


def test_flip_tta_equals_hand_average_for_non_symmetric_fn():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 7)
    fn = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        out = flip_average(fn, x)
        a = fn(x)
        b = fn(torch.flip(x, dims=[3]))
        expected = torch.empty_like(a)
        w = x.shape[-1]
        for j in range(w):  # explicit un-flip column by column
            expected[..., j] = (a[..., j] + b[..., w - 1 - j]) / 2
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(out, a)  # the TTA changed something (fn is not equivariant)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        flip_average(fn, x[0])


def test_upsample_is_bilinear_align_corners_false():
    y = torch.tensor([[[[0.0, 1.0]]]])  # (1,1,1,2) -> width 4
    out = upsample(y, (1, 4))
    # half-pixel centres: output x = (j + 0.5)/2 - 0.5 -> -0.25, 0.25, 0.75, 1.25 -> clamped interpolation
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.25, 0.75, 1.0]]]]))
    same = torch.rand(1, 2, 3, 3)
    assert upsample(same, (3, 3)) is same


def test_cluster_probs_and_argmax_match_naive_loops():
    torch.manual_seed(0)
    y = torch.randn(2, 4, 3, 5)
    z = torch.randn(6, 4)
    cos = cluster_cosine(y, z)
    p = cluster_probs(y, z, alpha=3.0)
    lab = cluster_argmax(y, z)
    assert cos.shape == (2, 6, 3, 5) and p.shape == (2, 6, 3, 5) and lab.shape == (2, 3, 5)
    for b in range(2):
        for i in range(3):
            for j in range(5):
                v = y[b, :, i, j]
                c = torch.stack([torch.dot(v, z[k]) / (v.norm() * z[k].norm()) for k in range(6)])
                torch.testing.assert_close(cos[b, :, i, j], c, rtol=1e-5, atol=1e-6)
                e = torch.exp(3.0 * c)
                torch.testing.assert_close(p[b, :, i, j], e / e.sum(), rtol=1e-5, atol=1e-6)
                assert lab[b, i, j] == int(c.argmax())
    # scale invariance: cosine ignores the norms of embeddings and centroids
    torch.testing.assert_close(cluster_probs(5 * y, 0.1 * z), p)
    # alpha sharpens: the top probability grows with alpha
    assert (cluster_probs(y, z, alpha=10.0).amax(1) >= p.amax(1) - 1e-7).all()
    assert math.isclose(float(cluster_probs(y, z, alpha=0.0)[0, 0, 0, 0]), 1 / 6, rel_tol=1e-6)
    with pytest.raises(ValueError, match="same r"):
        cluster_cosine(y, torch.randn(6, 3))


def test_pipeline_flip_then_upsample_then_probs_shapes():
    fn = nn.Conv2d(3, 4, 4, stride=4)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        y = upsample(flip_average(fn, x), (16, 16))
        p = cluster_probs(y, torch.randn(3, 4))
    assert p.shape == (1, 3, 16, 16)
    torch.testing.assert_close(p.sum(1), torch.ones(1, 16, 16))


def test_predictor_scores_equal_the_batched_protocol_computed_by_hand():
    """Predictor.scores upsamples one image at a time (memory); the result is the batched formula."""
    from causeseg.model import CauseModel
    from causeseg.predict import Predictor

    torch.manual_seed(0)
    backbone = nn.Conv2d(3, 6, 4, stride=4)
    model = CauseModel(backbone, nn.Identity(), torch.zeros(1, 6), torch.randn(5, 6))
    x = torch.rand(3, 3, 16, 20)
    pred = Predictor(model, flip=False, alpha=2.5)
    with torch.no_grad():
        y = backbone(x)
        up = torch.nn.functional.interpolate(y, size=(16, 20), mode="bilinear", align_corners=False)
        ref = 2.5 * torch.einsum("brhw,cr->bchw", torch.nn.functional.normalize(up, dim=1),
                                 torch.nn.functional.normalize(model.centroids, dim=1))
    torch.testing.assert_close(pred.scores(x), ref, rtol=1e-5, atol=1e-5)
