"""``predict_folder``: outputs mirror the inputs and never overwrite each other, reports merge over calls, label
PNGs carry a palette, photos are read upright (EXIF) and the demo figure agrees.

The model is a real ``CauseModel`` whose "backbone" averages 4 x 4 pixel blocks and whose head is the identity,
with the three colour axes as centroids: a pixel's class is its dominant colour channel (red 0, green 1, blue 2),
so every expected label map is known without training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from causeseg.data.io import DataError
from causeseg.figures import palette
from causeseg.model import CauseModel
from causeseg.predict import (
    REPORT_NAME,
    Predictor,
    collect_inputs,
    label_image,
    merge_report,
    output_name,
    predict_folder,
    save_labels,
)
from causeseg.utils import atomic_write_json

RED, GREEN, BLUE = (210, 30, 20), (25, 200, 30), (20, 30, 220)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    model = CauseModel(nn.AvgPool2d(4), nn.Identity(), torch.zeros(1, 3), torch.eye(3))
    return Predictor(model, flip=True)


def solid(path: Path, colour, size=(40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def run(predictor, inputs, out, **kw) -> dict:
    """One ``causeseg predict`` call: predict, then store the merged report (as the CLI does)."""
    kw.setdefault("crf", False)
    report = predict_folder(predictor, inputs, out, resolution=32, progress=False, **kw)
    atomic_write_json(merge_report(out, report), Path(out) / REPORT_NAME)
    return report


def labels_of(out: Path, entry: dict) -> np.ndarray:
    return np.array(Image.open(out / entry["labels"]))


def test_same_stem_and_same_name_inputs_get_distinct_outputs(predictor, tmp_path):
    solid(tmp_path / "a" / "photo.jpg", RED)
    solid(tmp_path / "b" / "photo.png", BLUE)
    solid(tmp_path / "c" / "photo.png", GREEN)  # same relative name as b's
    out = tmp_path / "out"
    rep = run(predictor, [tmp_path / "a", tmp_path / "b", tmp_path / "c"], out)
    assert [e["labels"] for e in rep["written"]] == ["labels/photo.jpg.png", "labels/photo.png.png",
                                                     "labels/photo.png~2.png"]
    assert [e["overlay"] for e in rep["written"]] == ["overlays/photo.jpg.png", "overlays/photo.png.png",
                                                      "overlays/photo.png~2.png"]
    for entry, cls in zip(rep["written"], (0, 2, 1)):  # each file holds its own image's prediction
        lab = labels_of(out, entry)
        assert lab.shape == (32, 40) and (lab == cls).all(), entry
        assert (out / entry["overlay"]).is_file()
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["photo.jpg.png", "photo.png.png",
                                                                 "photo.png~2.png"]
    # files given by themselves, same stem: named by file name, suffix kept
    rep2 = run(predictor, [tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.png"], tmp_path / "out2")
    assert [e["labels"] for e in rep2["written"]] == ["labels/photo.jpg.png", "labels/photo.png.png"]


def test_outputs_mirror_the_input_tree(predictor, tmp_path):
    photos = tmp_path / "photos"
    solid(photos / "x.png", RED)
    solid(photos / "trip" / "day1" / "x.png", BLUE)
    solid(photos / ".thumbs" / "x.png", GREEN)  # hidden: left out
    out = photos / "segmented"  # the output folder inside the input folder is never read back
    for _ in range(2):
        rep = run(predictor, [photos], out)
        assert [e["name"] for e in rep["written"]] == ["trip/day1/x.png", "x.png"]
    assert [e["labels"] for e in rep["written"]] == ["labels/trip/day1/x.png.png", "labels/x.png.png"]
    assert (labels_of(out, rep["written"][0]) == 2).all() and (labels_of(out, rep["written"][1]) == 0).all()
    assert rep["written"][0]["file"] == str((photos / "trip" / "day1" / "x.png").resolve())
    assert rep["written"][0]["size"] == [40, 32]


def test_later_calls_keep_earlier_entries_and_never_overwrite(predictor, tmp_path):
    a = solid(tmp_path / "a" / "photo.jpg", RED)
    b = solid(tmp_path / "b" / "photo.jpg", BLUE)
    out = tmp_path / "out"
    run(predictor, [a], out)
    first = (out / "labels" / "photo.jpg.png").read_bytes()
    rep = run(predictor, [b], out)  # another file with the same name: a new output, a's is untouched
    assert [e["labels"] for e in rep["written"]] == ["labels/photo.jpg~2.png"]
    assert (out / "labels" / "photo.jpg.png").read_bytes() == first
    merged = json.loads((out / REPORT_NAME).read_text())
    assert [(e["labels"], Path(e["file"]).parent.name) for e in merged["written"]] == [
        ("labels/photo.jpg.png", "a"), ("labels/photo.jpg~2.png", "b")]
    # predicting a again replaces its own entry (same output path), nothing is duplicated
    rep = run(predictor, [a], out)
    assert [e["labels"] for e in rep["written"]] == ["labels/photo.jpg.png"]
    merged = json.loads((out / REPORT_NAME).read_text())
    assert len(merged["written"]) == 2
    # a skipped file is reported, and forgotten once a later call writes it
    bad = tmp_path / "c" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png"):
        run(predictor, [bad.parent], out)
    run(predictor, [bad.parent], out, on_error="skip")
    merged = json.loads((out / REPORT_NAME).read_text())
    assert [Path(e["file"]).name for e in merged["skipped"]] == ["broken.png"] and len(merged["written"]) == 2
    solid(bad, GREEN)
    run(predictor, [bad.parent], out)
    merged = json.loads((out / REPORT_NAME).read_text())
    assert merged["skipped"] == [] and len(merged["written"]) == 3


def test_output_name_rule():
    taken: dict[str, str] = {"x.jpg.png": "/a/x.jpg"}
    assert output_name("x.jpg", "/a/x.jpg", taken) == "x.jpg.png"  # its own earlier output
    assert output_name("x.jpg", "/b/x.jpg", taken) == "x.jpg~2.png"
    assert output_name("x.jpg", "/c/x.jpg", taken) == "x.jpg~3.png"
    assert output_name("x.jpg", "/b/x.jpg", taken) == "x.jpg~2.png"  # stable for a file already named


def test_label_png_has_a_palette_and_the_class_ids(predictor, tmp_path):
    rng = np.random.default_rng(0)
    for c in (3, 27, 256):
        lab = rng.integers(0, c, (17, 23))
        save_labels(lab, c, tmp_path / f"l{c}.png")
        img = Image.open(tmp_path / f"l{c}.png")
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), lab)
        pal = np.array(img.getpalette(), dtype=np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(pal[:c], palette(c))  # the overlay colours
    lab = rng.integers(0, 300, (9, 11))  # more classes than a palette holds: 16 bit, no palette
    save_labels(lab, 300, tmp_path / "l300.png")
    img = Image.open(tmp_path / "l300.png")
    assert img.mode.startswith("I") and img.palette is None
    np.testing.assert_array_equal(np.array(img), lab)
    assert label_image(np.zeros((2, 2), int), 300).mode == "I;16"
    # what predict writes
    rep = run(predictor, [solid(tmp_path / "in" / "g.png", GREEN)], tmp_path / "out")
    img = Image.open(tmp_path / "out" / rep["written"][0]["labels"])
    assert img.mode == "P" and (np.array(img) == 1).all()


def exif_photo(path: Path) -> np.ndarray:
    """A JPEG stored sideways (EXIF Orientation 6: rotate 90 degrees clockwise to display), red left half and
    blue right half as stored; returns the decoded stored pixels."""
    arr = np.zeros((48, 32, 3), np.uint8)
    arr[:, :16] = RED
    arr[:, 16:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    return np.array(Image.open(path))


def test_photos_are_predicted_upright_and_the_demo_figure_agrees(predictor, tmp_path):
    from causeseg.demo import demo_figure

    stored = exif_photo(tmp_path / "in" / "side.jpg")
    out = tmp_path / "out"
    rep = run(predictor, [tmp_path / "in"], out)
    entry = rep["written"][0]
    lab = labels_of(out, entry)
    assert entry["size"] == [48, 32] and lab.shape == (32, 48)  # displayed: wide, not tall
    # stored left half (red) is the displayed top half once rotated clockwise
    assert (lab[:12] == 0).all() and (lab[-12:] == 2).all()
    fig = np.array(Image.open(demo_figure(rep["written"], out, tmp_path / "demo.png")))
    assert fig.shape == (256, 3 * 256, 3)
    upright = np.rot90(stored, k=-1)  # (32, 48): under 256 px, so shown as is
    np.testing.assert_array_equal(fig[:32, :48], upright)
    np.testing.assert_array_equal(fig[:32, 256:256 + 48], palette(3)[lab])  # the segmentation cell lines up


def test_crf_path_writes_valid_labels(predictor, tmp_path):
    img = np.zeros((32, 40, 3), np.uint8)
    img[:, :20] = RED
    img[:, 20:] = BLUE
    Image.fromarray(img).save(tmp_path / "two.png")
    out = tmp_path / "out"
    rep = run(predictor, [tmp_path / "two.png"], out, crf=True)
    lab = labels_of(out, rep["written"][0])
    assert (lab[:, :16] == 0).all() and (lab[:, 24:] == 2).all()


def test_bad_inputs_fail_before_any_work(predictor, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        predict_folder(predictor, [tmp_path / "nowhere"], out, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found"):
        collect_inputs([tmp_path / "empty"])
    solid(tmp_path / "in" / "x.png", RED)
    out.mkdir()
    (out / REPORT_NAME).write_text("{not json")
    with pytest.raises(DataError, match="predictions.json: not a readable predictions report"):
        predict_folder(predictor, [tmp_path / "in"], out, progress=False)
    assert not (out / "labels").exists()
    (out / REPORT_NAME).write_text('{"written": [{"oops": 1}]}')
    with pytest.raises(DataError, match="not a causeseg predictions report"):
        merge_report(out, {"written": [], "skipped": []})
