"""Datasets on small synthetic folders: layouts, ordering, crops, labels, and bad input (raise / skip)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.data.crops import apply_crop, crop_boxes
from causeseg.data.datasets import (CamVid, Cityscapes, CocoStuff, ImageFolder, PairedFolder, PascalVOC,
                                    build_dataset, collate)
from causeseg.data.io import DataError
from causeseg.data.labelmaps import get_label_map
from causeseg.data.transforms import protocol_transform

RNG = np.random.default_rng(0)


def write_image(path: Path, w: int, h: int, seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def write_mask(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr.astype(np.uint8), "P" if palette else "L")
    if palette:
        img.putpalette([(i * 37) % 256 for i in range(768)])
    img.save(path)


def make_paired(root: Path, sizes=((40, 30), (30, 40), (50, 50)), max_value=11) -> dict[str, tuple]:
    out = {}
    for i, (w, h) in enumerate(sizes):
        name = f"img{i}"
        img = write_image(root / "images" / f"{name}.png", w, h, seed=i)
        mask = np.random.default_rng(100 + i).integers(0, max_value + 1, size=(h, w))
        write_mask(root / "masks" / f"{name}.png", mask)
        out[name] = (img, mask)
    return out


def test_paired_folder_items(tmp_path):
    data = make_paired(tmp_path)
    ds = PairedFolder(tmp_path, "camvid11", resolution=16, with_labels=True)
    assert len(ds) == 3 and ds.num_classes == 11
    lm = get_label_map("camvid11")
    for i, name in enumerate(sorted(data)):
        item = ds[i]
        assert item["name"] == name and item["index"] == i
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["label"].shape == (16, 16) and item["label"].dtype == torch.int64
        img, mask = data[name]
        ref_img, ref_lab = protocol_transform(Image.fromarray(img), lm.apply(mask), 16, "center")
        np.testing.assert_array_equal(item["label"].numpy(), ref_lab)
        np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy() * 255, np.asarray(ref_img), atol=1e-4)
    assert int(ds[0]["label"].min()) >= -1 and int(ds[0]["label"].max()) < 11
    b = collate([ds[0], ds[2]])
    assert b["image"].shape == (2, 3, 16, 16) and b["label"].shape == (2, 16, 16)
    assert b["name"] == ["img0", "img2"] and b["index"].tolist() == [0, 2]
    unl = PairedFolder(tmp_path, "camvid11", resolution=16)
    assert "label" not in unl[0]
    assert torch.equal(unl[0]["image"], ds[0]["image"])
    assert "label" not in collate([unl[0], unl[1]])
    with pytest.raises(ValueError, match="mixes"):
        collate([unl[0], ds[1]])


def test_crops_expand_image_major(tmp_path):
    data = make_paired(tmp_path)
    ds = PairedFolder(tmp_path, "camvid11", resolution=8, crop="five", with_labels=True)
    assert len(ds) == 15
    lm = get_label_map("camvid11")
    for idx in (0, 4, 5, 9, 14):
        item = ds[idx]
        name = sorted(data)[idx // 5]
        img, mask = data[name]
        box = crop_boxes("five", img.shape[1], img.shape[0])[idx % 5]
        ref_img, ref_lab = protocol_transform(apply_crop(Image.fromarray(img), box), apply_crop(lm.apply(mask), box),
                                              8, "center")
        assert item["name"] == f"{name}_crop{idx % 5:02d}"
        np.testing.assert_array_equal(item["label"].numpy(), ref_lab)
        np.testing.assert_array_equal(np.round(item["image"].permute(1, 2, 0).numpy() * 255), np.asarray(ref_img))
    assert len(PairedFolder(tmp_path, resolution=8, crop="super")) == 150


def test_manifest_order_and_missing_masks(tmp_path):
    make_paired(tmp_path)
    (tmp_path / "manifest.csv").write_text("id,width\nimg2,50\nimg0,40\n")
    ds = PairedFolder(tmp_path, "camvid11", resolution=8)
    assert [ds[i]["name"] for i in range(len(ds))] == ["img2", "img0", "img1"]  # unlisted appended
    (tmp_path / "manifest.csv").write_text("id\nimg2\nghost\n")
    with pytest.raises(DataError, match="ghost"):
        PairedFolder(tmp_path, "camvid11")
    (tmp_path / "manifest.csv").unlink()
    (tmp_path / "masks" / "img1.png").unlink()
    with pytest.raises(DataError, match="img1"):  # evaluation: a missing mask is an error
        PairedFolder(tmp_path, "camvid11", with_labels=True)
    # training (no labels): every image is an item, the missing mask is irrelevant, even with no masks folder
    assert [s.name for s in PairedFolder(tmp_path, "camvid11").samples] == ["img0", "img1", "img2"]
    for m in (tmp_path / "masks").iterdir():
        m.rename(tmp_path / m.name)
    (tmp_path / "masks").rmdir()
    assert len(PairedFolder(tmp_path, "camvid11", crop="five")) == 15
    with pytest.raises(DataError, match="masks folder not found"):
        PairedFolder(tmp_path, "camvid11", with_labels=True)
    for m in tmp_path.glob("img*.png"):
        (tmp_path / "masks").mkdir(exist_ok=True)
        m.rename(tmp_path / "masks" / m.name)
    ds = PairedFolder(tmp_path, "camvid11", with_labels=True, allow_unlabelled=True, resolution=8)
    assert "label" in ds[0] and "label" not in ds[1]
    ds = PairedFolder(tmp_path, "camvid11", with_labels=True, on_error="skip", resolution=8)
    assert len(ds) == 2 and "img1" in ds.skipped[0][0]


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[:300])


def _truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_bad_files_raise_or_skip(tmp_path):
    make_paired(tmp_path, sizes=[(40, 30)] * 6)
    imgs, masks = tmp_path / "images", tmp_path / "masks"
    (imgs / "img1.png").unlink()
    _truncated_jpeg(imgs / "img1.jpg")                         # truncated JPEG
    _truncated_png(imgs / "img2.png")                          # truncated PNG
    (imgs / "img3.png").write_text("not an image")             # non-image file
    write_mask(masks / "img4.png", np.zeros((31, 40)))         # size mismatch
    write_mask(masks / "img5.png", np.full((30, 40), 12))      # out-of-range label (camvid 0..11)
    expect = {1: ("img1.jpg", "truncated"), 2: ("img2.png", "truncated"), 3: ("img3.png", "not an image"),
              4: ("differ", "img4.png"), 5: ("img5.png", "12")}
    ds = PairedFolder(tmp_path, "camvid11", resolution=8, with_labels=True)
    ds[0]
    for i, (a, b) in expect.items():
        with pytest.raises(DataError) as ei:
            ds[i]
        assert a in str(ei.value) and b in str(ei.value), str(ei.value)
    with pytest.raises(DataError, match=r"img4\.png.*img4\.png|images.img4.*masks.img4"):
        ds[4]
    skip = PairedFolder(tmp_path, "camvid11", resolution=8, with_labels=True, on_error="skip")
    assert len(skip) == 1 and skip[0]["name"] == "img0"
    assert sorted(Path(p).stem for p, _ in skip.skipped) == ["img1", "img2", "img3", "img4", "img5"]
    reasons = dict((Path(p).stem, r) for p, r in skip.skipped)
    assert "differ" in reasons["img4"] and "12" in reasons["img5"]
    # without labels the masks are never read: only the three bad images are dropped
    nolab = PairedFolder(tmp_path, "camvid11", resolution=8, on_error="skip")
    assert [s.name for s in nolab.samples] == ["img0", "img4", "img5"]


def test_labels_never_read_without_with_labels(tmp_path):
    make_paired(tmp_path)
    (tmp_path / "masks" / "img0.png").write_text("garbage")
    ds = PairedFolder(tmp_path, "camvid11", resolution=8)
    assert "label" not in ds[0]
    with pytest.raises(DataError, match="img0"):
        PairedFolder(tmp_path, "camvid11", resolution=8, with_labels=True)[0]


def test_image_folder(tmp_path):
    data = make_paired(tmp_path / "p")
    paired = PairedFolder(tmp_path / "p", resolution=16)
    imgs = ImageFolder(tmp_path / "p" / "images", resolution=16)
    assert len(imgs) == len(paired) == 3
    for i in range(3):
        assert imgs[i]["name"] == paired[i]["name"]
        assert torch.equal(imgs[i]["image"], paired[i]["image"])
    nested = tmp_path / "n"
    write_image(nested / "b" / "x.jpg", 20, 20)
    write_image(nested / "a.PNG", 20, 20)
    write_image(nested / "c" / "d" / "y.png", 20, 20)
    (nested / "notes.txt").write_text("hi")
    write_image(nested / ".hidden" / "z.png", 20, 20)
    ds = ImageFolder(nested, resolution=8, crop="ten")
    assert [s.name for s in ds.samples] == ["a", "b/x", "c/d/y"] and len(ds) == 30
    assert "label" not in ds[0]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="empty.*no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "nowhere")


def make_coco(root: Path) -> None:
    base = root / "cocostuff"
    for split, ids in [("train2017", ["a", "b", "c"]), ("val2017", ["v1", "v2", "v3"])]:
        for i, name in enumerate(ids):
            write_image(base / "images" / split / f"{name}.jpg", 32, 24, seed=i)
            mask = np.full((24, 32), 255)
            mask[:, :8], mask[:, 8:16], mask[:, 16:24] = 0, 91, 12
            write_mask(base / "annotations" / split / f"{name}.png", mask)
        (base / "curated" / split).mkdir(parents=True)
        (base / "curated" / split / "Coco164kFull_Stuff_Coarse.txt").write_text("\n".join(ids) + "\n")
    (base / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text("v2\nv3\n")


def test_cocostuff_layout_lists_and_maps(tmp_path):
    make_coco(tmp_path)
    assert len(CocoStuff(tmp_path, "train")) == 3
    v27 = CocoStuff(tmp_path, "val", 27, resolution=24, with_labels=True)
    assert [s.name for s in v27.samples] == ["v2", "v3"]  # subset 7 list
    v81 = CocoStuff(tmp_path / "cocostuff", "val", 81, resolution=24, with_labels=True)
    assert [s.name for s in v81.samples] == ["v1", "v2", "v3"]
    lab = {c: ds[0]["label"].numpy() for c, ds in
           [(27, v27), (81, v81), (171, CocoStuff(tmp_path, "val", 171, resolution=24, with_labels=True))]}
    # resolution 24 keeps the 32x24 mask geometry up to a centre crop of width 24 (offset 4)
    assert set(lab[27][:, 0]) == {9} and set(lab[27][:, 6]) == {17} and set(lab[27][:, 14]) == {8}
    assert set(lab[81][:, 0]) == {1} and set(lab[81][:, 6]) == {0} and set(lab[81][:, 14]) == {12}
    assert set(lab[171][:, 0]) == {0} and set(lab[171][:, 6]) == {80} and set(lab[171][:, 14]) == {11}
    assert set(lab[27][:, 23]) == {-1}
    (tmp_path / "cocostuff" / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse_7.txt").unlink()
    with pytest.raises(DataError, match="Coco164kFull_Stuff_Coarse_7.txt"):
        CocoStuff(tmp_path, "val", 27)
    (tmp_path / "cocostuff" / "images" / "train2017" / "b.jpg").unlink()
    with pytest.raises(DataError, match="b.jpg"):
        CocoStuff(tmp_path, "train")
    ds = CocoStuff(tmp_path, "train", on_error="skip")
    assert [s.name for s in ds.samples] == ["a", "c"] and "b.jpg" in ds.skipped[0][0]
    with pytest.raises(DataError, match="COCO-Stuff"):
        CocoStuff(tmp_path / "nothing", "val")


def test_cityscapes_voc_camvid_layouts(tmp_path):
    cs = tmp_path / "cityscapes"
    for city, stem in [("zurich", "zurich_000001_000019"), ("aachen", "aachen_000000_000019")]:
        write_image(cs / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 64, 32)
        write_mask(cs / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png", np.full((32, 64), 33))
    ds = Cityscapes(tmp_path, "val", resolution=16, crop="five", with_labels=True)
    assert [s.name for s in ds.samples] == ["aachen_000000_000019", "zurich_000001_000019"] and len(ds) == 10
    assert set(ds[3]["label"].unique().tolist()) == {26}
    with pytest.raises(DataError, match="train"):
        Cityscapes(tmp_path, "train")

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_image(voc / "JPEGImages" / "2007_000001.jpg", 60, 30)
    m = np.zeros((30, 60))
    m[:, 30:] = 15
    m[0, :] = 255
    write_mask(voc / "SegmentationClass" / "2007_000001.png", m, palette=True)
    with pytest.raises(DataError, match="val.txt"):
        PascalVOC(tmp_path, "val")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")
    ds = PascalVOC(tmp_path, "val", resolution=20, with_labels=True)
    item = ds[0]
    assert ds.mode == "squash" and item["label"].shape == (20, 20)  # squashed, nothing cropped away
    assert item["label"][5, 0] == 0 and item["label"][5, 19] == 15 and item["label"][0, 0] == -1

    cv = tmp_path / "CamVid"
    for split in ("train", "test"):
        for n in ("f1", "f2"):
            write_image(cv / split / f"{n}.png", 48, 36)
            write_mask(cv / f"{split}annot" / f"{n}.png", np.full((36, 48), 11))
    ds = CamVid(tmp_path, "test", resolution=12, with_labels=True)
    assert len(ds) == 2 and set(ds[1]["label"].unique().tolist()) == {-1}


def test_build_dataset(tmp_path):
    make_coco(tmp_path)
    assert isinstance(build_dataset("cocostuff27", tmp_path, "val"), CocoStuff)
    assert build_dataset("coco81", tmp_path, "val", with_labels=True).label_map.name == "coco81"
    assert build_dataset("coco171", tmp_path, "val").label_map.name == "coco171"
    make_paired(tmp_path / "mine" / "val")
    ds = build_dataset("paired", tmp_path / "mine", split="val", resolution=8, crop="double", with_labels=True,
                       label_spec={"num_classes": 11, "ignore": [11]})
    assert len(ds) == 60 and ds.num_classes == 11 and "label" in ds[0]
    with pytest.raises(ValueError, match="label"):
        build_dataset("paired", tmp_path / "mine" / "val", with_labels=True)
    sh = build_dataset("camvid", tmp_path / "mine", split="val", resolution=8, with_labels=True)
    assert sh.label_map.name == "camvid11"
    assert build_dataset("images", tmp_path / "mine" / "val" / "images", mode="squash").mode == "squash"
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        build_dataset("images", tmp_path / "mine" / "val" / "images", on_error="ignore")


def test_dataloader_workers_and_determinism(tmp_path):
    make_paired(tmp_path, sizes=[(40, 30)] * 4)
    ds = PairedFolder(tmp_path, "camvid11", resolution=8, crop="five", with_labels=True)
    a = next(iter(torch.utils.data.DataLoader(ds, batch_size=20, collate_fn=collate)))
    b = next(iter(torch.utils.data.DataLoader(ds, batch_size=20, collate_fn=collate, num_workers=2)))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"]) and a["name"] == b["name"]


def test_training_lists_images_without_consulting_masks(tmp_path):
    """with_labels=False: no layout needs a mask (none exist here); with_labels=True: a missing mask is an error."""
    make_coco(tmp_path)
    cs = tmp_path / "cityscapes"
    write_image(cs / "leftImg8bit" / "train" / "ulm" / "ulm_000001_000019_leftImg8bit.png", 64, 32)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    write_image(voc / "JPEGImages" / "x1.jpg", 60, 30)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("x1\n")
    for n in ("f1", "f2"):
        write_image(tmp_path / "CamVid" / "train" / f"{n}.png", 48, 36)
    for f in (tmp_path / "cocostuff" / "annotations").rglob("*.png"):
        f.unlink()
    builders = {
        "coco": lambda wl: CocoStuff(tmp_path, "train", with_labels=wl, crop="five"),
        "cityscapes": lambda wl: Cityscapes(tmp_path, "train", with_labels=wl, crop="five"),
        "voc": lambda wl: PascalVOC(tmp_path, "train", with_labels=wl, crop="five"),
        "camvid": lambda wl: CamVid(tmp_path, "train", with_labels=wl, crop="five"),
        "camvid-factory": lambda wl: build_dataset("camvid", tmp_path / "CamVid", "train", crop="five",
                                                   with_labels=wl),
    }
    expect = {"coco": 3, "cityscapes": 1, "voc": 1, "camvid": 2, "camvid-factory": 2}
    for name, build in builders.items():
        ds = build(False)
        assert ds.num_images == expect[name] and len(ds) == 5 * expect[name], name
        assert all(s.mask is None for s in ds.samples) and "label" not in ds[0]
        with pytest.raises(DataError, match="mask|gtFine|annot|SegmentationClass"):
            build(True)


def test_too_small_image_is_a_one_line_error_or_skipped(tmp_path):
    make_paired(tmp_path, sizes=[(40, 30), (1, 1), (40, 30), (14, 40)])
    ds = PairedFolder(tmp_path, resolution=8)
    with pytest.raises(DataError) as ei:
        ds[1]
    msg = str(ei.value)
    assert "img1.png" in msg and "1x1" in msg and "too small" in msg and "\n" not in msg
    assert ds[3]["image"].shape == (3, 8, 8)  # 14x40 is fine without crops ...
    five = PairedFolder(tmp_path, resolution=8, crop="five")
    with pytest.raises(DataError, match=r"img3\.png.*14x40.*'five' crop"):  # ... but its 7x20 crops are not
        five[15]
    skip = PairedFolder(tmp_path, resolution=8, crop="five", on_error="skip")
    assert [s.name for s in skip.samples] == ["img0", "img2"]
    assert sorted(Path(p).stem for p, _ in skip.skipped) == ["img1", "img3"]


def test_load_items_decodes_each_image_once_and_matches_getitem(tmp_path):
    make_paired(tmp_path, sizes=[(40, 30), (30, 40), (50, 50)])
    ds = PairedFolder(tmp_path, resolution=8, crop="ten")
    ds.decode_cache = 0
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    items = ds.load_items(order)
    assert items.dtype == torch.uint8 and items.shape == (30, 3, 8, 8)
    assert ds.decodes == 3  # one decode per source image for its ten crops
    for pos, i in enumerate(order):
        assert torch.equal(items[pos].float().div_(255), ds[i]["image"])
    assert ds.decodes == 3 + 30  # no cache: __getitem__ decodes per item
    cached = PairedFolder(tmp_path, resolution=8, crop="ten")  # default LRU of decoded images
    for i in range(len(cached)):
        cached[i]
    assert cached.decodes == 3


def test_fingerprint_tracks_the_file_list(tmp_path):
    import os

    make_paired(tmp_path)
    fp = PairedFolder(tmp_path, resolution=8).fingerprint()
    assert PairedFolder(tmp_path, resolution=8).fingerprint() == fp
    assert PairedFolder(tmp_path, resolution=16).fingerprint() != fp
    assert PairedFolder(tmp_path, resolution=8, crop="five").fingerprint() != fp
    (tmp_path / "masks" / "img0.png").write_bytes(b"changed")  # masks are not inputs of training
    assert PairedFolder(tmp_path, resolution=8).fingerprint() == fp
    st = os.stat(tmp_path / "images" / "img0.png")
    os.utime(tmp_path / "images" / "img0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert PairedFolder(tmp_path, resolution=8).fingerprint() != fp
    fp2 = PairedFolder(tmp_path, resolution=8).fingerprint()
    (tmp_path / "images" / "img2.png").unlink()
    assert PairedFolder(tmp_path, resolution=8).fingerprint() != fp2


# ----------------------------------------------------------------------------------------------
# input pipeline: grouped epoch order, windowed loading, feature-cache fingerprint, workers
# ----------------------------------------------------------------------------------------------
def test_grouped_epoch_order_is_a_pure_windowed_permutation():
    from causeseg.features import epoch_order

    n, group, window = 5 * 32, 5, 20
    order = epoch_order(n, 3, 1, group, window)
    assert sorted(order.tolist()) == list(range(n))
    assert torch.equal(order, epoch_order(n, 3, 1, group, window))  # pure function of its arguments
    assert not torch.equal(order, epoch_order(n, 3, 2, group, window))
    for start in range(0, n, window):  # every window holds whole images: 4 images x 5 crops
        images = torch.bincount(order[start:start + window] // group, minlength=32)
        assert set(images[images > 0].tolist()) == {5} and int((images > 0).sum()) == 4
    assert len(set((order[:window] // group).tolist())) == 4 and order[:5].tolist() != sorted(order[:5].tolist())
    g = torch.Generator().manual_seed(3 * 1_000_003 + 1 * 7919 + 17)  # one crop per image: the plain permutation
    assert torch.equal(epoch_order(n, 3, 1), torch.randperm(n, generator=g))
    assert torch.equal(epoch_order(n, 3, 1, group, 0), epoch_order(n, 3, 1))
    with pytest.raises(ValueError, match="whole number"):
        epoch_order(11, 0, 0, 5)


class _PoolBackbone(torch.nn.Module):
    """A deterministic stand-in backbone: 4x4 average pooling (features = pooled pixels)."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


def test_feature_source_batches_match_the_items_with_and_without_workers(tmp_path, caplog):
    import logging

    from causeseg.features import FeatureSource, epoch_order

    make_paired(tmp_path / "d", sizes=[(40, 30), (30, 40), (50, 50), (44, 36)])
    ds = PairedFolder(tmp_path / "d", resolution=8, crop="five")
    ref = _PoolBackbone()(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    for workers in (0, 1):
        with caplog.at_level(logging.INFO, logger="causeseg.features"):
            src = FeatureSource(_PoolBackbone(), ds, device=torch.device("cpu"), amp="off", cache="off",
                                num_workers=workers, progress=False, window=10)
        assert "feature cache off (run.feature_cache=off" in caplog.text and "decodes 4 source images" in caplog.text
        got = list(src.batches(3, 1, 7))
        idx = torch.cat([b[2] for b in got])
        assert torch.equal(idx, epoch_order(20, 7, 1, 5, 10)[:18])  # 6 full batches of 3
        assert [b[0] for b in got] == list(range(6))
        for _, feats, i in got:
            assert torch.equal(feats, ref[i])  # uint8 crops -> float on the device: exactly ToTensor's values
        rest = torch.cat([b[2] for b in src.batches(3, 1, 7, offset=6)])  # resume at a sample offset
        assert torch.equal(rest, idx[6:])


def test_feature_cache_fingerprint_is_recorded_and_checked(tmp_path, caplog):
    import json
    import logging
    import os

    from causeseg.features import FeatureSource

    make_paired(tmp_path / "d")
    ds = PairedFolder(tmp_path / "d", resolution=8, crop="five")

    def source(amp="off"):
        return FeatureSource(_PoolBackbone(), PairedFolder(tmp_path / "d", resolution=8, crop="five"),
                             device=torch.device("cpu"), amp=amp, cache="on", cache_dir=tmp_path / "cache",
                             num_workers=0, progress=False, signature="bb|res8")

    src = source()
    assert src.cached
    (meta,) = (tmp_path / "cache").glob("*.json")
    fp = json.loads(meta.read_text())
    assert fp["files"] == ds.fingerprint() and fp["amp_dtype"] == "float32" and fp["signature"] == "bb|res8"
    assert fp["n"] == 15 and fp["shape"] == [3, 2, 2]
    assert source("bf16").fingerprint("bb|res8")["amp_dtype"] == "bfloat16"  # another dtype: another cache file
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    # an image changes: another key, another cache
    st = os.stat(tmp_path / "d" / "images" / "img1.png")
    os.utime(tmp_path / "d" / "images" / "img1.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    source()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3
    # a cache whose record does not match what is asked for is rebuilt, not used
    (meta,) = [m for m in (tmp_path / "cache").glob("*.json") if json.loads(m.read_text())["files"] ==
               PairedFolder(tmp_path / "d", resolution=8, crop="five").fingerprint() and
               json.loads(m.read_text())["amp_dtype"] == "float32"]
    bad = json.loads(meta.read_text())
    bad["files"] = "something else"
    meta.write_text(json.dumps(bad))
    with caplog.at_level(logging.WARNING, logger="causeseg.features"):
        src = source()
    assert "made from other inputs" in caplog.text
    assert json.loads(meta.read_text())["files"] != "something else"
    assert torch.equal(next(src.batches(15, 0, 0, shuffle=False))[1],
                       _PoolBackbone()(torch.stack([ds[i]["image"] for i in range(15)])).half().float())


def test_auto_num_workers():
    from causeseg.features import auto_num_workers, resolve_num_workers

    assert auto_num_workers(cores=2, local_processes=1) == 1
    assert auto_num_workers(cores=1, local_processes=1) == 0
    assert auto_num_workers(cores=64, local_processes=1) == 16
    assert auto_num_workers(cores=16, local_processes=2) == 7
    assert resolve_num_workers(3) == 3 and resolve_num_workers(None) == auto_num_workers()
    with pytest.raises(ValueError, match="num_workers"):
        resolve_num_workers(-1)
