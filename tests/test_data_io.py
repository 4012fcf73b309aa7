"""Image and mask reading: mode conversions (pixel values checked) and clear errors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.data.io import DataError, load_image, load_mask


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_grayscale_l_and_1(tmp_path):
    a = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(a, "L").save(tmp_path / "g.png")
    out = _rgb(load_image(tmp_path / "g.png"))
    assert out.shape == (16, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], a)
    b = (a > 100)
    Image.fromarray(b).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(_rgb(load_image(tmp_path / "b.png"))[..., 1], np.where(b, 255, 0))


def test_la_and_rgba_drop_alpha(tmp_path):
    rng = np.random.default_rng(0)
    la = rng.integers(0, 256, size=(8, 9, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = _rgb(load_image(tmp_path / "la.png"))
    np.testing.assert_array_equal(out, np.repeat(la[..., :1], 3, axis=2))
    rgba = rng.integers(0, 256, size=(8, 9, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(_rgb(load_image(tmp_path / "rgba.png")), rgba[..., :3])


def test_palette_gives_colours(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = [10, 20, 30, 200, 100, 50, 7, 8, 9] + [0] * (256 * 3 - 9)
    img = Image.fromarray(idx, "P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    colours = np.array(palette[:9]).reshape(3, 3)
    np.testing.assert_array_equal(_rgb(load_image(tmp_path / "p.png")), colours[idx])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(_rgb(load_image(tmp_path / "pt.png")), colours[idx])


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_scaled_not_clipped(tmp_path, fmt):
    vals = np.array([[0, 1, 128, 129], [257, 32768, 65280, 65535]], dtype=np.uint16)
    Image.fromarray(vals).save(tmp_path / f"w.{fmt}")
    with Image.open(tmp_path / f"w.{fmt}") as raw:
        assert raw.mode in ("I;16", "I;16B", "I;16L", "I")
    out = _rgb(load_image(tmp_path / f"w.{fmt}"))[..., 0]
    expected = np.array([[round(int(v) * 255 / 65535) for v in row] for row in vals])
    np.testing.assert_array_equal(out, expected)
    assert out.max() == 255 and out[1, 1] == 128  # 65535 -> 255, mid-range -> 128 (clipping would give 255)


def test_32bit_int_mode_i(tmp_path):
    vals = np.array([[0, 65535, 1000]], dtype=np.int32)
    Image.fromarray(vals, "I").save(tmp_path / "i.tiff")
    out = _rgb(load_image(tmp_path / "i.tiff"))[..., 2]
    np.testing.assert_array_equal(out, [[0, 255, round(1000 * 255 / 65535)]])
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I").save(tmp_path / "big.tiff")
    with pytest.raises(DataError, match="big.tiff"):
        load_image(tmp_path / "big.tiff")


def test_cmyk(tmp_path):
    cmyk = np.zeros((2, 2, 4), dtype=np.uint8)
    cmyk[0, 1, 3] = 255  # full black
    cmyk[1, 0, 0] = 255  # full cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tiff")
    out = _rgb(load_image(tmp_path / "c.tiff"))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 0], [0, 255, 255])


def test_exif_transpose(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    img.save(tmp_path / "o.jpg", exif=exif, quality=100)
    assert load_image(tmp_path / "o.jpg").size == (40, 20)
    assert load_image(tmp_path / "o.jpg", exif_transpose=True).size == (20, 40)


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes(mode="RGB") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(2)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_truncated_and_bad_files(tmp_path):
    jpg = _jpeg_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = _png_bytes()
    (tmp_path / "trunc.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    for name, problem in [("trunc.jpg", "truncated"), ("trunc.png", "truncated"), ("text.png", "not an image"),
                          ("empty.jpg", "not an image"), ("missing.png", "not found")]:
        with pytest.raises(DataError) as ei:
            load_image(tmp_path / name)
        msg = str(ei.value)
        assert str(tmp_path / name) in msg and problem in msg, msg
    (tmp_path / "mtrunc.png").write_bytes(_png_bytes("L")[:200])
    with pytest.raises(DataError, match="mtrunc.png"):
        load_mask(tmp_path / "mtrunc.png")
    with pytest.raises(DataError, match="not found"):
        load_mask(tmp_path / "nomask.png")


def test_mask_raw_values(tmp_path):
    idx = np.array([[0, 1, 5], [255, 20, 3]], dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(list(range(256)) * 3)  # colours differ from indices on purpose
    p.save(tmp_path / "p.png")
    m = load_mask(tmp_path / "p.png")
    assert m.dtype == np.int64 and m.shape == (2, 3)
    np.testing.assert_array_equal(m, idx)
    Image.fromarray(idx, "L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "l.png"), idx)
    wide = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "w.png"), wide.astype(np.int64))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA"])
def test_colour_masks_rejected(tmp_path, mode):
    Image.new(mode, (4, 4)).save(tmp_path / "c.png")
    with pytest.raises(DataError) as ei:
        load_mask(tmp_path / "c.png")
    assert str(tmp_path / "c.png") in str(ei.value) and mode in str(ei.value)


# -- very large images: a clear "large" error, and a limit the user can raise ----------------------------------
def test_large_image_is_not_called_corrupt(tmp_path, monkeypatch):
    from causeseg.data.io import image_size, max_image_pixels, set_max_image_pixels

    monkeypatch.setenv("CAUSESEG_MAX_PIXELS", "")  # unset = PIL's default; restored after the test
    assert max_image_pixels() == 89_478_485  # PIL's default guard: a 96-Mpx photo is over it
    Image.new("RGB", (20, 10), (10, 200, 30)).save(tmp_path / "big.png")  # 200 pixels
    Image.new("RGB", (10, 10), (10, 200, 30)).save(tmp_path / "ok.png")  # 100 pixels
    for limit, over in ((150, "PIL warns"), (60, "PIL raises: over twice the limit")):
        set_max_image_pixels(limit)
        for read in (load_image, load_mask, image_size):
            with pytest.raises(DataError) as err:
                read(tmp_path / "big.png")
            msg = str(err.value)
            assert msg.startswith(str(tmp_path / "big.png")), over
            assert "large" in msg and "20x10 = 200 pixels" in msg and f"limit of {limit} pixels" in msg, msg
            assert "corrupt" not in msg.split("(")[0] and "--max-pixels" in msg and "CAUSESEG_MAX_PIXELS" in msg
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's own guard is left alone
    set_max_image_pixels(100)
    assert load_image(tmp_path / "ok.png").size == (10, 10)  # at the limit is fine
    set_max_image_pixels(None)  # no limit
    assert load_image(tmp_path / "big.png").size == (20, 10)
    monkeypatch.setenv("CAUSESEG_MAX_PIXELS", "199")  # the environment variable alone
    with pytest.raises(DataError, match="limit of 199 pixels"):
        load_image(tmp_path / "big.png")
    monkeypatch.setenv("CAUSESEG_MAX_PIXELS", "0")
    assert max_image_pixels() is None
    monkeypatch.setenv("CAUSESEG_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="CAUSESEG_MAX_PIXELS='lots'"):
        load_image(tmp_path / "big.png")
    with pytest.raises(ValueError, match="positive integer"):
        set_max_image_pixels(0)


def test_image_folder_training_sees_photos_upright(tmp_path):
    """User photos (dataset kind 'images') are read with their EXIF orientation, as `causeseg predict` reads
    them; benchmark folders (PairedFolder) are not."""
    from causeseg.data.datasets import ImageFolder

    rng = np.random.default_rng(0)
    arr = np.kron(rng.integers(0, 256, (6, 4, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 48 x 32, blocky
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    Image.fromarray(arr).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    stored = np.array(Image.open(tmp_path / "photo.jpg"))  # the decoded pixels, as stored
    assert stored.shape == (48, 32, 3)
    ds = ImageFolder(tmp_path, resolution=32, mode="none")
    got = (ds[0]["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, np.rot90(stored, k=-1))  # (32, 48): upright
