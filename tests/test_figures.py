"""Figures: palettes, colouring, overlays and PNG files of the expected size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.figures import (
    colorize,
    concept_groups,
    overlay,
    palette,
    save_concept_retrieval,
    save_confusion,
    save_iou_bars,
    save_prediction_grid,
)


def open_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # fully decodes: fails on a truncated file
        return im.size


def test_palette_distinct_fixed_prefix_stable():
    p = palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 300
    assert not (p == 0).all(axis=1).any()  # black is reserved for "ignore"
    np.testing.assert_array_equal(palette(300), p)  # fixed
    np.testing.assert_array_equal(palette(17), p[:17])  # prefix-stable
    city = palette(27, "cityscapes27")
    assert tuple(city[0]) == (128, 64, 128) and tuple(city[16]) == (70, 130, 180)  # road, sky
    assert len({tuple(c) for c in city}) == 27
    ext = palette(30, "cityscapes")
    np.testing.assert_array_equal(ext[:27], city)
    assert len({tuple(c) for c in ext}) == 30
    voc = palette(21, "voc")
    assert tuple(voc[0]) == (0, 0, 0) and tuple(voc[1]) == (128, 0, 0) and tuple(voc[15]) == (192, 128, 128)
    with pytest.raises(ValueError, match="unknown palette"):
        palette(3, "nope")


def test_colorize_maps_ignore_to_black_and_class_to_palette():
    lab = np.array([[-1, 0, 1], [2, 2, -1]])
    out = colorize(lab)
    pal = palette(3)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    for i in range(2):
        for j in range(3):
            expected = (0, 0, 0) if lab[i, j] < 0 else tuple(pal[lab[i, j]])
            assert tuple(out[i, j]) == expected
    # torch input and explicit palette
    custom = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.uint8)
    out2 = colorize(torch.from_numpy(lab), custom)
    assert tuple(out2[1, 0]) == (7, 8, 9) and tuple(out2[0, 0]) == (0, 0, 0)
    with pytest.raises(ValueError, match="no colour"):
        colorize(np.array([[5]]), custom)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        colorize(np.zeros((1, 2, 3), dtype=np.int64))


def test_overlay_blends_and_keeps_ignored_pixels():
    img = np.full((2, 2, 3), 100, dtype=np.uint8)
    lab = np.array([[0, -1], [1, 1]])
    custom = np.array([[200, 0, 0], [0, 0, 255]], dtype=np.uint8)
    out = overlay(img, lab, alpha=0.25, colours=custom)
    assert tuple(out[0, 1]) == (100, 100, 100)
    assert tuple(out[0, 0]) == (125, 75, 75)  # 0.75*100 + 0.25*200 = 125, 0.75*100 = 75
    assert tuple(out[1, 0]) == (75, 75, 139)  # 0.75*100 + 0.25*255 = 138.75 -> 139
    # float CHW image in [0, 1] is accepted
    out_f = overlay(torch.full((3, 2, 2), 100 / 255), lab, alpha=0.25, colours=custom)
    np.testing.assert_array_equal(out_f, out)
    with pytest.raises(ValueError, match="differ"):
        overlay(img, np.zeros((3, 3), dtype=np.int64))


def test_prediction_grid_png_size(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in range(3)]
    preds = [rng.integers(0, 4, (20, 30)) for _ in range(3)]
    gts = [rng.integers(-1, 4, (20, 30)) for _ in range(3)]
    p = save_prediction_grid(tmp_path / "sub" / "grid.png", imgs, preds, gts, titles=["a", "b", "c"])
    assert p == tmp_path / "sub" / "grid.png"
    pad = 4
    assert open_png(p) == (3 * 30 + 4 * pad, 16 + 3 * 20 + 4 * pad)
    # the prediction cell of row 0 holds exactly the colourised prediction (below the title strip)
    arr = np.array(Image.open(p))
    y0, x0 = 16 + pad, pad + 30 + pad
    np.testing.assert_array_equal(arr[y0 + 15: y0 + 20, x0: x0 + 30], colorize(preds[0], palette(4))[15:20])
    p2 = save_prediction_grid(tmp_path / "g2.png", imgs[:1], preds[:1], header=False)
    assert open_png(p2) == (2 * 30 + 3 * pad, 20 + 2 * pad)
    assert not list(tmp_path.glob("**/*.tmp"))  # no temporary files left behind
    with pytest.raises(ValueError, match="3 images but 2 predictions"):
        save_prediction_grid(tmp_path / "x.png", imgs, preds[:2])


def test_iou_bars_and_confusion_png(tmp_path):
    names = ["road", "sky", "car", "person"]
    p = save_iou_bars(tmp_path / "iou.png", [0.5, float("nan"), None, 0.9], names, title="t", figsize=(4, 3), dpi=50)
    assert open_png(p) == (200, 150)
    conf = np.array([[5, 1, 0, 0], [0, 7, 1, 0], [0, 2, 8, 0], [0, 0, 0, 0]])
    p2 = save_confusion(tmp_path / "conf.png", conf, names, figsize=(4, 4), dpi=50)
    assert open_png(p2) == (200, 200)
    # a cluster confusion with its mapping
    p3 = save_confusion(tmp_path / "conf3.png", conf[[2, 0, 1, 3]], names, mapping=[2, 0, 1, 3],
                        normalise=False, figsize=(3, 3), dpi=40)
    assert open_png(p3) == (120, 120)
    with pytest.raises(ValueError, match="3 class names"):
        save_confusion(tmp_path / "bad.png", conf, names[:3])
    with pytest.raises(ValueError, match="3 class names"):
        save_iou_bars(tmp_path / "bad.png", [0.1] * 4, names[:3])


def test_concept_groups_merge_by_distance():
    d = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.31], [0.2, 0.31, 1.0]])
    g = concept_groups([0, 2], d, phi_plus=0.3)
    assert g[0].tolist() == [0, 1] and g[1].tolist() == [1, 2]
    assert [x.tolist() for x in concept_groups([0, 2])] == [[0], [2]]
    with pytest.raises(ValueError, match="outside"):
        concept_groups([3], d)


def test_concept_retrieval_png(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    maps = [rng.integers(0, 5, (4, 4)) for _ in range(4)]  # patch-level maps (upsampled NEAREST), no 5
    maps[0][:] = 5  # concept 5 fills image 0 ...
    maps[2][:, :2] = 5  # ... and the left half of image 2
    pad, label_w = 4, 96
    p = save_concept_retrieval(tmp_path / "concepts.png", imgs, maps, [5, 1, 9], per_row=3, alpha=0.5, dim=0.25)
    assert open_png(p) == (label_w + 3 * (32 + pad) + pad, 3 * (32 + pad) + pad)
    arr = np.array(Image.open(p)).astype(float)
    colour = palette(3)[0].astype(float)
    cell = lambda r, j: arr[pad + r * (32 + pad): pad + r * (32 + pad) + 32,  # noqa: E731
                            label_w + j * (32 + pad): label_w + j * (32 + pad) + 32]
    # row "5": image 0 (largest share) fully tinted, then image 2 tinted on the left half, dimmed on the right
    np.testing.assert_allclose(cell(0, 0), 0.5 * imgs[0] + 0.5 * colour, atol=1)
    np.testing.assert_allclose(cell(0, 1)[:, :16], 0.5 * imgs[2][:, :16] + 0.5 * colour, atol=1)
    np.testing.assert_allclose(cell(0, 1)[:, 16:], 0.25 * imgs[2][:, 16:], atol=1)
    assert (cell(0, 2) == 200).all()  # no third image holds concept 5: empty grey cell
    # row of concept 9 (absent everywhere): all cells empty
    assert all((cell(2, j) == 200).all() for j in range(3))
    # merging by D_M: concept 1 joins concept 5's row, cells resized to cell_size
    d = np.eye(10)
    d[5, 1] = d[1, 5] = 0.9
    p2 = save_concept_retrieval(tmp_path / "c2.png", imgs, maps, [5], concept_distance=d, per_row=2,
                                cell_size=(24, 20))
    assert open_png(p2) == (label_w + 2 * (20 + pad) + pad, 24 + 2 * pad)
    with pytest.raises(ValueError, match="2 concept maps"):
        save_concept_retrieval(tmp_path / "bad.png", imgs, maps[:2], [5])
