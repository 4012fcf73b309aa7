"""Protocol geometry (torchvision rules) and on-the-fly crops (torchvision five_crop / ten_crop semantics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.data.crops import (Crop, CropSpec, apply_crop, crop_boxes, five_crop_boxes, multi_crop_boxes,
                                 ten_crop_boxes)
from causeseg.data.transforms import (center_crop, mask_to_tensor, protocol_transform, resize_shorter, squash,
                                      to_tensor01)


def coord_image(w: int, h: int) -> Image.Image:
    """R = x, G = y (both < 256), B = (x + y) % 256."""
    ys, xs = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xs, ys, (xs + ys) % 256], axis=2).astype(np.uint8), "RGB")


def coord_mask(w: int, h: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return (ys * 1000 + xs).astype(np.int64)


@pytest.mark.parametrize("w,h,size,expected", [
    (480, 360, 320, (426, 320)),    # 320*480/360 = 426.67 -> 426 (truncated)
    (360, 480, 320, (320, 426)),
    (2048, 1024, 320, (640, 320)),
    (640, 427, 320, (479, 320)),    # 479.63 -> 479
    (500, 500, 224, (224, 224)),
    (513, 513, 320, (320, 320)),
    (100, 30, 64, (213, 64)),       # upscaling: 213.33 -> 213
])
def test_resize_shorter_sizes(w, h, size, expected):
    assert resize_shorter(Image.new("RGB", (w, h)), size).size == expected


@pytest.mark.parametrize("w,h,s,left,top", [
    (426, 320, 320, 53, 0),   # 106/2 = 53
    (427, 320, 320, 54, 0),   # 53.5 -> 54 (round half to even)
    (425, 320, 320, 52, 0),   # 52.5 -> 52
    (320, 479, 320, 0, 80),   # 79.5 -> 80
    (10, 9, 4, 3, 2),         # 3, 2.5 -> 2
])
def test_center_crop_offsets(w, h, s, left, top):
    img = Image.fromarray(coord_mask(w, h).astype(np.int32), "I")
    out = np.asarray(center_crop(img, s))
    assert out.shape == (s, s)
    assert out[0, 0] == top * 1000 + left
    np.testing.assert_array_equal(out, coord_mask(w, h)[top:top + s, left:left + s])


def test_center_crop_pads_like_torchvision():
    img = Image.new("L", (3, 5), 7)
    out = np.asarray(center_crop(img, (4, 6)))  # (h, w): width 3 -> 6 padded (1 left, 2 right); height cropped
    expected = np.zeros((4, 6), dtype=np.uint8)
    expected[:, 1:4] = 7
    np.testing.assert_array_equal(out, expected)


def test_squash_and_to_tensor():
    img = coord_image(30, 20)
    assert squash(img, 16).size == (16, 16)
    t = to_tensor01(img)
    assert t.dtype == torch.float32 and t.shape == (3, 20, 30)
    np.testing.assert_allclose(t[0].numpy(), np.asarray(img)[..., 0] / 255.0, rtol=0, atol=1e-7)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    m = mask_to_tensor(np.array([[-1, 3], [255, 0]], dtype=np.int16))
    assert m.dtype == torch.int64 and m.tolist() == [[-1, 3], [255, 0]]


@pytest.mark.parametrize("mode", ["center", "squash", "none"])
@pytest.mark.parametrize("w,h", [(200, 150), (150, 200), (97, 61)])
def test_protocol_same_geometry_for_image_and_mask(mode, w, h):
    img, mask = protocol_transform(coord_image(w, h), coord_mask(w, h), 64, mode)
    expect = {"center": (64, 64), "squash": (64, 64), "none": (w, h)}[mode]
    assert img.size == expect and mask.shape == (expect[1], expect[0]) and mask.dtype == np.int64
    rgb = np.asarray(img).astype(np.int64)
    np.testing.assert_array_equal(mask % 1000, rgb[..., 0])  # the mask pixel comes from the same source pixel
    np.testing.assert_array_equal(mask // 1000, rgb[..., 1])


def test_protocol_keeps_ignore_and_large_values():
    mask = np.full((40, 60), -1, dtype=np.int64)
    mask[:, 30:] = 70000
    _, out = protocol_transform(Image.new("RGB", (60, 40)), mask, 20, "center")
    assert set(np.unique(out)) == {-1, 70000}
    with pytest.raises(ValueError, match="differ"):
        protocol_transform(Image.new("RGB", (60, 40)), mask[:, :50], 20)


# ---- crops --------------------------------------------------------------------------------------
def test_five_crop_boxes_hand_computed():
    # 480x360, ratio 0.5: 240x180 crops
    assert five_crop_boxes(480, 360, 0.5) == [
        Crop(0, 0, 240, 180), Crop(240, 0, 240, 180), Crop(0, 180, 240, 180), Crop(240, 180, 240, 180),
        Crop(120, 90, 240, 180)]
    # 501x375, ratio 0.5: int(250.5)=250, int(187.5)=187; centre top round(94)=94, left round(125.5)=126
    assert five_crop_boxes(501, 375, 0.5) == [
        Crop(0, 0, 250, 187), Crop(251, 0, 250, 187), Crop(0, 188, 250, 187), Crop(251, 188, 250, 187),
        Crop(126, 94, 250, 187)]
    # 480x360, ratio 0.7: int(336.0)=336, int(251.99999999999997)=251; centre top round(54.5)=54, left 72
    assert five_crop_boxes(480, 360, 0.7) == [
        Crop(0, 0, 336, 251), Crop(144, 0, 336, 251), Crop(0, 109, 336, 251), Crop(144, 109, 336, 251),
        Crop(72, 54, 336, 251)]
    # 2048x1024 Cityscapes five-crop 0.5 -> 1024x512 (the reference's 512x1024 crops)
    assert five_crop_boxes(2048, 1024, 0.5)[4] == Crop(512, 256, 1024, 512)


def test_ten_crop_second_five_are_five_crops_of_the_mirror():
    # hand-computed for 501x375 @0.5: crops of the mirrored image, in original coordinates, flipped
    assert ten_crop_boxes(501, 375, 0.5)[5:] == [
        Crop(251, 0, 250, 187, True), Crop(0, 0, 250, 187, True), Crop(251, 188, 250, 187, True),
        Crop(0, 188, 250, 187, True), Crop(125, 94, 250, 187, True)]
    rng = np.random.default_rng(0)
    for w, h, r in [(501, 375, 0.5), (480, 360, 0.3), (97, 61, 0.8), (64, 64, 0.6)]:
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mirror = img[:, ::-1]
        ten = ten_crop_boxes(w, h, r)
        assert ten[:5] == five_crop_boxes(w, h, r)
        for box, ref in zip(ten[5:], five_crop_boxes(w, h, r)):
            expected = mirror[ref.top:ref.top + ref.height, ref.left:ref.left + ref.width]
            np.testing.assert_array_equal(apply_crop(img, box), expected)
            np.testing.assert_array_equal(np.asarray(apply_crop(Image.fromarray(img), box)), expected)


def test_crop_counts_and_order():
    counts = {"none": 1, "five": 5, "ten": 10, "double": 20, "super": 50}
    for kind, n in counts.items():
        assert len(crop_boxes(kind, 640, 480)) == n == CropSpec(kind).count
    assert crop_boxes("none", 640, 480) == [Crop(0, 0, 640, 480, False)]
    assert crop_boxes("double", 640, 480) == ten_crop_boxes(640, 480, 0.5) + ten_crop_boxes(640, 480, 0.8)
    sup = crop_boxes("super", 500, 375)
    assert sup == multi_crop_boxes(500, 375, [0.3, 0.4, 0.5, 0.6, 0.7])
    assert [b.width for b in sup[::10]] == [150, 200, 250, 300, 350]
    assert sum(b.flip for b in sup) == 25
    with pytest.raises(ValueError, match="unknown crop kind"):
        crop_boxes("seven", 10, 10)
    with pytest.raises(ValueError):
        five_crop_boxes(10, 10, 0.05)


def test_apply_crop_pil_and_array_agree_and_bounds():
    arr = coord_mask(40, 30)
    box = Crop(5, 7, 11, 13, True)
    out = apply_crop(arr, box)
    np.testing.assert_array_equal(out, arr[7:20, 5:16][:, ::-1])
    pil = apply_crop(Image.fromarray(arr.astype(np.int32), "I"), box)
    np.testing.assert_array_equal(np.asarray(pil), out)
    with pytest.raises(ValueError, match="does not fit"):
        apply_crop(arr, Crop(35, 0, 10, 10))
