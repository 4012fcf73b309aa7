"""What produced each artifact of a run directory: fingerprints, comparison, invalidation.

Every artifact (clusterbook, head, centroids, self-trained head) and every in-progress checkpoint records the
*fingerprint* of exactly the settings and inputs it depends on: the backbone (name, options and a
digest of its weights), the training images (a digest of the file list), and the settings of its own
step and of every step upstream of it. On a rerun an artifact whose fingerprint differs from the
current one is rebuilt, and so is everything downstream; a checkpoint whose fingerprint differs is
refused (``--force`` restarts), so a run directory never mixes the products of two configurations.

The fingerprint is plain data (nested dicts of str/int/float/bool/None), stored inside the
artifact and, for checkpoints, in a small ``<checkpoint>.json`` sidecar that can be read before
any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

#: The training steps in order; each depends on the ones before it. ``selftrain`` (pseudo-label self-training,
#: beyond the paper) runs only with ``selftrain.enabled``: :func:`step_fingerprints` lists it only then.
STEPS = ("step1", "step2", "step3", "selftrain")


class StaleCheckpointError(ValueError):
    """A checkpoint was written under other settings than the current run's (resume refused)."""


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes of every tensor), hex, 16 chars.

    Identifies the backbone's weights whatever they came from (a file, a package, a download).
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def files_digest(paths: Iterable[Path], root: Path | None = None) -> str:
    """SHA-256 over (path relative to ``root``, size, modification time) of each file, in order.

    The usual make-style identity of a file list: renaming, adding, removing, reordering or
    rewriting a file changes it; moving the whole dataset folder does not.
    """
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        try:
            rel = p.relative_to(root).as_posix() if root is not None else p.as_posix()
        except ValueError:
            rel = p.as_posix()
        st = os.stat(p)
        h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def dataset_digest(dataset) -> str:
    """Digest of the images a training dataset reads (its samples' image files), see :func:`files_digest`."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return "unknown"
    root = Path(getattr(dataset, "source", "") or "/")
    root = root if root.is_dir() else root.parent
    return files_digest([s.image for s in samples], root)


def step_fingerprints(cfg, *, backbone_digest: str, data_digest: str, amp: str) -> dict[str, dict[str, Any]]:
    """The fingerprint of each step's artifact: its own settings plus everything upstream.

    ``amp`` is the resolved autocast dtype name ('off', 'bfloat16', ...), not the setting 'auto'.
    """
    inputs = {
        "backbone": {"name": cfg.backbone.name, "options": cfg.backbone.options, "weights": backbone_digest},
        "data": {"dataset": cfg.data.dataset, "train_split": cfg.data.train_split, "crop": cfg.data.crop,
                 "mode": cfg.data.mode, "on_error": cfg.data.on_error, "files": data_digest,
                 "shuffle_window": cfg.data.shuffle_window},
        "run": {"seed": cfg.run.seed, "amp": amp, "feature_cache": cfg.run.feature_cache,
                "lr_scaling": cfg.run.lr_scaling},
    }
    fp1 = {**inputs, "step1": _plain(cfg.step1)}
    fp2 = {**fp1, "step2": _plain(cfg.step2)}
    fp3 = {**fp2, "step3": _plain(cfg.step3), "num_classes": cfg.data.num_classes}
    out = {"step1": fp1, "step2": fp2, "step3": fp3}
    if cfg.selftrain.enabled:
        out["selftrain"] = selftrain_fingerprint(cfg, fp3)
    return out


def selftrain_fingerprint(cfg, step3: dict[str, Any]) -> dict[str, Any]:
    """Self-training's fingerprint: Step 3's, the ``selftrain`` section and what shapes the pseudo labels (the
    images' size ``eval.resolution``, ``eval.flip``, ``eval.alpha`` and the dense-CRF constants)."""
    import dataclasses

    from .crf import CRFParams

    labels = {"resolution": cfg.eval.resolution, "flip": cfg.eval.flip, "alpha": cfg.eval.alpha,
              "crf_params": dataclasses.asdict(CRFParams()) if cfg.selftrain.crf else None}
    return {**step3, "selftrain": _plain(cfg.selftrain), "pseudo_labels": labels}


def _setting_defaults() -> dict[str, Any]:
    """Flattened defaults of the fingerprinted step sections (``step2.phi_rule`` -> ``'fixed'``, ...)."""
    from . import config as C

    sections = {"step1": C.Step1Config(), "step2": C.Step2Config(), "step3": C.Step3Config(),
                "selftrain": C.SelfTrainSection()}
    return _flatten({name: _plain(obj) for name, obj in sections.items()})


def _plain(obj) -> dict[str, Any]:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(obj), sort_keys=True, default=str))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and key not in ("backbone.options",):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def differences(old: dict | None, new: dict) -> list[str]:
    """Human-readable differences ``key: old -> new`` between two fingerprints (empty when equal).

    An old fingerprint of ``None`` (an artifact written by an older causeseg) is one difference. A step
    setting the old fingerprint lacks (a setting added since it was written) is no difference while its new
    value is the setting's default: the older causeseg behaved as the default does.
    """
    if old is None:
        return ["no fingerprint recorded (written by an older causeseg)"]
    a, b = _flatten(json.loads(json.dumps(old, default=str))), _flatten(json.loads(json.dumps(new, default=str)))
    defaults = _setting_defaults()
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def digest(fingerprint: dict) -> str:
    """Short stable hash of a fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sidecar(checkpoint: Path) -> Path:
    """The JSON file next to a checkpoint that holds its fingerprint."""
    return checkpoint.with_name(checkpoint.name + ".json")


def write_sidecar(checkpoint: Path, fingerprint: dict) -> None:
    from .utils import atomic_write_json

    atomic_write_json({"fingerprint": fingerprint}, sidecar(checkpoint))


def read_sidecar(checkpoint: Path) -> dict | None:
    p = sidecar(checkpoint)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None


def check_checkpoint(checkpoint: Path, fingerprint: dict) -> None:
    """Refuse to resume ``checkpoint`` when it was written under another fingerprint."""
    if not checkpoint.exists():
        return
    diff = differences(read_sidecar(checkpoint), fingerprint)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; ... ({len(diff) - 6} more)" if len(diff) > 6 else "")
        raise StaleCheckpointError(
            f"{checkpoint}: this in-progress checkpoint was written under other settings ({shown}); "
            f"rerun with the original settings to resume, or pass --force to restart the run")
