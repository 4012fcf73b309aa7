"""Side measurements behind the CamVid quality analysis (README, Results): the geometry of a trained head.

For each trained run directory (``model.pt`` + ``config.yaml``, e.g. from ``quality.py`` or
``quality_sweep.py``):

* the mean pairwise cosine and the fraction of positive cosines of the head outputs and of the backbone
  features on 16 training images (a narrow cone makes the Step-3 affinity graph ``max(0, cos)`` dense);
* with ``--kmeans``: k-means (C clusters, n_init 5, on 40,000 unit head outputs of the training split)
  in place of the Step-3 centroids, scored on val without CRF -- does the head make classes separable?

    python benchmarks/head_geometry.py runs/quality/cause_tr/seed0 runs/quality/cause_tr/seed1 --kmeans

Results are printed and written to benchmarks/results/head-geometry.json (one entry per run directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import score  # noqa: E402

from causeseg.config import load_config  # noqa: E402
from causeseg.model import CauseModel  # noqa: E402
from causeseg.train import build_split  # noqa: E402


def unit_tokens(f: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C) unit vectors."""
    return F.normalize(f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]), dim=1)


def cone_stats(x: torch.Tensor) -> dict:
    c = x @ x.t()
    return {"mean_pair_cos": float(c.mean()), "frac_pairs_positive": float((c > 0).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="trained run directories")
    ap.add_argument("--kmeans", action="store_true", help="also score k-means on the head outputs (val, no CRF)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "head-geometry.json"))
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for run in map(Path, args.runs):
        model = CauseModel.load(run / "model.pt")
        cfg = load_config(str(run / "config.yaml"), ["run.progress=false"])
        ds = build_split(cfg, cfg.data.train_split, cfg.eval.resolution, with_labels=False)
        step = max(1, len(ds) // 16)
        with torch.no_grad():
            images = torch.stack([ds[j]["image"] for j in range(0, len(ds), step)][:16])
            r = {"head": cone_stats(unit_tokens(model.embed(images))),
                 "backbone": cone_stats(unit_tokens(model.backbone(images).float()))}
        if args.kmeans:
            from sklearn.cluster import KMeans

            with torch.no_grad():
                ys = [unit_tokens(model.embed(torch.stack([ds[j]["image"] for j in range(i, min(i + 16, len(ds)))])))
                      for i in range(0, len(ds), 16)]
            y = torch.cat(ys)
            g = torch.Generator().manual_seed(args.seed)
            x = y[torch.randperm(len(y), generator=g)[:40000]].numpy()
            km = KMeans(n_clusters=cfg.data.num_classes, n_init=5, random_state=args.seed).fit(x)
            alt = CauseModel(model.backbone, model.head, model.codebook,
                             torch.from_numpy(km.cluster_centers_).float(), model.meta)
            s = score(alt, cfg, "val", False, run / "eval-kmeans-on-head")["no_crf"]
            r["kmeans_on_head"] = {"miou": s["miou"] * 100, "pacc": s["pacc"] * 100}
        print(run, json.dumps(r), flush=True)
        results[str(run)] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
