"""Strict loading of the official backbone checkpoint formats.

The official CAUSE code loads every backbone with ``strict=False`` and only prints the result (defect D2), which is how
its ViT-S head-count bug went unnoticed. Here every load is strict: each family and container has an explicit
allow-list of keys that may be present in the file and are dropped (projection heads, MSN's ``fc``, iBOT's
``masked_embed``, ...); any other missing, unexpected or mis-shaped key raises :class:`CheckpointError`, whose message
names the file and lists the keys.

Containers (``dependencies.md`` §3.2), detected from the top-level keys:

* ``raw``: DINO and DINOv2 release files; used as is.
* ``teacher``: DINO (and iBOT) full training checkpoints; ``ck["teacher"]``, strip ``module.``/``backbone.``,
  drop ``head.*``. These files also store an ``argparse.Namespace``: reading them needs ``trust_pickle=True``.
* ``state_dict``: iBOT ``checkpoint_teacher.pth``; strip a ``module.``/``backbone.`` wrapper prefix if present,
  drop ``head.*`` and ``masked_embed``.
* ``target_encoder``: MSN ``*.pth.tar``; strip ``module.`` only when every key carries it (the official code slices
  7 characters blindly), drop the projection head ``fc.*``.
* ``model``: MAE ``mae_pretrain_vit_*.pth``; (``mask_token``/``decoder_*`` of full MAE files are dropped).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CONTAINERS",
    "FAMILIES",
    "IGNORED_KEYS",
    "CONTAINERS_BY_FAMILY",
    "load_checkpoint_file",
    "detect_container",
    "extract_backbone_state_dict",
    "load_state_dict_strict",
]

log = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("dino", "dinov2", "ibot", "msn", "mae", "efficientnet")
CONTAINERS: tuple[str, ...] = ("raw", "teacher", "state_dict", "target_encoder", "model")

#: containers each family's official releases use ("raw" is always accepted: a bare backbone state dict).
CONTAINERS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "dino": ("raw", "teacher"),
    "dinov2": ("raw",),
    "ibot": ("raw", "state_dict", "teacher"),
    "msn": ("raw", "target_encoder"),
    "mae": ("raw", "model"),
    "efficientnet": ("raw",),
}

#: keys (fnmatch patterns, after prefix stripping) that may be present and are dropped, per (family, container).
IGNORED_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("dino", "raw"): (),
    ("dino", "teacher"): ("head.*",),
    ("dinov2", "raw"): (),
    ("ibot", "raw"): ("head.*", "masked_embed"),
    ("ibot", "state_dict"): ("head.*", "masked_embed"),
    ("ibot", "teacher"): ("head.*", "masked_embed"),
    ("msn", "raw"): ("fc.*",),
    ("msn", "target_encoder"): ("fc.*",),
    ("mae", "raw"): ("mask_token", "decoder_*"),
    ("mae", "model"): ("mask_token", "decoder_*"),
    ("efficientnet", "raw"): (),
}

# which family's release a container belongs to (for error messages)
_CONTAINER_OWNER = {"teacher": "DINO full training checkpoint", "state_dict": "iBOT", "target_encoder": "MSN",
                    "model": "MAE"}


class CheckpointError(Exception):
    """A checkpoint file cannot be read or does not match the model; the message names the file and the keys."""


def _fmt_keys(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f", ... ({len(keys) - limit} more)"
    return shown


def holds_python_objects(exc: BaseException) -> bool:
    """Whether a ``weights_only`` load failed on a real Python object (a pickled class or function), as opposed
    to bytes that are no pickle at all."""
    text = str(exc)
    return "Unsupported global" in text or "GLOBAL" in text or "Unsupported class" in text


def load_checkpoint_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Read a checkpoint file on the CPU with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        trust_pickle: allow full unpickling (``weights_only=False``), needed by files that store Python objects, e.g.
            the DINO *full* training checkpoint (``argparse.Namespace``). Unpickling runs arbitrary code: use it only
            for files from a source you trust.

    Raises:
        CheckpointError: the file is missing, unreadable, or holds objects that ``weights_only`` refuses.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint file {p} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint path {p} is not a file")
    try:
        return torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise CheckpointError(f"cannot unpickle checkpoint file {p}: {exc}") from exc
        if not holds_python_objects(exc):  # garbage, not a file that needs more than weights_only
            raise CheckpointError(f"cannot read checkpoint file {p}: not a torch checkpoint (corrupt, truncated or "
                                  f"another format)") from exc
        raise CheckpointError(
            f"checkpoint file {p} holds Python objects that torch.load(weights_only=True) refuses to unpickle "
            f"(e.g. the argparse.Namespace stored in DINO full training checkpoints). If, and only if, you trust this "
            f"file, load it with trust_pickle=True (unpickling can run arbitrary code). Details: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    except Exception as exc:  # zip/pickle/format errors of all kinds: truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint file {p} (truncated or not a torch checkpoint?): {exc}") from exc


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def detect_container(obj: Any) -> str:
    """Which official container ``obj`` is: one of :data:`CONTAINERS`, or raise ``ValueError``."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    for key in ("teacher", "target_encoder", "state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            return key
    if _is_tensor_dict(obj):
        return "raw"
    sample = _fmt_keys([str(k) for k in obj.keys()], 12)
    raise ValueError(
        f"unrecognised checkpoint container: top-level keys [{sample}]; expected a state dict of tensors or one of "
        f"the keys 'teacher' (DINO full), 'state_dict' (iBOT), 'target_encoder' (MSN), 'model' (MAE)"
    )


def _strip_prefix(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Strip ``prefix`` from the keys that carry it, only if every non-ignorable key does (never blind slicing)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def extract_backbone_state_dict(obj: Any, family: str, source: str | os.PathLike = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Unwrap an official checkpoint object into the backbone state dict with official ViT key names.

    Args:
        obj: what :func:`load_checkpoint_file` returned.
        family: ``dino``, ``dinov2``, ``ibot``, ``msn``, ``mae`` or ``efficientnet``; chooses the accepted containers
            and the allow-list of dropped keys (:data:`IGNORED_KEYS`).
        source: file name used in error messages.

    Returns:
        dict of tensors (allow-listed keys removed; other keys untouched, so a strict load reports them).

    Raises:
        CheckpointError: unknown container, a container of another family, or non-tensor entries.
    """
    if family not in CONTAINERS_BY_FAMILY:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {tuple(CONTAINERS_BY_FAMILY)}")
    try:
        container = detect_container(obj)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    if container not in CONTAINERS_BY_FAMILY[family]:
        raise CheckpointError(
            f"{source}: this file has the layout of a {_CONTAINER_OWNER.get(container, container)} checkpoint "
            f"(container {container!r}), but the backbone family is {family!r}, whose files use "
            f"{CONTAINERS_BY_FAMILY[family]}; choose the matching backbone name"
        )
    sd: Any = obj if container == "raw" else obj[container]
    bad = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries of the {container!r} state dict are not tensors: {_fmt_keys(bad)}")
    sd = {str(k): v for k, v in sd.items()}
    if container in ("teacher", "state_dict", "target_encoder"):
        sd = _strip_prefix(sd, "module.")
    if container in ("teacher", "state_dict"):
        # DINO/iBOT full checkpoints wrap the ViT as MultiCropWrapper(backbone, head)
        if any(k.startswith("backbone.") for k in sd):
            backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
            rest = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
            sd = {k[len("backbone."):]: v for k, v in backbone.items()}
            sd.update(rest)  # head.* is dropped below; anything else surfaces as unexpected
    patterns = IGNORED_KEYS[(family, container)]
    dropped = [k for k in sd if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if dropped:
        log.info("%s: dropping %d allow-listed keys (%s)", source, len(dropped), ", ".join(patterns))
    dropped_set = set(dropped)
    return {k: v for k, v in sd.items() if k not in dropped_set}


def load_state_dict_strict(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "<state dict>",
    ignore: Iterable[str] = (),
) -> None:
    """Load ``sd`` into ``module`` strictly; on any mismatch raise :class:`CheckpointError` naming ``source``.

    Args:
        module: target module.
        sd: state dict (official key names).
        source: file name (or description) for the error message.
        ignore: fnmatch patterns of keys in ``sd`` that may be present and are dropped (explicit allow-list).

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches.
    """
    patterns = tuple(ignore)
    sd = {k: v for k, v in sd.items() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    not_tensor = [k for k in sd if not isinstance(sd[k], torch.Tensor)]
    if missing or unexpected or shapes or not_tensor:
        parts = [f"checkpoint {source} does not match {type(module).__name__}:"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
        if shapes:
            parts.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes[:40]))
        if not_tensor:
            parts.append(f"  non-tensor entries ({len(not_tensor)}): {_fmt_keys(not_tensor)}")
        raise CheckpointError("\n".join(parts))
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # pragma: no cover - pre-checked above
        raise CheckpointError(f"checkpoint {source}: {exc}") from exc
