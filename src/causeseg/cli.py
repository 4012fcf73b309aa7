"""``causeseg <command>``: train, evaluate, predict, run, demo, and helpers.

Every command that produces results writes them into a run directory: the resolved config,
a log, artifacts and checkpoints, ``metrics.json`` and figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("causeseg")


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _print(obj) -> None:
    """The command's result line (JSON), printed by rank 0 only."""
    if _is_main():
        print(json.dumps(obj))


def _setup_logging(run_dir: Path | None, verbose: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and _is_main():  # only rank 0 writes the log file
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="preset name (see `causeseg presets`) or a YAML file")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config value, e.g. --set step2.phi_pos=0.2 (repeatable)")
    p.add_argument("--backbone", default=None, help="backbone name (see `causeseg backbones`)")
    p.add_argument("--backbone-weights", default=None, metavar="PATH", help="official backbone checkpoint file")
    p.add_argument("--download", action="store_true", help="download the official backbone weights (needs a network)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="dataset root (overrides data.root)")
    p.add_argument("--dataset", default=None, help="dataset kind (overrides data.dataset)")
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides run.seed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto (overrides run.device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from_args(args):
    from .config import load_config

    ov = list(args.overrides)
    if args.backbone:
        ov.append(f"backbone.name={args.backbone}")
    if args.backbone_weights:
        ov.append(f"backbone.weights={args.backbone_weights}")
    if args.download:
        ov.append("backbone.download=true")
    if args.data_root:
        ov.append(f"data.root={args.data_root}")
    if args.dataset:
        ov.append(f"data.dataset={args.dataset}")
    if args.seed is not None:
        ov.append(f"run.seed={args.seed}")
    if args.device:
        ov.append(f"run.device={args.device}")
    if args.no_progress:
        ov.append("run.progress=false")
    return load_config(args.config, ov)


def _class_names(cfg) -> list[str] | None:
    """Class names of the configured label map (cosmetic: figures only)."""
    from .data.labelmaps import get_label_map

    try:
        return list(get_label_map(cfg.data.label_spec or cfg.data.dataset).names)
    except (KeyError, ValueError, TypeError):  # 'images' or an unnamed custom spec
        return None


# ------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .train import train_all

    cfg = _config_from_args(args)
    run_dir = Path(args.run_dir)
    _setup_logging(run_dir, args.verbose)
    path = train_all(cfg, run_dir, force=args.force)
    _print({"model": str(path)})
    return 0


def _evaluate_model(cfg, model_path: Path, out_dir: Path, *, split: str | None, crf: bool | None,
                    flip: bool | None, linear_probe: bool) -> dict:
    import torch

    from . import distributed as D
    from .crf import CRFParams  # noqa: F401  (fails early if the CRF is missing)
    from .evaluate import evaluate
    from .model import CauseModel
    from .predict import Predictor
    from .train import build_split
    from .utils import atomic_write_json, resolve_device

    ctx = D.init_distributed(cfg.run.device)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    model = CauseModel.load(model_path, backbone_weights=cfg.backbone.weights, device=device)
    e = cfg.eval
    ds = build_split(cfg, split or cfg.data.val_split, e.resolution, with_labels=True)
    predictor = Predictor(model, device=device, amp=cfg.run.amp, flip=e.flip if flip is None else flip,
                          alpha=e.alpha)
    res = evaluate(predictor, ds, num_classes=cfg.data.num_classes, batch_size=e.batch_size,
                   crf=e.crf if crf is None else crf, crf_workers=e.crf_workers, crf_timeout=e.crf_timeout,
                   out_dir=out_dir, class_names=_class_names(cfg), figures=e.figures, progress=cfg.run.progress)
    if linear_probe:
        from .data.datasets import collate
        from .probe import evaluate_probe, train_linear_probe

        train_ds = build_split(cfg, cfg.data.train_split, e.resolution, with_labels=True)

        def batches(dataset):
            loader = torch.utils.data.DataLoader(dataset, batch_size=e.batch_size, collate_fn=collate)
            for b in loader:
                yield model.embed(b["image"].to(device)).detach(), b["label"].to(device)

        probe = train_linear_probe(lambda: batches(train_ds), in_dim=int(model.centroids.shape[1]),
                                   num_classes=cfg.data.num_classes, epochs=e.probe_epochs, seed=cfg.run.seed)
        res["linear_probe"] = evaluate_probe(probe, batches(ds), num_classes=cfg.data.num_classes)
        res["linear_probe"]["note"] = "supervised linear probe (paper Table 2); a separate evaluation"
        from .metrics import to_json

        if D.current().is_main:
            atomic_write_json(to_json(res), out_dir / "metrics.json")
    return res


def _summary_line(res: dict) -> dict:
    out = {"num_images": res.get("num_images")}
    for key in ("no_crf", "crf"):
        if key in res:
            out[key] = {"miou": res[key].get("miou"), "pacc": res[key].get("pacc")}
    if "linear_probe" in res:
        out["linear_probe"] = {"miou": res["linear_probe"].get("miou"), "pacc": res["linear_probe"].get("pacc")}
    return out


def cmd_evaluate(args) -> int:
    from .config import config_from_dict

    model_path = Path(args.model)
    if args.config is None and not args.overrides:
        import torch

        stored = torch.load(model_path, map_location="cpu", weights_only=False).get("config")
        if stored is None:
            raise SystemExit(f"{model_path}: has no stored config; pass --config")
        cfg = config_from_dict(stored)
        extra = _config_from_args(argparse.Namespace(**{**vars(args), "config": None}))
        # command-line flags still win over the stored config
        for field in ("root", "dataset"):
            if getattr(args, "data_root" if field == "root" else "dataset"):
                setattr(cfg.data, field, getattr(extra.data, field))
        if args.backbone_weights:
            cfg.backbone.weights = args.backbone_weights
        if args.no_progress:
            cfg.run.progress = False
    else:
        cfg = _config_from_args(args)
    out_dir = Path(args.out or model_path.parent / "eval")
    _setup_logging(out_dir, args.verbose)
    res = _evaluate_model(cfg, model_path, out_dir, split=args.split, crf=False if args.no_crf else None,
                          flip=False if args.no_flip else None, linear_probe=args.linear_probe)
    _print(_summary_line(res))
    return 0


def cmd_run(args) -> int:
    from .train import train_all

    cfg = _config_from_args(args)
    run_dir = Path(args.run_dir)
    _setup_logging(run_dir, args.verbose)
    model_path = train_all(cfg, run_dir, force=args.force)
    if cfg.data.dataset == "images":
        _print({"model": str(model_path), "note": "no labels: nothing to evaluate"})
        return 0
    res = _evaluate_model(cfg, model_path, run_dir, split=None, crf=None, flip=None,
                          linear_probe=args.linear_probe)
    _print(_summary_line(res))
    return 0


def _collect_inputs(inputs: list[str]) -> list[Path]:
    from .data.io import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise SystemExit(f"{p}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"{p}: no such file or folder")
    return files


def cmd_predict(args) -> int:
    from .crf import CRFRunner
    from .model import CauseModel
    from .predict import Predictor, predict_folder
    from .utils import atomic_write_json, resolve_device

    out = Path(args.out)
    _setup_logging(out, args.verbose)
    device = resolve_device(args.device or "auto")
    model = CauseModel.load(args.model, backbone_weights=args.backbone_weights, device=device)
    res = args.resolution or model.meta.get("eval_resolution", 320)
    files = _collect_inputs(args.inputs)
    runner = CRFRunner(workers=0) if not args.no_crf else None
    predictor = Predictor(model, device=device, flip=not args.no_flip, alpha=args.alpha, crf_runner=runner)
    report = predict_folder(predictor, files, out, resolution=res, crf=not args.no_crf,
                            progress=not args.no_progress, on_error="skip" if args.skip_bad else "raise")
    atomic_write_json(report, out / "predictions.json")
    _print({"written": len(report["written"]), "skipped": len(report["skipped"]), "out": str(out)})
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    out = Path(args.out)
    _setup_logging(out, args.verbose)
    summary = run_demo(out, images=args.images, steps=args.steps, seed=args.seed or 0,
                       progress=not args.no_progress)
    _print(summary)
    return 0


def cmd_presets(args) -> int:
    from .config import list_presets

    for p in list_presets():
        print(p)
    return 0


def cmd_backbones(args) -> int:
    from .backbones import list_backbones

    for b in list_backbones():
        print(b)
    return 0


def cmd_import_official(args) -> int:
    from .official import import_official

    path = import_official(segment=args.segment, cluster=args.cluster, modular=args.modular, backbone=args.backbone,
                           backbone_weights=args.backbone_weights, num_classes=args.num_classes, out=args.out,
                           train_resolution=args.train_resolution)
    _print({"model": str(path)})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="causeseg",
        description="CAUSE unsupervised semantic segmentation: train without labels, evaluate, segment your images.",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="Steps 1-3 (clusterbook, head, centroids) without labels")
    _add_config_args(t)
    t.add_argument("--run-dir", "-o", required=True, help="run directory (resumes if it holds checkpoints)")
    t.add_argument("--force", action="store_true", help="retrain every step even if its artifact exists")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="train, then evaluate on the validation split when it has labels")
    _add_config_args(r)
    r.add_argument("--run-dir", "-o", required=True, help="run directory")
    r.add_argument("--force", action="store_true", help="retrain every step even if its artifact exists")
    r.add_argument("--linear-probe", action="store_true", help="also train and score a supervised linear probe")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("evaluate", help="mIoU / pAcc with and without CRF (Hungarian over the whole split)")
    _add_config_args(e)
    e.add_argument("--model", "-m", required=True, help="model.pt written by train/run or import-official")
    e.add_argument("--split", default=None, help="split to evaluate (default data.val_split)")
    e.add_argument("--out", default=None, help="output folder (default <model dir>/eval)")
    e.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    e.add_argument("--no-flip", action="store_true", help="no horizontal-flip TTA")
    e.add_argument("--linear-probe", action="store_true", help="also train and score a supervised linear probe")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="segment your own images (any size/format)")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--model", "-m", required=True, help="model.pt")
    pr.add_argument("--out", "-o", required=True, help="output folder (labels/, overlays/, predictions.json)")
    pr.add_argument("--backbone-weights", default=None, help="backbone checkpoint, if not the one stored")
    pr.add_argument("--resolution", type=int, default=None, help="shorter side fed to the model (default: eval res)")
    pr.add_argument("--alpha", type=float, default=3.0, help="CRF unary softmax scale")
    pr.add_argument("--no-crf", action="store_true")
    pr.add_argument("--no-flip", action="store_true")
    pr.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    pr.add_argument("--device", default=None)
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="offline demo: train on bundled photos and segment them")
    d.add_argument("--out", "-o", default="runs/demo", help="output folder")
    d.add_argument("--images", default=None, help="a folder of your images instead of the bundled photos")
    d.add_argument("--steps", type=int, default=None, help="training epochs scale (default: quick)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    ps = sub.add_parser("presets", help="list the YAML presets")
    ps.set_defaults(func=cmd_presets)
    bb = sub.add_parser("backbones", help="list the backbones")
    bb.set_defaults(func=cmd_backbones)

    io = sub.add_parser("import-official", help="convert the official CAUSE release files into a causeseg model.pt")
    io.add_argument("--segment", required=True, help="segment_tr.pth or segment_mlp.pth")
    io.add_argument("--cluster", required=True, help="cluster_tr.pth or cluster_mlp.pth")
    io.add_argument("--modular", required=True, help="modular.npy (the concept clusterbook)")
    io.add_argument("--backbone", required=True, help="backbone name, e.g. dino_vitb8")
    io.add_argument("--backbone-weights", default=None, help="the backbone checkpoint file")
    io.add_argument("--num-classes", type=int, default=27)
    io.add_argument("--train-resolution", type=int, default=None,
                    help="TR: inferred from the checkpoint; MLP: recorded (official 224)")
    io.add_argument("--out", required=True, help="output model.pt")
    io.set_defaults(func=cmd_import_official)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "verbose"):
        args.verbose = False
    from .config import ConfigError

    known: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)
    try:
        from .data.io import DataError

        known += (DataError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from .backbones.checkpoint import CheckpointError

        known += (CheckpointError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: checkpoints are on disk; run the same command again to resume", file=sys.stderr)
        return 130
    except known as exc:
        print(f"causeseg {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
