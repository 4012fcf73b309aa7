"""Quality against the Step-2 length, on the dev split (issue 13: when does the collapse set in?).

Trains the CAUSE-TR preset head on the FIT images of camvid/train (images only, see ``quality_dev.py``) for
``--iterations`` Step-2 iterations, stopping every ``--every`` iterations through the resumable training loop
(``train_all(stop_after=...)``, the checkpoint of ``checkpoints/step2.pt``). At iteration 0 (the untrained head,
built as Step 2 builds it) and at every stop, the EMA teacher of the checkpoint is frozen and scored on DEV
(no CRF, flip TTA) under three ways of turning head outputs into 11 classes:

* ``modularity``: the preset's Step 3 (official modularity centroids);
* ``sinkhorn``: the dev-chosen Step 3 (relaxed Sinkhorn, balance 0.5, seeded by k-means++);
* ``head_kmeans``: offline k-means (n_init 3) on 20,000 unit head outputs of the fit images (a reference:
  what the head's geometry allows, whatever Step 3 does).

Per point: mIoU, pAcc, per-class IoU, clusters holding >= 1 % of the dev pixels, and the head-output cone on
16 dev images (mean pairwise cosine). camvid/val is never read.

    python benchmarks/step2_curve.py                          # 250 iterations (preset: 51), every 50
    python benchmarks/step2_curve.py --iterations 100 --every 50 --seed 1

Results: benchmarks/results/step2-curve.json (per seed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quality import score  # noqa: E402
from quality_dev import build_dev_split, head_cone, head_kmeans  # noqa: E402
from quality_sweep import cluster_usage  # noqa: E402

from causeseg.clusterbook import Clusterbook  # noqa: E402
from causeseg.config import load_config  # noqa: E402
from causeseg.data.root import data_root  # noqa: E402
from causeseg.distributed import init_distributed  # noqa: E402
from causeseg.heads import make_teacher  # noqa: E402
from causeseg.loop import TrainingInterrupted  # noqa: E402
from causeseg.model import CauseModel  # noqa: E402
from causeseg.train import (build_backbone_from_config, build_student, train_all,  # noqa: E402
                            train_step3)
from causeseg.utils import atomic_write_bytes, seed_everything  # noqa: E402

#: each readout names every Step-3 setting it depends on, so a preset change cannot alter it
STEP3 = {"modularity": ["step3.learner=modularity", "step3.init=uniform"],
         "sinkhorn": ["step3.learner=sinkhorn", "step3.sinkhorn_balance=0.5", "step3.init=kmeans++"]}


def teacher_at(cfg, run_dir: Path, in_dim: int, nq: int, step: int):
    """The EMA teacher after ``step`` Step-2 iterations (0: the initial head, as ``train_step2`` builds it),
    from ``curve/teacher-<step>.pt`` when it was kept, else from the Step-2 checkpoint (kept then)."""
    torch.manual_seed(cfg.run.seed)
    student = build_student(cfg, in_dim, nq)
    teacher = make_teacher(student)
    kept = run_dir / "curve" / f"teacher-{step}.pt"
    if step > 0 and kept.exists():
        teacher.load_state_dict(torch.load(kept, map_location="cpu", weights_only=True))
    elif step > 0:
        ck = torch.load(run_dir / "checkpoints" / "step2.pt", map_location="cpu", weights_only=True)
        if int(ck["global_step"]) != step:
            raise SystemExit(f"checkpoint at step {ck['global_step']}, expected {step}, and no {kept}")
        teacher.load_state_dict(ck["state"]["step2"]["teacher"])
        kept.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), kept)
    return teacher.eval()


def point(cfg, dev_cfg, run_dir: Path, backbone, book, teacher, step: int, seed: int,
          readouts: tuple[str, ...] = ("modularity", "sinkhorn", "head_kmeans")) -> dict:
    out: dict = {"step": step}
    base = CauseModel(backbone, teacher.head, book.prototypes, torch.zeros(cfg.data.num_classes, 1), {})
    out["cone"] = head_cone(base, dev_cfg)
    for name, ov in STEP3.items():
        if name not in readouts:
            continue
        c3 = load_config("camvid_effnet_tr", [*cfg_overrides(cfg), *ov])
        snap = run_dir / "curve" / f"{step}-{name}"
        shutil.rmtree(snap, ignore_errors=True)
        (snap / "artifacts").mkdir(parents=True)
        (snap / "cache").symlink_to((run_dir / "cache").resolve())
        seed_everything(seed)
        t0 = time.perf_counter()
        cents = train_step3(c3, backbone, book, teacher, snap, torch.device("cpu"), init_distributed("cpu"))
        model = CauseModel(backbone, teacher.head, book.prototypes, cents, {})
        out[name] = evaluate_point(model, dev_cfg, snap, t0)
    if "head_kmeans" not in readouts:
        return out
    t0 = time.perf_counter()
    model = head_kmeans(cfg, base, seed)
    out["head_kmeans"] = evaluate_point(model, dev_cfg, run_dir / "curve" / f"{step}-head_kmeans", t0)
    return out


def evaluate_point(model, dev_cfg, out_dir: Path, t0: float) -> dict:
    res = score(model, dev_cfg, "dev", False, out_dir / "eval")
    used, iou = cluster_usage(out_dir / "eval" / "metrics.json")
    return {"miou": res["no_crf"]["miou"] * 100, "pacc": res["no_crf"]["pacc"] * 100, "clusters_over_1pct": used,
            "per_class_iou": iou, "seconds": time.perf_counter() - t0}


_OVERRIDES: list[str] = []


def cfg_overrides(_cfg) -> list[str]:
    return list(_OVERRIDES)


def plot(results: dict, path: Path) -> None:
    """mIoU and clusters in use against the Step-2 iterations, one line per Step-3 readout and seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    styles = {"modularity": "C0", "sinkhorn": "C1", "head_kmeans": "C2"}
    for seed, run in sorted((k, v) for k, v in results.items() if k.startswith("seed")):
        pts = run["points"]
        x = [p["step"] for p in pts]
        for name, colour in styles.items():
            label = f"{name} ({seed})"
            nan = float("nan")  # a readout not measured at a point is a gap
            axes[0].plot(x, [p[name]["miou"] if p[name]["miou"] is not None else nan for p in pts], marker="o",
                         color=colour, label=label)
            axes[1].plot(x, [p[name]["clusters_over_1pct"] if p[name]["miou"] is not None else nan for p in pts],
                         marker="o", color=colour, label=label)
        axes[2].plot(x, [p["cone"]["mean_pair_cos"] for p in pts], marker="o", color="k", label=seed)
    if "kmeans_dev_miou" in results:
        axes[0].axhline(results["kmeans_dev_miou"], color="grey", ls="--", label="k-means (raw features)")
    for ax, title in zip(axes, ("dev mIoU (no CRF)", "clusters holding >= 1 % of dev pixels",
                                "head-output cone: mean pairwise cos")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("Step-2 iterations (preset: 51)", fontsize=8)
        ax.axvline(51, color="grey", lw=0.5)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)


def rescore(args, cfg, dev_cfg, run_dir: Path, out: Path) -> None:
    """Recompute some readouts of some points of a finished curve from its kept teachers."""
    results = json.loads(out.read_text())
    points = {p["step"]: p for p in results[f"seed{args.seed}"]["points"]}
    backbone = build_backbone_from_config(cfg, torch.device("cpu"))
    book = Clusterbook.load(run_dir / "artifacts" / "clusterbook.pt")
    res = cfg.step2.resolution // 16
    readouts = tuple(args.readouts.split(","))
    for step in (int(x) for x in args.rescore.split(",")):
        teacher = teacher_at(cfg, run_dir, backbone.embed_dim, res * res, step)
        new = point(cfg, dev_cfg, run_dir, backbone, book, teacher, step, args.seed, readouts)
        points[step].update({k: v for k, v in new.items() if k in readouts})
        points[step].setdefault("rescored", []).extend(readouts)
        print(json.dumps({"step": step, **{k: new[k]["miou"] for k in readouts}}), flush=True)
    atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())
    plot(results, out.with_suffix(".png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=250)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "runs" / "step2-curve"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step2-curve.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG beside --out from its JSON and exit")
    ap.add_argument("--rescore", default="", metavar="STEPS",
                    help="recompute --readouts at these Step-2 iteration counts of an existing run (its kept "
                         "teachers) and update the JSON, e.g. --rescore 250 --readouts modularity")
    ap.add_argument("--readouts", default="modularity,sinkhorn,head_kmeans")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    root = data_root()
    if root is None:
        sys.exit("shared data not found: set CAUSESEG_DATA_ROOT")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    build_dev_split(root / "camvid" / "train", work / "data")
    data = work / "data"
    steps_per_epoch = 281 // 16
    epochs = -(-args.iterations // steps_per_epoch)
    _OVERRIDES[:] = ["data.dataset=images", f"data.root={data / 'fit'}", f"run.seed={args.seed}",
                     "run.progress=false", f"step2.epochs={epochs}"]
    cfg = load_config("camvid_effnet_tr", _OVERRIDES)
    dev_cfg = load_config("camvid_effnet_tr", ["data.dataset=camvid", f"data.root={data}", "data.val_split=dev",
                                               "run.progress=false"])
    run_dir = work / "runs" / f"seed{args.seed}"
    if args.rescore:
        rescore(args, cfg, dev_cfg, run_dir, Path(args.out))
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    seed_everything(args.seed)
    backbone = build_backbone_from_config(cfg, torch.device("cpu"))
    res = cfg.step2.resolution // 16
    out = Path(args.out)
    t_start = time.perf_counter()
    points: list[dict] = []
    step = 0
    book = None
    while step < args.iterations:
        target = min(step + args.every, args.iterations)
        try:  # resumes Step 2 from its checkpoint and stops after target - step more iterations
            train_all(cfg, run_dir, stop_after={"step2": target - step})
        except TrainingInterrupted:
            pass
        if book is None:  # Step 1 is done now; score the untrained head first
            book = Clusterbook.load(run_dir / "artifacts" / "clusterbook.pt")
            points.append(point(cfg, dev_cfg, run_dir, backbone, book,
                                teacher_at(cfg, run_dir, backbone.embed_dim, res * res, 0), 0, args.seed))
        step = target
        points.append(point(cfg, dev_cfg, run_dir, backbone, book,
                            teacher_at(cfg, run_dir, backbone.embed_dim, res * res, step), step, args.seed))
        print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items()
                                                                   if kk != "per_class_iou"})
                          for k, v in points[-1].items()}), flush=True)
        results = json.loads(out.read_text()) if out.exists() else {}
        results["protocol"] = ("CAUSE-TR preset head trained on the fit part of camvid/train (images only); the EMA "
                               "teacher at each Step-2 iteration count scored on the dev part, no CRF, flip TTA; "
                               f"{steps_per_epoch} iterations per epoch (the preset runs 3 epochs = "
                               f"{3 * steps_per_epoch}); camvid/val not read")
        results[f"seed{args.seed}"] = {"points": points, "seconds": time.perf_counter() - t_start}
        dev = json.loads((ROOT / "benchmarks" / "results" / "quality-dev.json").read_text())["settings"]
        results["kmeans_dev_miou"] = dev["kmeans"]["miou"]  # the baseline on the same dev split (seed 0)
        atomic_write_bytes(out, (json.dumps(results, indent=2) + "\n").encode())
        plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
