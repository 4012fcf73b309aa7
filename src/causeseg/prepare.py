"""``causeseg prepare``: write a split's protocol crops once, as a paired folder that training reads fast.

The field's convention (STEGO's and CAUSE's ``crop_dataset.py``) crops the training split offline: every image's
``five`` / ``ten`` / ``double`` / ``super`` crops at their native size, numbered in dataset order. This writes the same
crops (``causeseg.data.crops``, torchvision semantics) into ``OUT/<split>/images/<name>_cropNN.png`` with a
``manifest.csv`` keeping the dataset order, and with ``masks=True`` the raw mask crops into ``OUT/<split>/masks/``
(evaluation only; training never reads them). Images are lossless PNG by default, so training on the prepared
folder with ``data.crop=none`` gives exactly the pixels of on-the-fly cropping; ``fmt='jpeg'`` (quality 75, PIL's
default, what the official cropper writes) reproduces the official files' re-compression instead.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.crops import apply_crop, crop_boxes, num_crops
from .data.datasets import SegmentationDataset, build_dataset
from .data.io import DataError, load_image, load_mask

log = logging.getLogger(__name__)

FORMATS = ("png", "jpeg")


def _mask_image(arr: np.ndarray) -> Image.Image:
    """Raw mask values -> a lossless single-channel PNG image (8-bit when they fit, else 16-bit)."""
    if arr.min() >= 0 and arr.max() <= 255:
        return Image.fromarray(arr.astype(np.uint8), mode="L")
    if arr.min() >= 0 and arr.max() <= 65535:
        return Image.fromarray(arr.astype(np.uint16), mode="I;16")
    raise DataError(f"mask values in [{arr.min()}, {arr.max()}] do not fit a 16-bit PNG")


def crop_names(name: str, crop: str) -> list[str]:
    """File stems of an image's crops: ``<name>_cropNN`` (``<name>`` for crop 'none'); '/' becomes '__'."""
    base = name.replace("/", "__")
    return [base] if crop == "none" else [f"{base}_crop{j:02d}" for j in range(num_crops(crop))]


def _write_one(job: tuple[str, str | None, str, str, str, str, int]) -> list[str]:
    """Crop one source image (and mask) and write the crops; returns their stems."""
    image, mask, name, crop, out, fmt, quality = job
    img = load_image(image)
    boxes = crop_boxes(crop, *img.size)
    raw = load_mask(mask) if mask is not None else None
    if raw is not None and raw.shape != (img.size[1], img.size[0]):
        raise DataError(f"{image} and {mask}: image and mask sizes differ")
    stems = crop_names(name, crop)
    ext = ".png" if fmt == "png" else ".jpg"
    for stem, box in zip(stems, boxes):
        c = apply_crop(img, box)
        if fmt == "png":
            c.save(Path(out) / "images" / f"{stem}{ext}", format="PNG", compress_level=1)
        else:
            c.save(Path(out) / "images" / f"{stem}{ext}", format="JPEG", quality=quality)
        if raw is not None:
            _mask_image(apply_crop(raw, box)).save(Path(out) / "masks" / f"{stem}.png", format="PNG")
    return stems


def prepare_split(dataset: str, root: str | os.PathLike, split: str, crop: str, out_dir: str | os.PathLike, *,
                  fmt: str = "png", quality: int = 75, masks: bool = False, label_spec: Any = None,
                  on_error: str = "raise", workers: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the ``crop`` crops of ``split`` of a dataset into ``out_dir/<split>`` (paired layout); returns a report.

    ``fmt``: 'png' (lossless, default) or 'jpeg' (``quality``, 75 = the official cropper). ``masks=True`` also writes
    the raw mask crops (for evaluation on the crops; training never reads them). ``workers``: processes (None = the
    available cores). The report (also ``prepared.json``) names the settings that train on the result.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    num_crops(crop)  # validates the kind
    ds: SegmentationDataset = build_dataset(dataset, root, split=split, crop="none", with_labels=masks,
                                            label_spec=label_spec, on_error=on_error)
    out = Path(out_dir) / split
    if (out / "images").is_dir() and any((out / "images").iterdir()) and not overwrite:
        raise DataError(f"{out / 'images'}: already holds files; pass --overwrite (or another --out)")
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(parents=True, exist_ok=True)
    jobs = [(str(s.image), str(s.mask) if masks and s.mask is not None else None, s.name, crop, str(out), fmt,
             int(quality)) for s in ds.samples]
    from .features import auto_num_workers

    n_proc = auto_num_workers() + 1 if workers is None else max(int(workers), 1)
    log.info("prepare: %d images of %s/%s -> %d %r crops each as %s in %s (%d process(es))", len(jobs), dataset,
             split, num_crops(crop), crop, fmt.upper(), out, n_proc)
    if n_proc > 1:
        with ProcessPoolExecutor(n_proc) as pool:
            stems = list(pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (8 * n_proc))))
    else:
        stems = [_write_one(j) for j in jobs]
    with (out / "manifest.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "source"])
        for job, names in zip(jobs, stems):
            for stem in names:
                w.writerow([stem, job[0]])
    from .data.labelmaps import list_label_maps

    label_name = getattr(ds.label_map, "name", None) if ds.label_map is not None else None
    if label_name not in list_label_maps():  # a custom spec: the user passes it again
        label_name = label_spec if isinstance(label_spec, str) else None
    report = {"dataset": dataset, "root": str(root), "split": split, "crop": crop, "format": fmt,
              "quality": int(quality) if fmt == "jpeg" else None, "images": len(jobs),
              "crops": sum(len(s) for s in stems), "masks": bool(masks), "mode": ds.mode, "out": str(out),
              "skipped": [list(s) for s in ds.skipped], "label_spec": label_name,
              "train_with": ["data.dataset=paired", f"data.root={Path(out_dir)}", f"data.train_split={split}",
                             "data.crop=none", f"data.mode={ds.mode}"]
              + ([f"data.label_spec={label_name}"] if label_name else [])}  # the label map: for evaluation only
    (out / "prepared.json").write_text(json.dumps(report, indent=1))
    return report


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``prepare`` subcommand (config options as for ``train``)."""
    from .cli import _add_common_args, _add_config_args

    p = subparsers.add_parser("prepare", help="write a split's protocol crops once (paired folder) for fast training")
    _add_config_args(p)
    _add_common_args(p, "output root: crops go to OUT/<split>/images")
    p.add_argument("--split", default=None, help="split to crop (default data.train_split)")
    p.add_argument("--crop", default=None, help="crop kind: none, five, ten, double, super (default data.crop)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="png",
                   help="png (lossless, default) or jpeg (quality 75 = the official crop files)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality (with --format jpeg)")
    p.add_argument("--masks", action="store_true", help="also write the mask crops (evaluation only)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the available cores)")
    p.add_argument("--overwrite", action="store_true", help="write into an output folder that holds files")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """``causeseg prepare``: prints the report as one JSON line."""
    from .cli import _config_from_args, _print, _setup_logging
    from .data.root import data_root

    _setup_logging(None, getattr(args, "verbose", False))
    cfg = _config_from_args(args)
    split = args.split or cfg.data.train_split
    crop = args.crop or cfg.data.crop
    root = cfg.data.root
    if not root:  # as training does: the shared data root (its camvid folder for the camvid presets)
        base = data_root(required=True)
        root = str(base / "camvid") if cfg.data.dataset == "camvid" else str(base)
    report = prepare_split(cfg.data.dataset, root, split, crop, args.out, fmt=args.fmt,
                           quality=args.quality, masks=args.masks, label_spec=cfg.data.label_spec,
                           on_error=cfg.data.on_error, workers=args.workers, overwrite=args.overwrite)
    log.info("prepared %d crops of %d images; train on them with: %s", report["crops"], report["images"],
             " ".join(f"--set {s}" for s in report["train_with"]))
    _print(report)
    return 0
