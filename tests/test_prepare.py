"""``causeseg prepare``: crops written once equal the on-the-fly crops (PNG), keep the dataset order, and the
written folder reads back as a paired dataset; JPEG-75 is the official re-compression; bad use is a clear error."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.data.datasets import PairedFolder, build_dataset
from causeseg.data.io import DataError
from causeseg.prepare import add_parser, crop_names, prepare_split, run


def _paired(root, sizes=((64, 48), (48, 64), (50, 50))):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (w, h) in enumerate(sizes):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"p{i}.png")
        Image.fromarray(rng.integers(0, 12, (h, w)).astype(np.uint8)).save(root / "masks" / f"p{i}.png")
    (root / "manifest.csv").write_text("id\np2\np0\np1\n")  # a non-sorted dataset order


def test_png_crops_equal_on_the_fly_crops_and_keep_the_order(tmp_path):
    _paired(tmp_path / "src")
    rep = prepare_split("paired", tmp_path / "src", "train", "five", tmp_path / "out", masks=True,
                        label_spec="camvid11", workers=1)
    assert rep["images"] == 3 and rep["crops"] == 15 and rep["format"] == "png"
    assert json.loads((tmp_path / "out" / "train" / "prepared.json").read_text())["crops"] == 15
    on_the_fly = build_dataset("paired", tmp_path / "src", crop="five", resolution=16, with_labels=True,
                               label_spec="camvid11")
    prepared = build_dataset("paired", tmp_path / "out", split="train", crop="none", resolution=16,
                             with_labels=True, label_spec="camvid11")
    assert len(prepared) == len(on_the_fly) == 15
    for i in range(15):
        a, b = on_the_fly[i], prepared[i]
        assert a["name"] == b["name"]  # p2_crop00, ..., p0_crop00, ...: the dataset order
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    with open(tmp_path / "out" / "train" / "manifest.csv") as f:
        ids = [r["id"] for r in csv.DictReader(f)]
    assert ids[:6] == crop_names("p2", "five") + ["p0_crop00"]
    # training reads the prepared crops without their masks
    assert len(PairedFolder(tmp_path / "out" / "train")) == 15


def test_jpeg_is_the_official_recompression_and_errors_are_clear(tmp_path):
    _paired(tmp_path / "src")
    rep = prepare_split("paired", tmp_path / "src", "train", "ten", tmp_path / "out", fmt="jpeg", workers=2)
    files = sorted((tmp_path / "out" / "train" / "images").iterdir())
    assert rep["crops"] == len(files) == 30 and all(f.suffix == ".jpg" for f in files)
    assert not (tmp_path / "out" / "train" / "masks").exists()
    src = build_dataset("paired", tmp_path / "src", crop="ten", resolution=16)
    jpg = build_dataset("paired", tmp_path / "out", split="train", resolution=16)
    a, b = src[3]["image"], jpg[3]["image"]
    assert a.shape == b.shape and not torch.equal(a, b)  # lossy ...
    assert float((a - b).abs().mean()) < 0.25  # ... but the same picture
    with pytest.raises(DataError, match="already holds files"):
        prepare_split("paired", tmp_path / "src", "train", "ten", tmp_path / "out", workers=1)
    with pytest.raises(ValueError, match="format"):
        prepare_split("paired", tmp_path / "src", "train", "ten", tmp_path / "o2", fmt="webp")
    with pytest.raises(ValueError, match="crop kind"):
        prepare_split("paired", tmp_path / "src", "train", "six", tmp_path / "o2")


def test_cli_subcommand(tmp_path, capsys):
    _paired(tmp_path / "src")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare", "--dataset", "paired", "--data-root", str(tmp_path / "src"),
                              "--set", "data.label_spec=camvid11", "--crop", "double", "-o", str(tmp_path / "out"),
                              "--workers", "1"])
    assert args.func is run and run(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["crops"] == 60 and "data.crop=none" in report["train_with"]
    assert "data.label_spec=camvid11" in report["train_with"] and "data.dataset=paired" in report["train_with"]
    assert len(list((tmp_path / "out" / "train" / "images").iterdir())) == 60
