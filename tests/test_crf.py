"""Dense CRF wrapper: refinement on a synthetic two-region image, pool == serial, timeouts, bad input, and the
official CRF input (BGR after the normalise / un-normalise round trip)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from scipy import ndimage

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf (PyPI pydensecrf2) not installed")

import pydensecrf.densecrf as dcrf  # noqa: E402

from causeseg.crf import CRFParams, CRFRunner, dense_crf, protocol_image, to_uint8_image  # noqa: E402


def synthetic_case(seed: int, size: int = 64, patch: int = 8):
    """Image with a red disk on a blue background; blocky, noisy probabilities like a ViT's patch grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = size * 0.5 + rng.uniform(-4, 4), size * 0.5 + rng.uniform(-4, 4), size * 0.28
    truth = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.int64)
    img = np.where(truth[..., None] == 1, np.array([200, 40, 40]), np.array([30, 40, 190]))
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    # patch-level averages, bilinearly upsampled -> smeared boundaries, plus pixel noise
    coarse = truth.reshape(size // patch, patch, size // patch, patch).mean(axis=(1, 3))
    up = ndimage.zoom(coarse, patch, order=1, mode="nearest")[:size, :size]
    p1 = np.clip(0.5 + 0.7 * (up - 0.5) + rng.normal(0, 0.2, up.shape), 0.02, 0.98)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    return img, probs, truth


def boundary_band(truth: np.ndarray, width: int = 4) -> np.ndarray:
    return ndimage.binary_dilation(truth, iterations=width) & ~ndimage.binary_erosion(truth, iterations=width)


def test_crf_improves_agreement_and_boundaries():
    img, probs, truth = synthetic_case(0)
    out = dense_crf(img, probs)
    assert out.shape == probs.shape and out.dtype == np.float32
    np.testing.assert_allclose(out.sum(axis=0), 1.0, atol=1e-4)
    before, after = probs.argmax(0), out.argmax(0)
    acc_before, acc_after = (before == truth).mean(), (after == truth).mean()
    band = boundary_band(truth)
    b_before, b_after = (before == truth)[band].mean(), (after == truth)[band].mean()
    assert acc_after > acc_before + 0.02, (acc_before, acc_after)
    assert acc_after > 0.97
    assert b_after > b_before + 0.05, (b_before, b_after)


def test_crf_zero_iterations_is_softmax_of_log_probs():
    img, probs, _ = synthetic_case(1, size=32)
    out = dense_crf(img, probs, CRFParams(iterations=0))
    np.testing.assert_allclose(out, probs / probs.sum(0, keepdims=True), atol=1e-5)


def test_crf_accepts_torch_and_readonly_inputs():
    img, probs, _ = synthetic_case(2, size=32)
    ro = img.copy()
    ro.setflags(write=False)  # like np.asarray(PIL.Image)
    a = dense_crf(ro, torch.from_numpy(probs))
    b = dense_crf(img, probs)
    np.testing.assert_array_equal(a, b)


def test_bad_shapes_raise_clear_errors():
    img, probs, _ = synthetic_case(3, size=32)
    with pytest.raises(ValueError, match=r"do not match the image size"):
        dense_crf(img, probs[:, :16], source="x.png")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        dense_crf(img[..., :2], probs)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(img.astype(np.float32), probs)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        dense_crf(img, probs[0])
    with pytest.raises(ValueError, match="non-negative"):
        dense_crf(img, -probs)
    with pytest.raises(ValueError, match="image 1"):
        CRFRunner(workers=0).run([img, img], [probs, probs[:, :8]])


def test_to_uint8_image_truncates_like_to_pil_image():
    x = torch.tensor([0.0, 0.5, 1.0, 0.999, 1.5, -0.2]).reshape(3, 1, 2)
    u = to_uint8_image(x)
    assert u.shape == (1, 2, 3) and u.dtype == np.uint8 and u.flags.c_contiguous and u.flags.writeable
    expected = (x.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # torch casts by truncation
    np.testing.assert_array_equal(u, expected)
    assert to_uint8_image(x, rounding="round")[0, 1, 1] == 255  # 0.999*255 = 254.7 -> 255


def test_pool_equals_serial_and_context_manager_closes():
    cases = [synthetic_case(s, size=32 + 8 * (s % 2)) for s in range(3)]  # two different sizes
    imgs = [c[0] for c in cases]
    probs = [c[1] for c in cases]
    serial = CRFRunner(workers=0).run(imgs, probs)
    with CRFRunner(workers=2) as runner:
        pooled = runner.run(imgs, probs)
        assert runner._pool is not None
    assert runner._pool is None
    assert len(pooled) == len(serial) == 3
    for a, b, im, p in zip(serial, pooled, imgs, probs):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, dense_crf(im, p))


def _never_returns(image, probs, params):
    """A CRF worker that is stuck for good (it waits on an event nobody sets): a timeout must cut it off."""
    threading.Event().wait()


def test_pool_timeout_falls_back_and_counts():
    # No wall-clock race: the stuck worker never returns, whatever the machine's speed, and the run after the
    # restart has no deadline to miss.
    img, probs, _ = synthetic_case(4, size=48)
    with CRFRunner(workers=1, timeout=0.2) as runner:
        real_task, runner._task = runner._task, _never_returns
        with pytest.warns(RuntimeWarning, match="exceeded"):
            out = runner.run([img, img], [probs, 2 * probs])
        assert runner.num_timeouts == 2 and runner.timed_out == [0, 1]
        np.testing.assert_array_equal(out[0], probs)  # the un-refined probabilities, in input order
        np.testing.assert_array_equal(out[1], 2 * probs)
        assert runner._pool is None  # the pool with the stuck worker was terminated
        # the runner is still usable: a fresh pool does the real work
        runner._task, runner.timeout = real_task, None
        out2 = runner.run([img], [probs])
        np.testing.assert_array_equal(out2[0], dense_crf(img, probs))
        assert runner.num_timeouts == 2 and runner.timed_out == []  # the counter keeps the total


# -- the official CRF input ---------------------------------------------------------------------------------------
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def official_crf_image(image01: torch.Tensor) -> np.ndarray:
    """The official evaluation's image for pydensecrf, step by step in torch: torchvision ``Normalize``
    (``sub_(mean).div_(std)``), STEGO's ``UnNormalize`` (``mul_(s).add_(m)`` per channel), ``to_pil_image``
    (``mul(255).byte()``, HWC) and ``[:, :, ::-1]``."""
    x = image01.clone()
    x.sub_(torch.tensor(IMAGENET_MEAN).view(3, 1, 1)).div_(torch.tensor(IMAGENET_STD).view(3, 1, 1))
    for t, m, s in zip(x, IMAGENET_MEAN, IMAGENET_STD):
        t.mul_(s).add_(m)
    return x.mul(255).byte().permute(1, 2, 0).numpy()[:, :, ::-1]


def test_protocol_image_matches_the_official_round_trip():
    # every uint8 value in every channel, as ToTensor gives them (k / 255 in float32), plus off-grid floats
    u = torch.arange(256, dtype=torch.uint8).repeat(3, 1).reshape(3, 16, 16)
    grid = u.float().div(255)
    off = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    for x in (grid, off):
        expected = official_crf_image(x)
        got = protocol_image(x)
        assert got.dtype == np.uint8 and got.shape == (16, 16, 3) and got.flags.c_contiguous and got.flags.writeable
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(protocol_image(x.numpy(), channels="rgb"), expected[:, :, ::-1])
    # the round trip matters: plain truncation of k/255 gives k back, the protocol gives k - 1 for some values
    plain = to_uint8_image(grid)[:, :, ::-1]
    diff = plain.astype(int) - protocol_image(grid).astype(int)
    assert set(np.unique(diff)) == {0, 1} and (diff == 1).sum() > 50
    with pytest.raises(ValueError, match="channels"):
        protocol_image(grid, channels="hsv")
    with pytest.raises(ValueError, match="float"):
        protocol_image(u)


def test_refine_equals_pydensecrf_on_the_official_bgr_image():
    img, probs, _ = synthetic_case(5, size=40)
    x = torch.from_numpy(img).permute(2, 0, 1).float().div(255)
    bgr = np.ascontiguousarray(official_crf_image(x))
    # pydensecrf run directly, as the official dense_crf does
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(probs).reshape(c, -1)))
    d.addPairwiseGaussian(sxy=1, compat=3)
    d.addPairwiseBilateral(sxy=67, srgb=3, rgbim=bgr, compat=4)
    expected = np.array(d.inference(10), dtype=np.float32).reshape(c, h, w)
    got = CRFRunner(workers=0).refine(x[None], [probs])[0]
    np.testing.assert_array_equal(got, expected)
    rgb = CRFRunner(workers=0, channels="rgb").refine([x], [probs])[0]
    np.testing.assert_array_equal(rgb, dense_crf(bgr[:, :, ::-1], probs))
    with pytest.raises(ValueError, match="channels"):
        CRFRunner(workers=0, channels="RGB")
