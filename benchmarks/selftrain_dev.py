"""Pseudo-label self-training (causeseg.selftrain) of the k-means baseline and of CAUSE-TR, on the dev split.

The dev split is the one of ``benchmarks/quality_dev.py`` (its ``build_dev_split``, rebuilt under this script's
own work folder): the pseudo labels and the head are computed on the FIT images of camvid/train (images only,
no masks folder exists there), the DEV masks only score. camvid/val is not read.

* ``kmeans``: the baseline of ``benchmarks/quality.py`` (``kmeans_baseline``, seed 0, fit images: the same
  centroids as quality_dev.py's ``kmeans`` setting);
* ``tr`` (and any other ``--cause NAME``): the CAUSE model quality_dev.py trained, read from
  ``runs/quality-dev/runs/NAME/model.pt`` (not retrained).

For each: the model's CRF cluster maps of the fit images (and their mirrors) -> a light head on the frozen
stride-16 backbone features (causeseg.selftrain defaults) -> scored on dev with flip TTA, with and without
the CRF. The base model's own dev scores are read from benchmarks/results/quality-dev.json (same split,
same protocol) unless ``--rescore-base``.

    python benchmarks/selftrain_dev.py                           # kmeans and tr
    python benchmarks/selftrain_dev.py --only tr --use-embed     # stored as "tr+embed"

Results: benchmarks/results/selftrain-dev.json (merged per key).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import kmeans_baseline, score  # noqa: E402
from quality_dev import SETTINGS, build_dev_split  # noqa: E402
from quality_sweep import cluster_usage  # noqa: E402

from causeseg.config import load_config  # noqa: E402
from causeseg.crf import CRFRunner  # noqa: E402
from causeseg.data.root import data_root  # noqa: E402
from causeseg.evaluate import evaluate  # noqa: E402
from causeseg.model import CauseModel  # noqa: E402
from causeseg.predict import Predictor  # noqa: E402
from causeseg.selftrain import SelfTrainConfig, SelfTrainedModel, self_train, self_trained_predictor  # noqa: E402
from causeseg.train import build_backbone_from_config, build_split  # noqa: E402
from causeseg.utils import atomic_write_bytes  # noqa: E402


def base_model(name: str, cfg, quality_runs: Path, run_dir: Path) -> CauseModel:
    """The k-means baseline (centroids cached in ``run_dir``) or a CAUSE model trained by quality_dev.py."""
    if name != "kmeans":
        path = quality_runs / name / "model.pt"
        cents = quality_runs / name / "artifacts" / "centroids.pt"
        setting, _, seed = name.partition("@")  # "name@seed1": quality_dev.py's run of seed 1
        reuse = SETTINGS.get(setting, (None,) * 4)[3]
        if not path.exists() and cents.exists() and reuse:
            # a Step-3 setting of quality_dev.py: the reused setting's model with this setting's centroids
            base = CauseModel.load(quality_runs / (reuse + (f"@{seed}" if seed else "")) / "model.pt")
            c = torch.load(cents, map_location="cpu", weights_only=True)["centroids"]
            return CauseModel(base.backbone, base.head, base.codebook, c, base.meta)
        if not path.exists():
            sys.exit(f"{path}: no trained model; run `python benchmarks/quality_dev.py --only {name}` first")
        return CauseModel.load(path)
    cache = run_dir / "kmeans_centroids.pt"
    if cache.exists():
        backbone = build_backbone_from_config(cfg, torch.device("cpu"))
        c = torch.load(cache, weights_only=True)
        return CauseModel(backbone, nn.Identity(), torch.zeros(1, c.shape[1]), c, {"kind": "kmeans"})
    model = kmeans_baseline(cfg, 0, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.centroids.cpu(), cache)
    return model


def image_batches(cfg, batch_size: int = 16):
    """The fit images, as (B, 3, H, W) batches in [0, 1]: the dataset holds no labels."""
    ds = build_split(cfg, cfg.data.train_split, cfg.eval.resolution, with_labels=False)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size,
                                       collate_fn=lambda b: torch.stack([x["image"] for x in b]))


def dev_scores(predictor, dev_cfg, out_dir: Path, crf_workers: int) -> dict:
    ds = build_split(dev_cfg, "dev", dev_cfg.eval.resolution, with_labels=True)
    res = evaluate(predictor, ds, num_classes=dev_cfg.data.num_classes, batch_size=16, crf=True,
                   crf_workers=crf_workers, out_dir=out_dir, figures=6, progress=False)
    used, iou = cluster_usage(out_dir / "metrics.json")
    return {"miou": res["no_crf"]["miou"] * 100, "pacc": res["no_crf"]["pacc"] * 100,
            "miou_crf": res["crf"]["miou"] * 100, "pacc_crf": res["crf"]["pacc"] * 100,
            "clusters_over_1pct": used, "per_class_iou": iou,
            "per_class_iou_crf": [round(float(x) * 100, 1) for x in res["crf"]["per_class_iou"]]}


def run(name: str, args, work: Path) -> tuple[str, dict]:
    data = work / "data"
    train_ov = ["data.dataset=images", f"data.root={data / 'fit'}", "run.seed=0", "run.progress=false"]
    dev_ov = ["data.dataset=camvid", f"data.root={data}", "data.val_split=dev", "run.progress=false"]
    cfg = load_config("camvid_effnet_tr", train_ov)
    dev_cfg = load_config("camvid_effnet_tr", dev_ov)
    st = SelfTrainConfig(epochs=args.epochs, use_embed=args.use_embed, seed=args.seed)
    key = name + ("+embed" if args.use_embed else "")
    run_dir = work / "runs" / key
    t0 = time.perf_counter()
    model = base_model(name, cfg, Path(args.quality_runs), work / "runs" / name)
    base_s = time.perf_counter() - t0
    out = {"base": name, "selftrain": asdict(st), "base_seconds": base_s}
    if args.rescore_base:
        out["base_dev"] = dev_scores(Predictor(model, alpha=cfg.eval.alpha), dev_cfg, run_dir / "eval-base",
                                     args.crf_workers)
    else:
        q = json.loads(Path(args.quality_json).read_text())["settings"].get(name, {})
        out["base_dev"] = {k: q[k] for k in ("miou", "pacc", "miou_crf", "pacc_crf", "clusters_over_1pct",
                                             "per_class_iou", "per_class_iou_crf") if k in q}
        out["base_dev"]["source"] = "benchmarks/results/quality-dev.json"
    t1 = time.perf_counter()
    with CRFRunner(workers=args.crf_workers) as runner:
        pred = Predictor(model, alpha=cfg.eval.alpha, crf_runner=runner)
        st_model, summary = self_train(pred, image_batches(cfg), st, crf=True, log_every=1)
    out["selftrain_seconds"] = time.perf_counter() - t1
    out["summary"] = summary
    run_dir.mkdir(parents=True, exist_ok=True)
    st_model.save(run_dir / "selftrain_head.pt", st)
    st_model = SelfTrainedModel.load(run_dir / "selftrain_head.pt", model)  # score the file as written
    t2 = time.perf_counter()
    out["selftrained_dev"] = dev_scores(self_trained_predictor(st_model), dev_cfg, run_dir / "eval",
                                        args.crf_workers)
    out["eval_seconds"] = time.perf_counter() - t2
    out["seconds"] = time.perf_counter() - t0
    return key, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="kmeans,tr", help="comma-separated: kmeans and/or quality_dev.py settings")
    ap.add_argument("--epochs", type=int, default=SelfTrainConfig.epochs)
    ap.add_argument("--seed", type=int, default=0, help="self-training seed (the base models are seed 0)")
    ap.add_argument("--use-embed", action="store_true", help="the head also sees the cluster model's head output")
    ap.add_argument("--rescore-base", action="store_true", help="score the base model on dev here too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--crf-workers", type=int, default=0, help="CRF processes (0 = serial)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "selftrain-dev"))
    ap.add_argument("--quality-runs", default=str(ROOT / "runs" / "quality-dev" / "runs"))
    ap.add_argument("--quality-json", default=str(ROOT / "benchmarks" / "results" / "quality-dev.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "selftrain-dev.json"))
    args = ap.parse_args()
    root = data_root()
    if root is None:
        sys.exit("shared data not found: set CAUSESEG_DATA_ROOT")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    fit, dev = build_dev_split(root / "camvid" / "train", work / "data")
    print(f"dev split: {len(dev)} dev / {len(fit)} fit images of camvid/train", flush=True)
    out = Path(args.out)
    for name in [n for n in args.only.split(",") if n]:
        key, r = run(name, args, work)
        print(f"{key}: {json.dumps({k: v for k, v in r.items() if k != 'summary'})}", flush=True)
        results = json.loads(out.read_text()) if out.exists() else {}
        results["protocol"] = ("label-free: pseudo labels = the base model's CRF cluster maps of the FIT images of "
                               "camvid/train (and their mirrors); light head (causeseg.selftrain) on the frozen "
                               "stride-16 EfficientNet-Lite0 features at 320 px; scored on the DEV part of "
                               "camvid/train (dev rule of quality_dev.py), 11 classes, void ignored, flip TTA; "
                               "miou/pacc without CRF, *_crf with; clusters_over_1pct of the dev pixels (no CRF)")
        results["split"] = {"fit_images": len(fit), "dev_images": len(dev)}
        results.setdefault("settings", {})[key] = r
        atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
