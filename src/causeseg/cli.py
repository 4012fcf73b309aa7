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
    """Log to stderr and, when a folder is given, to ``<folder>/log.txt`` (appended: a rerun keeps the history)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and _is_main():  # only rank 0 writes the log file
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "log.txt"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _add_common_args(p: argparse.ArgumentParser, out_help: str, out_required: bool = True,
                     out_default: str | None = None) -> None:
    """``-o/--out`` and ``-v/--verbose``, the same in every subcommand."""
    p.add_argument("--out", "-o", dest="out", required=out_required, default=out_default, metavar="DIR",
                   help=out_help)
    p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")


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
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="largest image (pixels) to decode; default 89,478,485 (PIL's guard) or CAUSESEG_MAX_PIXELS; 0 = no limit")


def _add_predictor_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictor", choices=("auto", "selftrain", "centroids"), default="auto",
                   help="what predicts: the self-trained head of a model trained with selftrain.enabled=true "
                        "(selftrain), the Step-3 centroids (centroids), or the former when the model has one (auto)")


def _alpha(model, centroid_alpha: float) -> float:
    """The CRF unary scale for ``model``'s scores: the self-trained head's scores are logits (1); the centroid
    cosines take ``centroid_alpha`` (eval.alpha, 3 for CAUSE)."""
    return 1.0 if model.predictor_name == "selftrain" else centroid_alpha


def _overrides_from_args(args) -> list[str]:
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
    return ov


def _config_from_args(args, base: dict | None = None, base_source: str = "<stored config>"):
    from .config import load_config

    return load_config(args.config if base is None else None, _overrides_from_args(args), base=base,
                       base_source=base_source)


def _apply_max_pixels(args) -> None:
    n = getattr(args, "max_pixels", None)
    if n is None:
        return
    if n < 0:
        raise ValueError(f"--max-pixels={n} must be >= 0 (0 = no limit)")
    from .data.io import set_max_image_pixels

    set_max_image_pixels(n or None)


def _class_names(cfg) -> list[str] | None:
    """Class names of the configured label map (cosmetic: figures only)."""
    from .data.labelmaps import get_label_map

    try:
        return list(get_label_map(cfg.data.label_spec or cfg.data.dataset).names)
    except (KeyError, ValueError, TypeError):  # 'images' or an unnamed custom spec
        return None


# ------------------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .train import check_output_dir, train_all

    cfg = _config_from_args(args)
    _apply_max_pixels(args)
    run_dir = Path(args.out)
    check_output_dir(run_dir)
    _setup_logging(run_dir, args.verbose)
    log.info("causeseg %s: %s", args.command, " ".join(sys.argv[1:]))
    path = train_all(cfg, run_dir, force=args.force)
    _print({"model": str(path)})
    return 0


def _check_evaluable(cfg, model, model_path: Path, split: str) -> None:
    """Refuse evaluations that would score something other than what the user meant."""
    if cfg.data.dataset == "images":
        raise ValueError(f"{model_path}: data.dataset=images has no masks; evaluation needs a labelled split: "
                         f"pass --dataset paired --data-root DIR (with images/ and masks/) and "
                         f"--set data.label_spec=... --set data.num_classes=...")
    k = model.num_classes
    if k != cfg.data.num_classes:
        raise ValueError(f"{model_path}: the model has {k} centroids but the evaluation has "
                         f"data.num_classes={cfg.data.num_classes}; one-to-one Hungarian matching needs the same "
                         f"number (set data.num_classes={k} and a label map with {k} classes)")


def _evaluate_model(cfg, model_path: Path, out_dir: Path, *, split: str | None, crf: bool | None,
                    flip: bool | None, linear_probe: bool, predictor: str = "auto") -> dict:
    import torch

    from . import distributed as D
    from .crf import CRFParams  # noqa: F401  (fails early if the CRF is missing)
    from .evaluate import evaluate
    from .model import load_model
    from .predict import Predictor
    from .train import build_split
    from .utils import atomic_write_json, resolve_device

    ctx = D.init_distributed(cfg.run.device)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    split = split or cfg.data.val_split
    model = load_model(model_path, backbone_weights=cfg.backbone.weights, device=device, predictor=predictor)
    _check_evaluable(cfg, model, model_path, split)
    e = cfg.eval
    from .data.io import DataError

    try:
        ds = build_split(cfg, split, e.resolution, with_labels=True)
    except DataError as exc:
        raise DataError(f"split {split!r} of data.dataset={cfg.data.dataset} cannot be read: {exc}") from None
    log.info("evaluate %s (%s predictor) on %s split %r: %d images, %d classes", model_path,
             model.predictor_name, cfg.data.dataset, split, len(ds), cfg.data.num_classes)
    scorer = Predictor(model, device=device, amp=cfg.run.amp, flip=e.flip if flip is None else flip,
                       alpha=_alpha(model, e.alpha))
    res = evaluate(scorer, ds, num_classes=cfg.data.num_classes, batch_size=e.batch_size,
                   crf=e.crf if crf is None else crf, crf_workers=e.crf_workers, crf_timeout=e.crf_timeout,
                   out_dir=out_dir, class_names=_class_names(cfg), figures=e.figures, progress=cfg.run.progress)
    res["split"] = split
    res["model"] = str(model_path)
    if linear_probe:
        from .data.datasets import collate
        from .probe import evaluate_probe, train_linear_probe

        train_ds = build_split(cfg, cfg.data.train_split, e.resolution, with_labels=True)

        base = getattr(model, "base", model)  # the probe reads the CAUSE head's features, whatever the predictor

        def batches(dataset):
            loader = torch.utils.data.DataLoader(dataset, batch_size=e.batch_size, collate_fn=collate)
            for b in loader:
                yield base.embed(b["image"].to(device)).detach(), b["label"].to(device)

        probe = train_linear_probe(lambda: batches(train_ds), in_dim=int(base.centroids.shape[1]),
                                   num_classes=cfg.data.num_classes, epochs=e.probe_epochs, seed=cfg.run.seed)
        res["linear_probe"] = evaluate_probe(probe, batches(ds), num_classes=cfg.data.num_classes)
        res["linear_probe"]["note"] = "supervised linear probe (paper Table 2); a separate evaluation"
    from .metrics import to_json

    if D.current().is_main:
        atomic_write_json(to_json(res), out_dir / "metrics.json")
    log.info("evaluate: %s", json.dumps(_summary_line(res)))
    return res


def _summary_line(res: dict) -> dict:
    out = {"num_images": res.get("num_images"), "predictor": res.get("predictor")}
    for key in ("no_crf_single_view", "no_crf", "crf"):
        if key in res:
            out[key] = {"miou": res[key].get("miou"), "pacc": res[key].get("pacc")}
    if "linear_probe" in res:
        out["linear_probe"] = {"miou": res["linear_probe"].get("miou"), "pacc": res["linear_probe"].get("pacc")}
    return out


def cmd_evaluate(args) -> int:
    from .config import check_device
    from .model import read_model_file

    model_path = Path(args.model)
    if args.device:
        check_device(args.device)
    if args.config is None:  # the model's own config, with the command line's overrides on top
        stored = read_model_file(model_path).get("config")
        if stored is None:
            raise ValueError(f"{model_path}: has no stored config (an imported model?); pass --config PRESET")
        cfg = _config_from_args(args, base=stored, base_source=f"{model_path} (stored config)")
    else:
        cfg = _config_from_args(args)
    _apply_max_pixels(args)
    out_dir = Path(args.out or model_path.parent / "eval")
    from .train import check_output_dir

    check_output_dir(out_dir, "output folder")
    _setup_logging(out_dir, args.verbose)
    log.info("causeseg %s: %s", args.command, " ".join(sys.argv[1:]))
    res = _evaluate_model(cfg, model_path, out_dir, split=args.split, crf=False if args.no_crf else None,
                          flip=False if args.no_flip else None, linear_probe=args.linear_probe,
                          predictor=args.predictor)
    _print(_summary_line(res))
    return 0


def cmd_run(args) -> int:
    from .train import check_output_dir, train_all

    cfg = _config_from_args(args)
    _apply_max_pixels(args)
    run_dir = Path(args.out)
    check_output_dir(run_dir)
    _setup_logging(run_dir, args.verbose)
    log.info("causeseg %s: %s", args.command, " ".join(sys.argv[1:]))
    model_path = train_all(cfg, run_dir, force=args.force)
    if cfg.data.dataset == "images":
        _print({"model": str(model_path), "note": "no labels: nothing to evaluate"})
        return 0
    res = _evaluate_model(cfg, model_path, run_dir, split=None, crf=None, flip=None,
                          linear_probe=args.linear_probe, predictor=args.predictor)
    _print(_summary_line(res))
    return 0


def cmd_predict(args) -> int:
    from .crf import CRFRunner
    from .model import load_model
    from .predict import REPORT_NAME, Predictor, collect_inputs, merge_report, predict_folder, read_report
    from .train import check_output_dir
    from .utils import atomic_write_json, resolve_device

    from .config import check_device

    out = Path(args.out)
    if args.device:
        check_device(args.device)
    if args.resolution is not None and args.resolution <= 0:
        raise ValueError(f"--resolution={args.resolution} must be a positive number of pixels")
    if args.alpha is not None and args.alpha <= 0:
        raise ValueError(f"--alpha={args.alpha} must be > 0")
    _apply_max_pixels(args)
    check_output_dir(out, "output folder")
    collect_inputs(args.inputs, exclude=out)  # a missing input or an empty folder fails before the model loads
    read_report(out)  # a foreign predictions.json is refused before any work
    _setup_logging(out, args.verbose)
    log.info("causeseg %s: %s", args.command, " ".join(sys.argv[1:]))
    device = resolve_device(args.device or "auto")
    model = load_model(args.model, backbone_weights=args.backbone_weights, device=device, predictor=args.predictor)
    res = args.resolution or getattr(model, "base", model).meta.get("eval_resolution", 320)  # the model.pt's
    stride = int(getattr(model.backbone, "patch_size", 1) or 1)
    if res < stride:
        raise ValueError(f"--resolution={res} is smaller than one backbone patch ({stride} px)")
    runner = CRFRunner(workers=0) if not args.no_crf else None
    alpha = args.alpha if args.alpha is not None else _alpha(model, 3.0)
    predictor = Predictor(model, device=device, flip=not args.no_flip, alpha=alpha, crf_runner=runner)
    report = predict_folder(predictor, args.inputs, out, resolution=res, crf=not args.no_crf,
                            progress=not args.no_progress, on_error="skip" if args.skip_bad else "raise")
    atomic_write_json(merge_report(out, report), out / REPORT_NAME)
    log.info("predict: wrote %d, skipped %d -> %s", len(report["written"]), len(report["skipped"]), out)
    _print({"written": len(report["written"]), "skipped": len(report["skipped"]), "out": str(out)})
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    from .train import check_output_dir

    out = Path(args.out)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps={args.steps} must be >= 1")
    if args.images is not None and not Path(args.images).is_dir():
        raise ValueError(f"{args.images}: not a folder of images")
    check_output_dir(out, "output folder")
    _setup_logging(out, args.verbose)
    log.info("causeseg %s: %s", args.command, " ".join(sys.argv[1:]))
    summary = run_demo(out, images=args.images, steps=args.steps, seed=args.seed,
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
    from .train import check_output_dir

    check_output_dir(Path(args.out).parent, "output folder")
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
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="Steps 1-3 (clusterbook, head, centroids) without labels",
                       description="Train Steps 1-3 without labels into a run directory (resumes automatically; "
                                   "artifacts built under other settings are rebuilt).")
    _add_config_args(t)
    _add_common_args(t, "run directory (config.yaml, log.txt, checkpoints/, artifacts/, model.pt)")
    t.add_argument("--run-dir", dest="out", help=argparse.SUPPRESS)  # older spelling of --out
    t.add_argument("--force", action="store_true", help="retrain every step even if its artifact exists")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="train, then evaluate on the validation split when it has labels",
                       description="Train Steps 1-3 without labels, then evaluate on data.val_split.")
    _add_config_args(r)
    _add_common_args(r, "run directory")
    r.add_argument("--run-dir", dest="out", help=argparse.SUPPRESS)
    r.add_argument("--force", action="store_true", help="retrain every step even if its artifact exists")
    r.add_argument("--linear-probe", action="store_true", help="also train and score a supervised linear probe")
    _add_predictor_arg(r)
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("evaluate", help="mIoU / pAcc with and without CRF (Hungarian over the whole split)",
                       description="Evaluate a model. Without --config the model's stored config is used and "
                                   "--set/--data-root/--device apply on top of it.")
    _add_config_args(e)
    _add_common_args(e, "output folder (default <model dir>/eval)", out_required=False)
    e.add_argument("--model", "-m", required=True, help="model.pt written by train/run or import-official")
    e.add_argument("--split", default=None, help="split to evaluate (default data.val_split)")
    e.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    e.add_argument("--no-flip", action="store_true", help="no horizontal-flip TTA")
    e.add_argument("--linear-probe", action="store_true", help="also train and score a supervised linear probe")
    _add_predictor_arg(e)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="segment your own images (any size/format)",
                        description="Segment images with a trained model: labels/ (palette PNGs at each image's "
                                    "size, mirroring the input tree), overlays/ and predictions.json.")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    pr.add_argument("--model", "-m", required=True, help="model.pt")
    _add_common_args(pr, "output folder (labels/, overlays/, predictions.json)")
    pr.add_argument("--backbone-weights", default=None, help="backbone checkpoint, if not the one stored")
    pr.add_argument("--resolution", type=int, default=None, help="shorter side fed to the model (default: eval res)")
    pr.add_argument("--alpha", type=float, default=None,
                    help="CRF unary softmax scale (default 3 for the centroids, 1 for the self-trained head's logits)")
    _add_predictor_arg(pr)
    pr.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    pr.add_argument("--no-flip", action="store_true", help="no horizontal-flip TTA")
    pr.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of stopping")
    pr.add_argument("--max-pixels", type=int, default=None, metavar="N",
                    help="largest image (pixels) to decode; default 89,478,485 (PIL's guard) or CAUSESEG_MAX_PIXELS; 0 = no limit")
    pr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")
    pr.add_argument("--no-progress", action="store_true", help="no progress bars")
    pr.set_defaults(func=cmd_predict)

    d = sub.add_parser("demo", help="offline demo: train on bundled photos and segment them")
    _add_common_args(d, "output folder", out_required=False, out_default="runs/demo")
    d.add_argument("--images", default=None, help="a folder of your images instead of the bundled photos")
    d.add_argument("--steps", type=int, default=None, help="training epochs of Steps 2 and 3 (default: quick)")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    ps = sub.add_parser("presets", help="list the YAML presets")
    ps.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    ps.set_defaults(func=cmd_presets)
    bb = sub.add_parser("backbones", help="list the backbones")
    bb.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    bb.set_defaults(func=cmd_backbones)

    io = sub.add_parser("import-official", help="convert the official CAUSE release files into a causeseg model.pt")
    io.add_argument("--segment", required=True, help="segment_tr.pth or segment_mlp.pth")
    io.add_argument("--cluster", required=True, help="cluster_tr.pth or cluster_mlp.pth")
    io.add_argument("--modular", required=True, help="modular.npy (the concept clusterbook)")
    io.add_argument("--backbone", required=True, help="backbone name, e.g. dino_vitb8")
    io.add_argument("--backbone-weights", default=None, help="the backbone checkpoint file")
    io.add_argument("--num-classes", type=int, default=27, help="number of classes C of the release")
    io.add_argument("--train-resolution", type=int, default=None,
                    help="TR: inferred from the checkpoint; MLP: recorded (official 224)")
    _add_common_args(io, "output model.pt file")
    io.set_defaults(func=cmd_import_official)
    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands() -> list:
    """Subcommands defined in their own modules (``add_parser(subparsers)``)."""
    out = []
    try:
        from .prepare import add_parser as prepare_parser

        out.append(prepare_parser)
    except ImportError:
        pass
    return out


_INTERRUPTED = {
    "train": "interrupted: checkpoints are on disk; run the same command again to resume",
    "run": "interrupted: checkpoints are on disk; run the same command again to resume",
    "demo": "interrupted: run the same command again to resume training",
}


def _known_errors() -> tuple[type[BaseException], ...]:
    """User mistakes: printed as one line, exit code 2, never a traceback."""
    from .backbones.checkpoint import CheckpointError
    from .config import ConfigError
    from .data.io import DataError
    from .loop import ResumeError

    known: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError, DataError, CheckpointError,
                                              PermissionError, IsADirectoryError, NotADirectoryError, ResumeError)
    try:
        from .backbones import WeightsRequiredError

        known += (WeightsRequiredError,)
    except ImportError:  # pragma: no cover
        pass
    return known


def _user_message(exc: BaseException) -> str:
    """The one line to show: the error's first line, or, for an error re-raised from a data-loader worker
    ("Caught DataError in DataLoader worker process 0." + the worker's traceback), the worker's own message."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    if lines[0].startswith("Caught ") and "DataLoader worker" in lines[0] and len(lines) > 1:
        last = lines[-1].strip()
        name = type(exc).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return lines[0]


def _log_to_files(msg: str) -> None:
    """Write ``msg`` to the log files only (the terminal gets its own one-line message)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, msg, (), None)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "verbose"):
        args.verbose = False
    known = _known_errors()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        msg = _INTERRUPTED.get(args.command, "interrupted")
        _log_to_files(msg)
        print(msg, file=sys.stderr)
        return 130
    except known as exc:
        msg = _user_message(exc)
        _log_to_files(f"stopped: {msg}")  # the run's log.txt keeps the error that stopped it
        print(f"causeseg {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception:
        log.exception("stopped by an unexpected error (please report it)")
        raise


if __name__ == "__main__":
    sys.exit(main())
