"""Quality benchmark: CAUSE-MLP and CAUSE-TR against the field's k-means baseline on CamVid.

Train WITHOUT labels on camvid/train, evaluate on camvid/val (11 classes, 11 = void) with the
packaged EfficientNet-Lite0 backbone; mean +- std over seeds of mIoU and pixel accuracy, with and
without CRF. Also transductive sanity checks on the small COCO-Stuff, VOC and Cityscapes sets
(train and evaluate on the same images; labelled as such).

    python benchmarks/quality.py                  # 3 seeds, with CRF
    python benchmarks/quality.py --seeds 1 --no-crf --skip-transductive

Data root: CAUSESEG_DATA_ROOT or ../shared/data. Results: benchmarks/results/quality.json; the
last line printed is one JSON object with the summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from causeseg.config import load_config  # noqa: E402
from causeseg.data.root import data_root  # noqa: E402
from causeseg.evaluate import evaluate  # noqa: E402
from causeseg.model import CauseModel, tokens  # noqa: E402
from causeseg.predict import Predictor  # noqa: E402
from causeseg.train import build_backbone_from_config, build_split, train_all  # noqa: E402
from causeseg.utils import seed_everything  # noqa: E402


def kmeans_baseline(cfg, seed: int, run_dir: Path) -> CauseModel:
    """The field's baseline: k-means (C clusters, cosine) on the raw backbone features of train."""
    from sklearn.cluster import KMeans

    seed_everything(seed)
    device = torch.device("cpu")
    backbone = build_backbone_from_config(cfg, device)
    ds = build_split(cfg, cfg.data.train_split, cfg.eval.resolution, with_labels=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, collate_fn=lambda b: torch.stack([x["image"] for x in b]))
    feats = []
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for images in loader:
            t = tokens(backbone(images)).reshape(-1, backbone.embed_dim)
            feats.append(F.normalize(t[torch.randperm(len(t), generator=g)[:20000 // max(1, len(ds) // 16)]], dim=1))
    x = torch.cat(feats).numpy()
    km = KMeans(n_clusters=cfg.data.num_classes, n_init=3, random_state=seed).fit(x)
    centroids = torch.from_numpy(km.cluster_centers_).float()
    return CauseModel(backbone, nn.Identity(), torch.zeros(1, x.shape[1]), centroids, {"kind": "kmeans"})


def score(model, cfg, split: str, crf: bool, out_dir: Path, predictor=None) -> dict:
    """mIoU / pAcc (and per-class IoU, clusters holding >= 1 % of the pixels) with and without CRF."""
    ds = build_split(cfg, split, cfg.eval.resolution, with_labels=True)
    pred = predictor or Predictor(model, flip=cfg.eval.flip, alpha=cfg.eval.alpha)
    res = evaluate(pred, ds, num_classes=cfg.data.num_classes, batch_size=16, crf=crf,
                   crf_workers=cfg.eval.crf_workers, out_dir=out_dir, figures=6, progress=False)
    out: dict = {}
    for key in ("no_crf", "crf") if crf else ("no_crf",):
        cc = np.asarray(res[key]["cluster_confusion"], dtype=np.float64)
        out[key] = {"miou": res[key]["miou"], "pacc": res[key]["pacc"],
                    "per_class_iou": [round(float(x), 4) for x in res[key]["per_class_iou"]],
                    "clusters_over_1pct": int((cc.sum(1) / max(cc.sum(), 1.0) > 0.01).sum())}
    if crf:
        out["crf_seconds_per_image"] = res["crf_seconds_per_image"]
    return out


def self_trained(model, cfg, seed: int, crf: bool, run_dir: Path):
    """The pseudo-label self-training stage (``causeseg.selftrain``, CRF targets) on the TRAINING images
    (no labels) of ``model``, the same for CAUSE and the k-means baseline; returns (predictor, summary)."""
    from causeseg.crf import CRFRunner
    from causeseg.selftrain import SelfTrainConfig, self_train, self_trained_predictor

    ds = build_split(cfg, cfg.data.train_split, cfg.eval.resolution, with_labels=False)
    batches = torch.utils.data.DataLoader(ds, batch_size=16,
                                          collate_fn=lambda b: torch.stack([x["image"] for x in b]))
    st = SelfTrainConfig(seed=seed)
    t0 = time.perf_counter()
    with CRFRunner(workers=cfg.eval.crf_workers) as runner:
        pred = Predictor(model, flip=cfg.eval.flip, alpha=cfg.eval.alpha, crf_runner=runner)
        st_model, summary = self_train(pred, batches, st, crf=True)
    summary = {k: v for k, v in summary.items() if k != "config"} | {"seconds": time.perf_counter() - t0}
    return self_trained_predictor(st_model, flip=cfg.eval.flip), summary


def mean_std(values: list[float]) -> dict:
    a = np.array(values, dtype=np.float64) * 100
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarise(runs: list[dict], crf: bool) -> dict:
    out = {}
    for key in ("no_crf", "crf") if crf else ("no_crf",):
        out[key] = {m: mean_std([r[key][m] for r in runs]) for m in ("miou", "pacc")}
        per_class = np.array([r[key]["per_class_iou"] for r in runs if "per_class_iou" in r[key]]) * 100
        if len(per_class):
            out[key]["per_class_iou_mean"] = [round(float(x), 1) for x in per_class.mean(0)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--methods", default="kmeans,cause_mlp,cause_tr")
    ap.add_argument("--selftrain", default="", metavar="METHODS",
                    help="comma-separated methods also scored after pseudo-label self-training (causeseg.selftrain, "
                         "stored as '<method>+selftrain'), e.g. kmeans,cause_tr")
    ap.add_argument("--skip-transductive", action="store_true")
    ap.add_argument("--only-transductive", action="store_true", help="add the transductive checks to --out")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (section.key=value), for CAUSE runs and, where it applies "
                    "(backbone, resolution), for the k-means baseline")
    ap.add_argument("--work", default=str(ROOT / "runs" / "quality"), help="scratch folder for runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = data_root()
    if root is None:
        sys.exit("shared data not found: set CAUSESEG_DATA_ROOT")
    crf = not args.no_crf
    work = Path(args.work)
    methods = args.methods.split(",")
    presets = {"cause_mlp": "camvid_effnet_mlp", "cause_tr": "camvid_effnet_tr"}
    results: dict = {"dataset": "camvid train -> val (11 classes, void ignored)", "backbone": "efficientnet_lite0",
                     "seeds": args.seeds, "crf": crf, "overrides": args.overrides, "per_seed": {}, "summary": {},
                     "per_class_order": ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence",
                                         "car", "pedestrian", "bicyclist"]}
    t0 = time.perf_counter()
    if args.only_transductive:
        methods = []
        results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else results
    for method in methods:
        runs, st_runs = [], []
        for seed in range(args.seeds):
            run_dir = work / method / f"seed{seed}"
            t1 = time.perf_counter()
            if method == "kmeans":
                cfg = load_config("camvid_effnet_tr", [f"data.root={root / 'camvid'}", f"run.seed={seed}",
                                                        "run.progress=false", *args.overrides])
                model = kmeans_baseline(cfg, seed, run_dir)
            else:
                cfg = load_config(presets[method], [f"data.root={root / 'camvid'}", f"run.seed={seed}",
                                                    "run.progress=false", *args.overrides])
                model = CauseModel.load(train_all(cfg, run_dir))
            r = score(model, cfg, "val", crf, run_dir / "eval")
            r["seconds"] = time.perf_counter() - t1
            print(f"{method} seed {seed}: {json.dumps(r)}", flush=True)
            runs.append(r)
            if method in args.selftrain.split(","):
                pred, summary = self_trained(model, cfg, seed, crf, run_dir)
                r2 = score(None, cfg, "val", crf, run_dir / "eval-selftrain", predictor=pred)
                r2["selftrain"] = summary
                print(f"{method}+selftrain seed {seed}: {json.dumps(r2)}", flush=True)
                st_runs.append(r2)
        results["per_seed"][method] = runs
        results["summary"][method] = summarise(runs, crf)
        if st_runs:
            results["per_seed"][f"{method}+selftrain"] = st_runs
            results["summary"][f"{method}+selftrain"] = summarise(st_runs, crf)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a stop
    if not args.skip_transductive:
        trans = {}
        for name, preset_ds, classes in (("cocostuff", "cocostuff27", 27), ("voc", "voc", 21),
                                         ("cityscapes", "cityscapes27", 27)):
            spec = {"cocostuff": "cocostuff27", "voc": "voc21", "cityscapes": "cityscapes27"}[name]
            ov = [f"data.root={root / name}", "data.dataset=paired", f"data.label_spec={spec}",
                  f"data.num_classes={classes}", "data.train_split=.", "data.val_split=.", "run.progress=false",
                  "step1.k=256", "step2.batch_size=4", "step3.batch_size=4", "step1.batch_size=4"]
            cfg = load_config("camvid_effnet_tr", ov)
            model = CauseModel.load(train_all(cfg, work / "transductive" / name))
            trans[name] = {"note": "TRANSDUCTIVE: trained and evaluated on the same images", "classes": classes,
                           "cause_tr": score(model, cfg, ".", crf, work / "transductive" / name / "eval")}
            km = kmeans_baseline(cfg, 0, work / "transductive" / f"{name}-kmeans")
            trans[name]["kmeans"] = score(km, cfg, ".", crf, work / "transductive" / f"{name}-kmeans" / "eval")
            print(f"transductive {name}: {json.dumps(trans[name])}", flush=True)
        results["transductive"] = trans
    results["seconds" if not args.only_transductive else "transductive_seconds"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    line = {m: {k: {met: {"mean": v[met]["mean"], "std": v[met]["std"]} for met in ("miou", "pacc")}
                for k, v in s.items()} for m, s in results["summary"].items()}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
