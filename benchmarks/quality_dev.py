"""Label-free remedies for Step 3 on CamVid, chosen on a dev split carved out of camvid/train.

The dev split (fixed, documented): a camvid/train image is a DEV image when
``int(sha1(stem).hexdigest(), 16) % 5 == 0`` (stem = file name without extension, e.g. ``0001TP_006690``),
about 20 % of the 367 images; the others are FIT images. The script builds, under ``<work>/data``,

* ``fit/``: symlinks to the fit IMAGES only -- no masks folder exists there, so training (dataset ``images``)
  cannot read a mask; the dev images are not trained on either (held out, like val);
* ``dev/images`` + ``dev/masks``: symlinks to the dev pairs, read only to score a trained model.

Every remedy is chosen on dev; camvid/val is never read here. Per setting it records, on dev: mIoU and pixel
accuracy with and without CRF, per-class IoU, how many of the C clusters hold >= 1 % of the dev pixels, the
head-output cone (mean pairwise cosine and fraction of positive pairs on 16 dev images, as
``head_geometry.py``) and the wall time.

    python benchmarks/quality_dev.py --list
    python benchmarks/quality_dev.py --only kmeans,tr,tr_sinkhorn          # Step-3 settings reuse the 'tr' head
    python benchmarks/quality_dev.py --only tr,tr_sinkhorn --seed 1        # stored as "tr@seed1", ...
    python benchmarks/quality_dev.py --split-only                          # print the dev split and exit

Results: benchmarks/results/quality-dev.json (merged per setting; seed N > 0 stored as ``name@seedN``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from head_geometry import cone_stats, unit_tokens  # noqa: E402
from quality import kmeans_baseline, score  # noqa: E402
from quality_sweep import PRESETS, cluster_usage, result_key  # noqa: E402

from causeseg.clusterbook import Clusterbook  # noqa: E402
from causeseg.config import load_config  # noqa: E402
from causeseg.data.io import IMAGE_EXTENSIONS  # noqa: E402
from causeseg.data.root import data_root  # noqa: E402
from causeseg.model import CauseModel  # noqa: E402
from causeseg.distributed import init_distributed  # noqa: E402
from causeseg.train import Student, build_split, train_all, train_step3  # noqa: E402
from causeseg.utils import atomic_write_bytes, seed_everything  # noqa: E402

DEV_MODULUS = 5  # 1 in 5 of camvid/train is dev

SINK = ["step3.learner=sinkhorn"]
CAT8 = ["backbone.options.feature_stride=cat"]
#: name -> (method, overrides, what it tests, reuse: setting whose clusterbook + head are reused for Step 3)
SETTINGS: dict[str, tuple[str, list[str], str, str | None]] = {
    "kmeans": ("kmeans", [], "baseline: k-means (C = 11, n_init 3) on raw stride-16 backbone features", None),
    "tr": ("cause_tr", [], "CAUSE-TR preset (Step 3: modularity centroids)", None),
    "mlp": ("cause_mlp", [], "CAUSE-MLP preset (Step 3: modularity centroids)", None),
    "tr_sinkhorn": ("cause_tr", SINK, "Step 3 with SwAV balanced assignments (Sinkhorn eps 0.05, 3 iters)", "tr"),
    "tr_sinkhorn_kmeanspp": ("cause_tr", [*SINK, "step3.init=kmeans++"],
                             "sinkhorn Step 3 seeded by k-means++ on head outputs", "tr"),
    "tr_sinkhorn_eps0.02": ("cause_tr", [*SINK, "step3.sinkhorn_eps=0.02"], "sinkhorn, sharper codes", "tr"),
    "tr_sinkhorn_eps0.1": ("cause_tr", [*SINK, "step3.sinkhorn_eps=0.1"], "sinkhorn, softer codes", "tr"),
    "tr_sinkhorn_ep10": ("cause_tr", [*SINK, "step3.epochs=10"], "sinkhorn, 10 Step-3 epochs (3 in the preset)",
                         "tr"),
    "tr_sinkhorn_b0.5": ("cause_tr", [*SINK, "step3.sinkhorn_balance=0.5"],
                         "sinkhorn with KL-relaxed cluster sizes (unbalanced OT, balance 0.5)", "tr"),
    "tr_sinkhorn_b0.8": ("cause_tr", [*SINK, "step3.sinkhorn_balance=0.8"],
                         "sinkhorn with KL-relaxed cluster sizes (unbalanced OT, balance 0.8)", "tr"),
    "tr_sinkhorn_b0.5_kmeanspp": ("cause_tr", [*SINK, "step3.sinkhorn_balance=0.5", "step3.init=kmeans++"],
                                  "relaxed sinkhorn (balance 0.5) seeded by k-means++", "tr"),
    "tr_sinkhorn_b0.3_kmeanspp": ("cause_tr", [*SINK, "step3.sinkhorn_balance=0.3", "step3.init=kmeans++"],
                                  "relaxed sinkhorn (balance 0.3) seeded by k-means++", "tr"),
    "tr_step3_kmeans_kmeanspp": ("cause_tr", ["step3.learner=kmeans", "step3.init=kmeans++"],
                                 "online cluster probe seeded by k-means++ on head outputs", "tr"),
    "tr_head_kmeans": ("kmeans_head", [], "reference: offline k-means (C = 11, n_init 3) on 20,000 unit head outputs "
                       "of the fit images in place of Step 3 (as head_geometry.py --kmeans)", "tr"),
    "tr_step3_kmeans": ("cause_tr", ["step3.learner=kmeans"], "Step 3 with the online STEGO/HP cluster probe", "tr"),
    "mlp_sinkhorn": ("cause_mlp", SINK, "CAUSE-MLP head, sinkhorn Step 3", "mlp"),
    "mlp_sinkhorn_b0.5_kmeanspp": ("cause_mlp", [*SINK, "step3.sinkhorn_balance=0.5", "step3.init=kmeans++"],
                                   "CAUSE-MLP, relaxed sinkhorn (balance 0.5) + k-means++", "mlp"),
    "mlp_step3_kmeans_kmeanspp": ("cause_mlp", ["step3.learner=kmeans", "step3.init=kmeans++"],
                                  "CAUSE-MLP, online cluster probe seeded by k-means++", "mlp"),
    # phi calibrated from the quantiles of the off-diagonal D_M of the seed-0 fit clusterbook (k 512): 45 % of its
    # pairs exceed the DINO-tuned 0.3; the rule "top P % positive, bottom 50 % negative" gives these thresholds
    "tr_phiq10": ("cause_tr", ["step2.phi_pos=0.417", "step2.phi_neg=0.286"],
                  "phi from D_M quantiles: 10 % of concept pairs positive, 50 % negative (seed-0 clusterbook)", None),
    "tr_phiq25": ("cause_tr", ["step2.phi_pos=0.359", "step2.phi_neg=0.286"],
                  "phi from D_M quantiles: 25 % of concept pairs positive, 50 % negative (seed-0 clusterbook)", None),
    "tr_phiq10_sinkhorn": ("cause_tr", ["step2.phi_pos=0.417", "step2.phi_neg=0.286", *SINK,
                                        "step3.sinkhorn_balance=0.5", "step3.init=kmeans++"],
                           "phi quantile 10/50 head, relaxed sinkhorn (0.5) + k-means++ Step 3", "tr_phiq10"),
    "tr_phiq25_sinkhorn": ("cause_tr", ["step2.phi_pos=0.359", "step2.phi_neg=0.286", *SINK,
                                        "step3.sinkhorn_balance=0.5", "step3.init=kmeans++"],
                           "phi quantile 25/50 head, relaxed sinkhorn (0.5) + k-means++ Step 3", "tr_phiq25"),
    "tr_phiq10_head_kmeans": ("kmeans_head", [], "reference: offline k-means on the phi-quantile 10/50 head output",
                              "tr_phiq10"),
    "tr_phiq25_head_kmeans": ("kmeans_head", [], "reference: offline k-means on the phi-quantile 25/50 head output",
                              "tr_phiq25"),
    # finer tokens: the stride-8 multi-scale features (stages at strides 8, 16, 32 resized to stride 8 and
    # concatenated: 472-d, 40 x 40 tokens at 320 px, the token grid of ViT-S/8)
    "kmeans_cat8": ("kmeans", CAT8, "baseline on the stride-8 multi-scale features", None),
    "tr_cat8": ("cause_tr", CAT8, "CAUSE-TR preset on the stride-8 multi-scale features", None),
    "tr_cat8_sinkhorn": ("cause_tr", [*CAT8, *SINK, "step3.sinkhorn_balance=0.5", "step3.init=kmeans++"],
                         "stride-8 multi-scale head, relaxed sinkhorn (0.5) + k-means++ Step 3", "tr_cat8"),
    "tr_cat8_head_kmeans": ("kmeans_head", CAT8, "reference: offline k-means on the stride-8 multi-scale head output",
                            "tr_cat8"),
    "mlp_sinkhorn_kmeanspp": ("cause_mlp", [*SINK, "step3.init=kmeans++"], "CAUSE-MLP, sinkhorn + k-means++",
                              "mlp"),
}


def is_dev(stem: str) -> bool:
    """The dev rule: sha1 of the file stem, as an integer, is a multiple of ``DEV_MODULUS``."""
    return int(hashlib.sha1(stem.encode("utf-8")).hexdigest(), 16) % DEV_MODULUS == 0


def build_dev_split(train_dir: Path, out: Path) -> tuple[list[str], list[str]]:
    """Symlink folders ``out/fit`` (images only) and ``out/dev/{images,masks}``; returns (fit, dev) stems."""
    images = sorted(p for p in (train_dir / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    masks = {p.stem: p for p in (train_dir / "masks").iterdir()}
    shutil.rmtree(out, ignore_errors=True)
    for d in (out / "fit", out / "dev" / "images", out / "dev" / "masks"):
        d.mkdir(parents=True)
    fit, dev = [], []
    for p in images:
        if is_dev(p.stem):
            if p.stem not in masks:
                raise SystemExit(f"{train_dir / 'masks'}: no mask for dev image {p.name}")
            (out / "dev" / "images" / p.name).symlink_to(p.resolve())
            (out / "dev" / "masks" / masks[p.stem].name).symlink_to(masks[p.stem].resolve())
            dev.append(p.stem)
        else:
            (out / "fit" / p.name).symlink_to(p.resolve())
            fit.append(p.stem)
    return fit, dev


def head_cone(model: CauseModel, dev_cfg) -> dict:
    """Mean pairwise cosine (and fraction of positive pairs) of the head output on 16 dev images."""
    ds = build_split(dev_cfg, "dev", dev_cfg.eval.resolution, with_labels=False)
    step = max(1, len(ds) // 16)
    with torch.no_grad():
        images = torch.stack([ds[j]["image"] for j in range(0, len(ds), step)][:16])
        return cone_stats(unit_tokens(model.embed(images).float()))


def step3_on(cfg, base_run: Path, run_dir: Path) -> CauseModel:
    """A fresh Step 3 (``train_step3`` under ``cfg``) on the clusterbook and head of the trained ``base_run``.

    Called directly, not through ``train_all``, so that the head is reused as it is whatever its artifacts'
    provenance; the base run's feature cache is shared through a symlink.
    """
    if not (base_run / "model.pt").exists():
        raise SystemExit(f"{base_run}: no trained model; run its setting first")
    base = CauseModel.load(base_run / "model.pt")
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "artifacts").mkdir(parents=True)
    if (base_run / "cache").is_dir():
        (run_dir / "cache").symlink_to((base_run / "cache").resolve())
    seed_everything(cfg.run.seed)
    centroids = train_step3(cfg, base.backbone, Clusterbook(base.codebook), Student(base.head, None), run_dir,
                            torch.device("cpu"), init_distributed("cpu"))
    return CauseModel(base.backbone, base.head, base.codebook, centroids, base.meta)


def head_kmeans(cfg, base: CauseModel, seed: int) -> CauseModel:
    """Offline k-means (C clusters, n_init 3) on 20,000 unit head outputs of the training images of ``base``."""
    from sklearn.cluster import KMeans

    ds = build_split(cfg, cfg.data.train_split, cfg.eval.resolution, with_labels=False)
    with torch.no_grad():
        y = torch.cat([unit_tokens(base.embed(torch.stack([ds[j]["image"] for j in range(i, min(i + 16, len(ds)))])))
                       for i in range(0, len(ds), 16)])
    x = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:20000]].numpy()
    km = KMeans(n_clusters=cfg.data.num_classes, n_init=3, random_state=seed).fit(x)
    return CauseModel(base.backbone, base.head, base.codebook, torch.from_numpy(km.cluster_centers_).float(),
                      base.meta)


def head_kmeans_on(cfg, base_run: Path, seed: int) -> CauseModel:
    """:func:`head_kmeans` on the trained model of ``base_run`` in place of its Step 3 (a reference)."""
    return head_kmeans(cfg, CauseModel.load(base_run / "model.pt"), seed)


def run_setting(name: str, work: Path, seed: int, crf: bool) -> dict:
    method, overrides, what, reuse = SETTINGS[name]
    run_dir = work / "runs" / result_key(name, seed)
    data = work / "data"
    # training sees the fit images only, as a plain image folder (no masks exist there)
    train_ov = ["data.dataset=images", f"data.root={data / 'fit'}", f"run.seed={seed}", "run.progress=false"]
    dev_ov = ["data.dataset=camvid", f"data.root={data}", "data.val_split=dev", "run.progress=false"]
    preset = PRESETS.get(method, PRESETS.get(SETTINGS[reuse][0], "camvid_effnet_tr") if reuse else "camvid_effnet_tr")
    cfg = load_config(preset, [*train_ov, *overrides])
    dev_cfg = load_config(preset, [*dev_ov, *overrides])
    t0 = time.perf_counter()
    if method == "kmeans":
        model = kmeans_baseline(cfg, seed, run_dir)
    elif method == "kmeans_head":
        model = head_kmeans_on(cfg, work / "runs" / result_key(reuse, seed), seed)
    else:
        if reuse is not None:
            model = step3_on(cfg, work / "runs" / result_key(reuse, seed), run_dir)
        else:
            model = CauseModel.load(train_all(cfg, run_dir))
    train_s = time.perf_counter() - t0
    res = score(model, dev_cfg, "dev", crf, run_dir / "eval")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    used, iou = cluster_usage(run_dir / "eval" / "metrics.json")
    out = {"method": method, "overrides": overrides, "tests": what, "reuses_head_of": reuse, "seed": seed,
           "miou": res["no_crf"]["miou"] * 100, "pacc": res["no_crf"]["pacc"] * 100, "clusters_over_1pct": used,
           "per_class_iou": iou, "cone": head_cone(model, dev_cfg), "train_seconds": train_s,
           "seconds": time.perf_counter() - t0}
    if crf:
        out.update(miou_crf=res["crf"]["miou"] * 100, pacc_crf=res["crf"]["pacc"] * 100,
                   per_class_iou_crf=[round(float(x) * 100, 1) for x in metrics["crf"]["per_class_iou"]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--list", action="store_true", help="list the settings and exit")
    ap.add_argument("--split-only", action="store_true", help="build and print the dev split, then exit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--work", default=str(ROOT / "runs" / "quality-dev"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality-dev.json"))
    args = ap.parse_args()
    if args.list:
        for name, (method, _, what, reuse) in SETTINGS.items():
            print(f"{name:24s} {method:10s} {what}" + (f" (reuses {reuse})" if reuse else ""))
        return
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings {unknown}; see --list")
    root = data_root()
    if root is None:
        sys.exit("shared data not found: set CAUSESEG_DATA_ROOT")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    fit, dev = build_dev_split(root / "camvid" / "train", work / "data")
    split = {"rule": f"int(sha1(stem).hexdigest(), 16) % {DEV_MODULUS} == 0 -> dev (camvid/train)",
             "fit_images": len(fit), "dev_images": len(dev), "dev": dev}
    print(f"dev split: {len(dev)} dev / {len(fit)} fit images of camvid/train", flush=True)
    if args.split_only:
        print(json.dumps(split))
        return
    out = Path(args.out)
    for name in names:
        r = run_setting(name, work, args.seed, not args.no_crf)
        print(f"{name}: {json.dumps({k: v for k, v in r.items() if k not in ('tests', 'overrides')})}", flush=True)
        results = json.loads(out.read_text()) if out.exists() else {}
        results["protocol"] = ("label-free training on the FIT part of camvid/train (images only), scored on the "
                               "DEV part (its masks); camvid/val is not used; 11 classes, void ignored, "
                               "EfficientNet-Lite0, flip TTA; miou/pacc without CRF, *_crf with; seed 0 unless "
                               "the key says @seedN; per_class_iou in CamVid class order; cone = head output on "
                               "16 dev images (backbone features for kmeans)")
        results["split"] = split
        results.setdefault("settings", {})[result_key(name, args.seed)] = r
        atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
