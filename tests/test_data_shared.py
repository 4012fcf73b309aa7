"""The shared real data: every pair opens, sizes agree with the manifests, and every mask maps into [-1, C).

Also the data-root lookup (CAUSESEG_DATA_ROOT) itself.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from causeseg.data.datasets import shared_dataset
from causeseg.data.io import load_image, load_mask
from causeseg.data.labelmaps import get_label_map
from causeseg.data.root import SHARED_SETS, data_root, shared_set

# README of the shared data: pairs per set and (label map, C, raw values allowed)
EXPECTED = {
    "camvid/train": (367, "camvid11", 11, set(range(12))),
    "camvid/val": (101, "camvid11", 11, set(range(12))),
    "cocostuff": (25, "cocostuff27", 27, set(range(182)) | {255}),
    "voc": (18, "voc21", 21, set(range(21)) | {255}),
    "cityscapes": (12, "cityscapes27", 27, set(range(34)) | {255}),
    "ade20k": (3, "ade150", 150, set(range(151))),
}


def _manifest(path: Path) -> dict[str, dict[str, str]]:
    with (path / "manifest.csv").open(newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


@pytest.mark.data
@pytest.mark.parametrize("set_name", sorted(EXPECTED))
def test_every_shared_pair(data_root, set_name):
    n, lm_name, c, allowed = EXPECTED[set_name]
    assert SHARED_SETS[set_name] == lm_name
    ds = shared_dataset(set_name, with_labels=True, resolution=32)
    assert len(ds) == n and ds.num_classes == c and ds.label_map.name == lm_name
    manifest = _manifest(shared_set(set_name))
    assert sorted(manifest) == sorted(s.name for s in ds.samples)
    lm = get_label_map(lm_name)
    seen: set[int] = set()
    for s in ds.samples:  # every file opened and fully decoded
        img = load_image(s.image)
        raw = load_mask(s.mask)
        row = manifest[s.name]
        assert img.size == (int(row["width"]), int(row["height"])) and raw.shape == (img.size[1], img.size[0])
        values = set(np.unique(raw).tolist())
        assert values <= allowed, (s.mask, values - allowed)
        if "labels" in row:  # the manifest lists the raw values present
            assert values == {int(v) for v in row["labels"].split()}, s.mask
        lab = lm.apply(raw, source=s.mask)
        assert lab.min() >= -1 and lab.max() < c
        seen |= set(np.unique(lab).tolist())
    assert -1 in seen or set_name == "ade20k"
    assert len(seen - {-1}) >= 2
    item = ds[len(ds) - 1]  # the full item path on one real pair
    assert item["image"].shape == (3, 32, 32) and item["label"].shape == (32, 32)
    assert int(item["label"].min()) >= -1 and int(item["label"].max()) < c


@pytest.mark.data
def test_shared_camvid_build_and_crops(data_root):
    from causeseg.data.datasets import build_dataset

    ds = build_dataset("camvid", data_root / "camvid", split="val", resolution=16, crop="five", with_labels=True)
    assert len(ds) == 5 * 101
    assert ds[7]["name"].endswith("_crop02") and ds[7]["label"].shape == (16, 16)


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CAUSESEG_DATA_ROOT", str(tmp_path))
    assert data_root() == tmp_path.resolve()
    (tmp_path / "voc").mkdir()
    assert shared_set("voc") == tmp_path.resolve() / "voc"
    with pytest.raises(FileNotFoundError, match="cocostuff"):
        shared_set("cocostuff")
    with pytest.raises(KeyError, match="known"):
        shared_set("mnist")
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("CAUSESEG_DATA_ROOT", str(missing))
    assert data_root() is None
    with pytest.raises(FileNotFoundError) as ei:
        data_root(required=True)
    assert str(missing) in str(ei.value) and "CAUSESEG_DATA_ROOT" in str(ei.value)
