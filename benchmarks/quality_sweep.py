"""Why CAUSE does (not) beat k-means on CamVid: one-seed ablation sweep of the quality benchmark.

Each setting trains WITHOUT labels on camvid/train and is scored on camvid/val (no CRF, seed 0,
EfficientNet-Lite0), like ``benchmarks/quality.py``. Besides mIoU / pixel accuracy it records
the per-class IoU and how many of the C clusters hold at least 1 % of the val pixels, which is
what separates "high pixel accuracy, capped mIoU" (few big clusters) from balanced clusterings.

    python benchmarks/quality_sweep.py                       # every setting (about 2 h on 2 cores)
    python benchmarks/quality_sweep.py --only tr,tr_phi50    # a subset
    python benchmarks/quality_sweep.py --list
    python benchmarks/quality_sweep.py --only tr_ema_warmup --seed 1   # stored as "tr_ema_warmup@seed1"

Settings that change the backbone geometry (feature stride, resolution) carry their own k-means
baseline, since the baseline sees the same features. Step-3-only settings reuse the trained
clusterbook and head of the setting named in ``reuse`` (a fresh Step 3 on the same head).
Results: benchmarks/results/quality-sweep.json (merged into the existing file, one entry per setting).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import kmeans_baseline, score  # noqa: E402

from causeseg.config import load_config  # noqa: E402
from causeseg.data.root import data_root  # noqa: E402
from causeseg.model import CauseModel  # noqa: E402
from causeseg.train import train_all  # noqa: E402
from causeseg.utils import atomic_write_bytes  # noqa: E402

S32 = ["backbone.options.feature_stride=32", "step1.resolution=640", "step2.resolution=640",
       "step3.resolution=640", "eval.resolution=640"]
PAPER = ["step1.variant=paper", "step2.loss_form=paper", "step2.bank_policy=paper", "step2.feature_space=head"]
CAT8 = ["backbone.options.feature_stride=cat"]  # stages 2+4+6 at stride 8: 40x40 tokens at 320 px, as ViT-S/8

#: name -> (method, overrides, what it tests, reuse: setting whose clusterbook + head are reused)
SETTINGS: dict[str, tuple[str, list[str], str, str | None]] = {
    "kmeans": ("kmeans", [], "the field's baseline: k-means (C=11) on raw stride-16 features", None),
    "mlp": ("cause_mlp", [], "CAUSE-MLP, preset", None),
    "tr": ("cause_tr", [], "CAUSE-TR, preset (phi+ 0.3, phi- 0.1, k 512, stride 16 at 320 px)", None),
    "tr_phi50_neg30": ("cause_tr", ["step2.phi_pos=0.5", "step2.phi_neg=0.3"],
                       "phi from the EfficientNet D_M quantiles: ~3 % positive, ~45 % negative concept pairs", None),
    "tr_k128": ("cause_tr", ["step1.k=128"], "a smaller clusterbook", None),
    "tr_step3_kmeanspp": ("cause_tr", ["step3.init=kmeans++"], "Step-3 centroids seeded by k-means++ on head outputs",
                          "tr"),
    "tr_step3_gamma1.1": ("cause_tr", ["step3.gamma=1.1"], "Step-3 modularity resolution 1.1", "tr"),
    "tr_step3_gamma1.5": ("cause_tr", ["step3.gamma=1.5"], "Step-3 modularity resolution 1.5", "tr"),
    "tr_step3_gamma2": ("cause_tr", ["step3.gamma=2.0"], "Step-3 modularity resolution 2 (null model dominates)",
                        "tr"),
    "tr_step3_grid2": ("cause_tr", ["step3.grid=2"], "Step 3 samples one token per 2x2 window (4x the tokens)",
                       "tr"),
    "tr_step3_kmeans": ("cause_tr", ["step3.learner=kmeans"], "Step 3 with the STEGO/HP cluster probe", "tr"),
    "tr_ema_warmup": ("cause_tr", ["step2.ema_warmup=true"],
                      "EMA teacher with the mean-teacher warm-up (66 Step-2 iterations leave 51 % of the random "
                      "init in a constant-0.99 teacher)", None),
    "tr_ema_warmup_s1ep10": ("cause_tr", ["step2.ema_warmup=true", "step1.epochs=10"],
                             "EMA warm-up and 10 Step-1 epochs (220 clusterbook iterations instead of 44)", None),
    "tr_step1_kmeanspp": ("cause_tr", ["step1.method=kmeans++"],
                          "clusterbook by k-means++ on backbone tokens (the paper's Table-4 discretiser ablation)", None),
    "tr_untrained": ("cause_tr", ["step2.epochs=0"],
                     "no Step-2 training: Step 3 clusters the output of the randomly initialised TR head", None),
    "mlp_ema_warmup": ("cause_mlp", ["step2.ema_warmup=true"], "CAUSE-MLP with the EMA warm-up", None),
    "kmeans_s32_640": ("kmeans", S32, "baseline on stride-32 features at 640 px (20x20 tokens)", None),
    "tr_s32_640": ("cause_tr", S32, "CAUSE-TR on stride-32 features at 640 px", None),
    "tr_anchor2": ("cause_tr", ["step2.grid=2"],
                   "one Step-2 anchor per 2x2 window: 100 anchors per 320-px image, as ViT/8 with the paper's 4x4",
                   None),
    "tr_step1_paper": ("cause_tr", PAPER[:1], "Step-1 objective of the paper (Eq. 6) instead of the code's", None),
    "tr_loss_paper": ("cause_tr", PAPER[1:2], "contrastive loss of the paper (Eq. 4, one positive per term)", None),
    "tr_bank_paper": ("cause_tr", PAPER[2:3], "bank update of the paper (discard half, add half)", None),
    "tr_feature_head": ("cause_tr", PAPER[3:], "bank and loss on the 90-d head output (paper) not the projection",
                        None),
    "tr_paper": ("cause_tr", PAPER, "every paper-vs-code switch set to the paper", None),
    "kmeans_cat8": ("kmeans", CAT8, "baseline on the stride-8 multi-scale features (472-d, 40x40 tokens)", None),
    "tr_cat8": ("cause_tr", CAT8, "CAUSE-TR on the stride-8 multi-scale features (the ViT-S/8 token grid)", None),
    "tr_cat8_step3_kmeans": ("cause_tr", [*CAT8, "step3.learner=kmeans"],
                             "Step 3 with the STEGO/HP cluster probe on the tr_cat8 head", "tr_cat8"),
}
PRESETS = {"cause_mlp": "camvid_effnet_mlp", "cause_tr": "camvid_effnet_tr"}


def cluster_usage(metrics_path: Path) -> tuple[int, list[float]]:
    d = json.loads(metrics_path.read_text())["no_crf"]
    cc = np.asarray(d["cluster_confusion"], dtype=np.float64)
    use = cc.sum(1) / max(cc.sum(), 1.0)
    return int((use > 0.01).sum()), [round(float(x) * 100, 1) for x in d["per_class_iou"]]


def result_key(name: str, seed: int) -> str:
    """Results (and run folders) of seed 0 go under the setting's name, other seeds under ``name@seedN``."""
    return name if seed == 0 else f"{name}@seed{seed}"


def run_setting(name: str, work: Path, root: Path, seed: int) -> dict:
    method, overrides, what, reuse = SETTINGS[name]
    run_dir = work / result_key(name, seed)
    base = [f"data.root={root / 'camvid'}", f"run.seed={seed}", "run.progress=false", *overrides]
    t0 = time.perf_counter()
    if method == "kmeans":
        cfg = load_config("camvid_effnet_tr", base)
        model = kmeans_baseline(cfg, seed, run_dir)
    else:
        cfg = load_config(PRESETS[method], base)
        if reuse is not None:  # a fresh Step 3 on the clusterbook and head of another setting
            src = work / result_key(reuse, seed) / "artifacts"
            if not (src / "head.pt").exists():
                raise SystemExit(f"{name}: run the setting '{reuse}' first (its head is reused)")
            shutil.rmtree(run_dir, ignore_errors=True)
            (run_dir / "artifacts").mkdir(parents=True)
            for f in ("clusterbook.pt", "head.pt"):
                shutil.copy(src / f, run_dir / "artifacts" / f)
        model = CauseModel.load(train_all(cfg, run_dir))
    res = score(model, cfg, "val", False, run_dir / "eval")["no_crf"]
    used, iou = cluster_usage(run_dir / "eval" / "metrics.json")
    return {"method": method, "overrides": overrides, "tests": what, "reuses_head_of": reuse, "seed": seed,
            "miou": res["miou"] * 100, "pacc": res["pacc"] * 100, "clusters_over_1pct": used,
            "per_class_iou": iou, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the settings and exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(ROOT / "runs" / "quality-sweep"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality-sweep.json"))
    args = ap.parse_args()
    if args.list:
        for name, (method, ov, what, reuse) in SETTINGS.items():
            print(f"{name:22s} {method:10s} {what}" + (f" (reuses {reuse})" if reuse else ""))
        return
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings {unknown}; see --list")
    root = data_root()
    if root is None:
        sys.exit("shared data not found: set CAUSESEG_DATA_ROOT")
    out = Path(args.out)
    for name in names:
        r = run_setting(name, Path(args.work), root, args.seed)
        print(f"{name}: miou {r['miou']:.1f} pacc {r['pacc']:.1f} clusters>1% {r['clusters_over_1pct']} "
              f"iou {r['per_class_iou']}", flush=True)
        # re-read before merging, so that sweeps run one after another (or side by side) keep each other's results
        results = json.loads(out.read_text()) if out.exists() else {}
        results.setdefault("protocol", "camvid train -> val, 11 classes (void ignored), EfficientNet-Lite0, "
                                       "no CRF, seed 0 unless the key says @seedN; per_class_iou in CamVid class "
                                       "order")
        results.setdefault("settings", {})[result_key(name, args.seed)] = r
        atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())  # keeps the settings' order
    print(json.dumps({n: {"miou": round(r["miou"], 2), "pacc": round(r["pacc"], 2),
                          "clusters_over_1pct": r["clusters_over_1pct"]}
                      for n, r in results["settings"].items()}))


if __name__ == "__main__":
    main()
