"""Import of the official CAUSE release artifacts into a causeseg ``model.pt``.

The official CAUSE release (reference §2) publishes per dataset x backbone x {MLP, TR}:

* ``segment_{mlp,tr}.pth`` -- ``torch.save(Segment_{MLP,TR}.state_dict())``: a plain state dict with the
  modules ``head``, ``projection_head``, ``head_ema``, ``projection_head_ema`` and ``linear``
  (reference §6.1; ``dropout`` has no parameters);
* ``cluster_{mlp,tr}.pth`` -- the state dict of the official ``Cluster`` module: ``cluster_probe`` (C x 90, the
  class centroids learned in Step 3, §7.2) and ``codebook`` (k x c, a copy of the clusterbook);
* ``modular.npy`` -- the concept clusterbook M (k x c float32, §5). The TR head's state dict does **not** hold it
  (it is a plain attribute, defect D13), and the official test always reloads it from this file.

Key layout of ``segment_*.pth`` (reconstructed from the module structure of §6.1-6.3; every 1x1 convolution is stored
as ``(out, in, 1, 1)``):

========================================  =================================  ===================================
official key (under ``head_ema.``)        shape                              causeseg head key
========================================  =================================  ===================================
MLP ``f1.weight`` / ``f1.bias``           ``(r, c, 1, 1)`` / ``(r,)``        ``f1.weight`` ``(r, c)`` / ``f1.bias``
MLP ``f2.0.*``, ``f2.2.*``                ``(c, c, 1, 1)``, ``(r, c, 1, 1)`` ``f2.0.*``, ``f2.2.*`` (linears)
TR ``query_pos``                          ``(N_q, c)``                       ``pos``
TR ``tr.self_attn.*``                     ``nn.MultiheadAttention``          ``self_attn.*`` (same names)
TR ``tr.multihead_attn.*``                ``nn.MultiheadAttention``          ``cross_attn.*``
TR ``tr.linear1.*``, ``tr.linear2.*``     FFN ``c -> 2048 -> c``             ``linear1.*``, ``linear2.*``
TR ``tr.norm1..3.*``                      LayerNorm                          ``norm1..3.*``
TR ``tr.f1.*``, ``tr.f2.{0,2}.*``         1x1 convs as for MLP               ``f1.*``, ``f2.{0,2}.*``
========================================  =================================  ===================================

We import the EMA head (``head_ema``), the one the official test clusters. The student ``head``, both projection
heads and the linear probe ``linear`` are on an explicit ignore list (not needed for unsupervised inference); the
supervised linear probe can be read separately with :func:`official_linear_probe`. Anything else in a file, or a
missing ``head_ema`` key, raises :class:`~causeseg.backbones.checkpoint.CheckpointError` naming the file and listing
the keys (the official code loads with ``strict=False``, defect D2).

Caveats recorded in the imported model's ``meta``:

* the official Step 3 fine-tunes ``head_ema`` with a supervised cross-entropy on ground-truth labels
  (reference §7.3, defect D3): imported models are **not label-free**;
* official DINO ViT-S checkpoints were trained on a 12-head ViT-S (defect D1); the import records the backbone option
  ``num_heads=12`` so that the features match the ones the head was trained on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .backbones.checkpoint import CheckpointError, load_checkpoint_file, load_state_dict_strict

__all__ = [
    "OfficialLayout",
    "MLP_LAYOUT",
    "TR_LAYOUT",
    "OFFICIAL_BACKBONE_NAMES",
    "TWELVE_HEAD_VIT_S",
    "LABEL_LEAK_NOTE",
    "resolve_backbone_name",
    "read_state_dict_file",
    "detect_layout",
    "infer_head_config",
    "load_official_head",
    "read_cluster_file",
    "read_modular",
    "official_linear_probe",
    "import_official",
]

log = logging.getLogger(__name__)

LABEL_LEAK_NOTE = ("official CAUSE checkpoints were trained with a Step-3 supervised label loss "
                   "(cause-reference §7.3); not label-free")

#: official checkpoint stems (``checkpoint/{stem}.pth`` of the official code, §2) -> causeseg backbone names.
OFFICIAL_BACKBONE_NAMES: dict[str, str] = {
    "dino_vit_small_8": "dino_vits8",
    "dino_vit_small_16": "dino_vits16",
    "dino_vit_base_8": "dino_vitb8",
    "dino_vit_base_16": "dino_vitb16",
    "dinov2_vit_base_14": "dinov2_vitb14",
    "ibot_vit_base_16": "ibot_vitb16",
    "msn_vit_small_16": "msn_vits16",
    "mae_vit_base_16": "mae_vitb16",
}

#: backbones the official code builds with 12 heads instead of 6 (defect D1).
TWELVE_HEAD_VIT_S: tuple[str, ...] = ("dino_vits8", "dino_vits16")

_IGNORE_SEGMENT: tuple[str, ...] = ("head.*", "projection_head.*", "projection_head_ema.*", "linear.*")
_REDUCTION = ("f1.weight", "f1.bias", "f2.0.weight", "f2.0.bias", "f2.2.weight", "f2.2.bias")
_CONV = ("f1.weight", "f2.0.weight", "f2.2.weight")
_MHA = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def _fmt(keys, limit: int = 40) -> str:
    keys = sorted(keys)
    out = ", ".join(keys[:limit])
    return out + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass(frozen=True)
class OfficialLayout:
    """Key mapping from an official ``segment_{mlp,tr}.pth`` to the state dict of our head.

    Attributes:
        kind: ``"mlp"`` (:class:`~causeseg.heads.MLPHead`) or ``"tr"`` (:class:`~causeseg.heads.TRHead`).
        prefix: module of the official file that is imported (``"head_ema."``, the head the official test clusters).
        keys: official key (without ``prefix``) -> our head's key. Every one is required.
        conv1x1: official keys (without ``prefix``) holding a 1x1 convolution weight ``(out, in, 1, 1)``, stored by
            us as a linear weight ``(out, in)``.
        ignore: fnmatch patterns of official keys that may be present and are dropped (student head, projection
            heads, supervised linear probe).
    """

    kind: str
    keys: Mapping[str, str]
    conv1x1: frozenset[str]
    prefix: str = "head_ema."
    ignore: tuple[str, ...] = field(default=_IGNORE_SEGMENT)

    def official_keys(self) -> list[str]:
        """The full official names of the required keys."""
        return [self.prefix + k for k in self.keys]

    def is_ignored(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.ignore)

    def map_state_dict(self, sd: Mapping[str, Any], source: str | os.PathLike = "<segment>") -> dict[str, torch.Tensor]:
        """Map an official state dict to our head's keys, strictly.

        Every key of ``sd`` must be either a required key (``prefix + k`` for ``k`` in :attr:`keys`) or match
        :attr:`ignore`; every required key must be present; 1x1 convolution weights must be ``(out, in, 1, 1)``.

        Raises:
            CheckpointError: naming ``source`` and listing the missing, unexpected and mis-shaped keys.
        """
        required = set(self.official_keys())
        missing = sorted(required - set(sd))
        unexpected = sorted(k for k in sd if k not in required and not self.is_ignored(k))
        not_tensor = sorted(k for k in required & set(sd) if not isinstance(sd[k], torch.Tensor))
        bad_conv = []
        for k in self.conv1x1:
            v = sd.get(self.prefix + k)
            if isinstance(v, torch.Tensor) and (v.dim() != 4 or tuple(v.shape[2:]) != (1, 1)):
                bad_conv.append(f"{self.prefix + k}: {tuple(v.shape)} (expected a 1x1 convolution (out, in, 1, 1))")
        if missing or unexpected or not_tensor or bad_conv:
            parts = [f"{source}: not an official CAUSE segment_{self.kind}.pth state dict "
                     f"(Segment_{self.kind.upper()}, '{self.prefix}*' imported; ignored: {', '.join(self.ignore)}):"]
            if missing:
                parts.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
            if unexpected:
                parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
            if not_tensor:
                parts.append(f"  non-tensor entries ({len(not_tensor)}): {_fmt(not_tensor)}")
            if bad_conv:
                parts.append(f"  shape errors ({len(bad_conv)}): " + "; ".join(bad_conv))
            raise CheckpointError("\n".join(parts))
        out: dict[str, torch.Tensor] = {}
        for k, ours in self.keys.items():
            v = sd[self.prefix + k].detach().to(torch.float32)
            out[ours] = v.flatten(1) if k in self.conv1x1 else v
        return out


def _mlp_layout() -> OfficialLayout:
    return OfficialLayout(kind="mlp", keys={k: k for k in _REDUCTION}, conv1x1=frozenset(_CONV))


def _tr_layout() -> OfficialLayout:
    keys: dict[str, str] = {"query_pos": "pos"}
    for official, ours in (("self_attn", "self_attn"), ("multihead_attn", "cross_attn")):
        keys.update({f"tr.{official}.{p}": f"{ours}.{p}" for p in _MHA})
    for mod in ("linear1", "linear2", "norm1", "norm2", "norm3"):
        keys.update({f"tr.{mod}.{p}": f"{mod}.{p}" for p in ("weight", "bias")})
    keys.update({f"tr.{k}": k for k in _REDUCTION})
    return OfficialLayout(kind="tr", keys=keys, conv1x1=frozenset(f"tr.{k}" for k in _CONV))


#: layout of the official ``segment_mlp.pth`` (``Segment_MLP``, ``HeadSegment`` heads).
MLP_LAYOUT: OfficialLayout = _mlp_layout()
#: layout of the official ``segment_tr.pth`` (``Segment_TR``, ``Decoder`` heads with ``query_pos`` and ``tr``).
TR_LAYOUT: OfficialLayout = _tr_layout()


# ------------------------------------------------------------------------------------------------ reading files
def read_state_dict_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read an official ``.pth`` state dict (``weights_only``); strip a ``module.`` prefix carried by every key.

    Raises:
        CheckpointError: missing/unreadable file, or not a dict with string keys.
    """
    p = Path(path)
    obj = load_checkpoint_file(p)
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{p}: expected the official {what} (a state dict: a non-empty dict of tensors), "
                              f"got {type(obj).__name__}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # a DDP-wrapped save; the official scripts unwrap before saving
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, Any], source: str | os.PathLike = "<segment>") -> OfficialLayout:
    """MLP or TR layout: the one with the larger share of its required ``head_ema`` keys present in ``sd``.

    (TR files have ``head_ema.query_pos`` and ``head_ema.tr.*``; MLP files ``head_ema.f1.weight``, ``head_ema.f2.*``.)
    """
    scores = {layout.kind: sum(k in sd for k in layout.official_keys()) / len(layout.keys)
              for layout in (MLP_LAYOUT, TR_LAYOUT)}
    if max(scores.values()) > 0:
        return TR_LAYOUT if scores["tr"] > scores["mlp"] else MLP_LAYOUT
    heads = sorted({k.split(".")[0] for k in sd})
    raise CheckpointError(
        f"{source}: not an official CAUSE segment file: no 'head_ema.query_pos'/'head_ema.tr.*' (TR) or "
        f"'head_ema.f1.weight' (MLP) key; top-level modules found: {_fmt(heads, 12)}; expected head, projection_head, "
        f"head_ema, projection_head_ema, linear (give segment_mlp.pth or segment_tr.pth, not cluster_*.pth)")


def infer_head_config(layout: OfficialLayout, head_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Head hyper-parameters implied by the mapped weights (our key names).

    Returns the ``meta["head"]`` dict of a causeseg model: ``kind``, ``in_dim`` (c), ``out_dim`` (r = 90 in the
    release), ``num_queries`` (TR: rows of ``pos``; MLP: None), ``ffn_dim`` (TR: rows of ``linear1.weight``),
    ``dropout`` 0.1, ``extra_residual`` True (official ``T + LN3`` residual), ``num_heads`` 1.
    """
    out_dim, in_dim = (int(s) for s in head_sd["f1.weight"].shape)
    cfg: dict[str, Any] = {"kind": layout.kind, "in_dim": in_dim, "out_dim": out_dim, "num_queries": None,
                           "ffn_dim": 2048, "dropout": 0.1, "extra_residual": True, "num_heads": 1,
                           "source": layout.prefix.rstrip(".")}
    if layout.kind == "tr":
        cfg["num_queries"] = int(head_sd["pos"].shape[0])
        cfg["ffn_dim"] = int(head_sd["linear1.weight"].shape[0])
    return cfg


def load_official_head(segment: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Build our head from an official ``segment_{mlp,tr}.pth`` and load its ``head_ema`` strictly.

    Returns:
        ``(head, head_meta)``: the head in eval mode and its ``meta["head"]`` dict (:func:`infer_head_config`).

    Raises:
        CheckpointError: the file is not an official segment file, keys are missing/unexpected, or shapes do not fit.
    """
    path = Path(segment)
    return _head_from_state_dict(read_state_dict_file(path, "segment_{mlp,tr}.pth"), path)


def _head_from_state_dict(sd: Mapping[str, Any], path: Path) -> tuple[nn.Module, dict[str, Any]]:
    from .model import build_head

    layout = detect_layout(sd, path)
    head_sd = layout.map_state_dict(sd, path)
    cfg = infer_head_config(layout, head_sd)
    if cfg["kind"] == "tr" and math.isqrt(cfg["num_queries"]) ** 2 != cfg["num_queries"]:
        raise CheckpointError(f"{path}: head_ema.query_pos has {cfg['num_queries']} rows, not a square token grid")
    head = build_head(cfg["kind"], cfg["in_dim"], cfg["out_dim"], num_queries=cfg["num_queries"],
                      ffn_dim=cfg["ffn_dim"], dropout=cfg["dropout"], extra_residual=cfg["extra_residual"])
    load_state_dict_strict(head, head_sd, f"{path} (head_ema mapped to {type(head).__name__})")
    return head.eval(), cfg


def official_linear_probe(segment: str | os.PathLike) -> nn.Linear:
    """The official **supervised** linear probe ``linear`` (1x1 conv ``90 -> C``) of a segment file as ``nn.Linear``.

    It was trained with ground-truth labels (reference §6.9, §8.3): use it only as a supervised evaluation. The
    returned module carries ``supervised = True``.
    """
    path = Path(segment)
    sd = read_state_dict_file(path, "segment_{mlp,tr}.pth")
    w, b = sd.get("linear.f.weight"), sd.get("linear.f.bias")
    extra = sorted(k for k in sd if k.startswith("linear.") and k not in ("linear.f.weight", "linear.f.bias"))
    if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or extra:
        raise CheckpointError(f"{path}: expected the linear probe as 'linear.f.weight' (C, r, 1, 1) and "
                              f"'linear.f.bias' (C,); found linear keys: "
                              f"{_fmt([k for k in sd if k.startswith('linear.')]) or 'none'}")
    if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or b.shape != w.shape[:1]:
        raise CheckpointError(f"{path}: linear.f.weight {tuple(w.shape)} / linear.f.bias {tuple(b.shape)} are not a "
                              f"1x1 convolution (C, r, 1, 1) with bias (C,)")
    probe = nn.Linear(int(w.shape[1]), int(w.shape[0]))
    with torch.no_grad():
        probe.weight.copy_(w.flatten(1).float())
        probe.bias.copy_(b.float())
    probe.supervised = True  # type: ignore[attr-defined]
    return probe.eval()


def read_cluster_file(cluster: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an official ``cluster_{mlp,tr}.pth``: ``(cluster_probe (C, r), codebook (k, c) or None)``.

    The official ``Cluster`` state dict holds exactly ``cluster_probe`` and ``codebook``; ``codebook`` may be absent.

    Raises:
        CheckpointError: ``cluster_probe`` missing or not 2-D, or any other key present.
    """
    path = Path(cluster)
    sd = read_state_dict_file(path, "cluster_{mlp,tr}.pth")
    allowed = {"cluster_probe", "codebook"}
    unexpected = sorted(set(sd) - allowed)
    missing = [] if "cluster_probe" in sd else ["cluster_probe"]
    if missing or unexpected:
        parts = [f"{path}: not an official CAUSE cluster_*.pth (keys 'cluster_probe' (C x 90) and 'codebook'):"]
        if missing:
            parts.append(f"  missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        raise CheckpointError("\n".join(parts))
    probe = sd["cluster_probe"]
    if not isinstance(probe, torch.Tensor) or probe.dim() != 2:
        raise CheckpointError(f"{path}: cluster_probe must be a (C, r) tensor, got "
                              f"{tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__}")
    book = sd.get("codebook")
    if book is not None and (not isinstance(book, torch.Tensor) or book.dim() != 2):
        raise CheckpointError(f"{path}: codebook must be a (k, c) tensor")
    return probe.detach().float(), (book.detach().float() if book is not None else None)


def read_modular(modular: str | os.PathLike) -> torch.Tensor:
    """Read the official ``modular.npy`` clusterbook: a (k, c) float array, returned as float32 tensor.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, not 2-D, empty, or not finite (message names the file).
    """
    path = Path(modular)
    if not path.is_file():
        raise FileNotFoundError(f"clusterbook file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as a .npy array (expected the official modular.npy, k x c float32): "
                         f"{exc}") from exc
    if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.size == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{path}: expected a non-empty 2-D float array (k x c), got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)} of shape {getattr(arr, 'shape', None)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{path}: the clusterbook contains NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_backbone_name(name: str) -> str:
    """A causeseg backbone name from a causeseg name or an official checkpoint stem (``dino_vit_base_8``)."""
    from .backbones import get_spec

    key = OFFICIAL_BACKBONE_NAMES.get(str(name).lower().removesuffix(".pth"), name)
    try:
        return get_spec(key).name
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}: give a causeseg name (`causeseg backbones`) or an official "
                         f"checkpoint stem ({', '.join(OFFICIAL_BACKBONE_NAMES)})") from None


# ------------------------------------------------------------------------------------------------ import
def import_official(
    segment: str | os.PathLike,
    cluster: str | os.PathLike,
    modular: str | os.PathLike | None,
    backbone: str,
    backbone_weights: str | os.PathLike | None = None,
    num_classes: int | None = 27,
    out: str | os.PathLike = "model.pt",
    train_resolution: int | None = None,
    *,
    eval_resolution: int | None = None,
    backbone_options: Mapping[str, Any] | None = None,
) -> Path:
    """Convert official CAUSE release files into a self-contained causeseg ``model.pt``.

    Args:
        segment: ``segment_mlp.pth`` or ``segment_tr.pth`` (kind detected from the keys; ``head_ema`` imported).
        cluster: ``cluster_{mlp,tr}.pth``; its ``cluster_probe`` (C x r) become the centroids.
        modular: ``modular.npy`` (k x c), the clusterbook. Required by the TR head (its queries are codebook rows);
            ``None`` falls back to the ``codebook`` copy stored in the cluster file (with a warning).
        backbone: causeseg backbone name (``dino_vitb8``) or official checkpoint stem (``dino_vit_base_8``).
        backbone_weights: the backbone checkpoint file, recorded in the model (loaded strictly when the model is
            loaded, not here). ``None``: pass it later (``--backbone-weights``).
        num_classes: C; checked against ``cluster_probe`` (and the linear probe). ``None``: taken from the file.
        out: output path of ``model.pt``.
        train_resolution: crop size the head was trained at. TR: must match ``query_pos`` (``(res/patch)^2``
            queries); ``None`` infers it. MLP: informational (``None`` -> the official 224).
        eval_resolution: default inference size stored in the model (``None``: TR -> ``train_resolution``; MLP ->
            320, 322 for patch 14, as the official test).
        backbone_options: ``build_backbone`` overrides stored in the model. ``None``: the official parity options
            (``num_heads=12`` for DINO ViT-S, defect D1; nothing otherwise).

    Returns:
        the path of the written ``model.pt``.

    Raises:
        CheckpointError: a file is not in the official layout (message names it and lists the keys) or shapes
            disagree between the files. ValueError: bad backbone, class count or resolution. FileNotFoundError.
    """
    from .backbones import get_spec
    from .model import CauseModel

    seg_path, clu_path = Path(segment), Path(cluster)
    name = resolve_backbone_name(backbone)
    spec = get_spec(name)
    if not spec.is_vit:
        raise ValueError(f"backbone {name!r}: the official CAUSE release covers ViT backbones only")
    if backbone_options is None:
        options: dict[str, Any] = {"num_heads": 12} if name in TWELVE_HEAD_VIT_S else {}
    else:
        options = dict(backbone_options)
        if name in TWELVE_HEAD_VIT_S and options.get("num_heads", options.get("vit_small_heads")) != 12:
            log.warning("%s: official CAUSE %s checkpoints were trained on a 12-head ViT-S (defect D1); the "
                        "options %s give different features", seg_path, name, options)
    embed_dim = int(options.get("embed_dim", spec.arch["embed_dim"]))
    patch = int(options.get("patch_size", spec.arch["patch_size"]))
    if backbone_weights is not None and not Path(backbone_weights).is_file():
        raise FileNotFoundError(f"backbone weights file not found: {backbone_weights}")

    seg_sd = read_state_dict_file(seg_path, "segment_{mlp,tr}.pth")
    head, head_meta = _head_from_state_dict(seg_sd, seg_path)
    kind = head_meta["kind"]
    if head_meta["in_dim"] != embed_dim:
        raise CheckpointError(f"{seg_path}: the head expects {head_meta['in_dim']}-d tokens but backbone {name!r} "
                              f"gives {embed_dim}-d features; choose the backbone the checkpoint was trained with")

    # resolutions
    if kind == "tr":
        side = math.isqrt(head_meta["num_queries"])
        if train_resolution is None:
            train_resolution = side * patch
        elif int(train_resolution) // patch != side:
            raise ValueError(f"{seg_path}: head_ema.query_pos has {head_meta['num_queries']} = {side}x{side} queries, "
                             f"i.e. the TR head was trained on {side * patch}px crops with patch {patch}, not "
                             f"{train_resolution}px; pass train_resolution={side * patch} "
                             f"(CLI: --train-resolution {side * patch})")
        if eval_resolution is None:
            eval_resolution = int(train_resolution)
    else:
        if train_resolution is None:
            train_resolution = 224
        if eval_resolution is None:
            eval_resolution = 322 if patch == 14 else 320

    # centroids
    centroids, cluster_book = read_cluster_file(clu_path)
    if centroids.shape[1] != head_meta["out_dim"]:
        raise CheckpointError(f"{clu_path}: cluster_probe is {tuple(centroids.shape)} but the head in {seg_path} "
                              f"outputs {head_meta['out_dim']}-d features; the files come from different runs")
    if num_classes is None:
        num_classes = int(centroids.shape[0])
    if centroids.shape[0] != int(num_classes):
        raise ValueError(f"{clu_path}: cluster_probe has {centroids.shape[0]} centroids but num_classes={num_classes} "
                         f"(CLI: --num-classes {centroids.shape[0]})")
    probe_sd = seg_sd.get("linear.f.weight")
    if isinstance(probe_sd, torch.Tensor) and probe_sd.shape[0] != int(num_classes):
        log.warning("%s: the official linear probe has %d classes but the cluster file %d", seg_path,
                    probe_sd.shape[0], num_classes)

    # clusterbook
    if modular is not None:
        codebook = read_modular(modular)
        book_src: str | None = str(Path(modular).resolve())
    elif cluster_book is not None:
        log.warning("%s: no modular.npy given; using the clusterbook copy stored in the cluster file", clu_path)
        codebook, book_src = cluster_book, None
    else:
        raise ValueError(f"{clu_path}: holds no 'codebook' and modular=None; pass the official modular.npy")
    if codebook.shape[1] != embed_dim:
        raise ValueError(f"{modular if modular is not None else clu_path}: clusterbook is {tuple(codebook.shape)}, "
                         f"expected (k, {embed_dim}) for backbone {name!r}")
    book_match: bool | None = None
    if modular is not None and cluster_book is not None:
        book_match = bool(cluster_book.shape == codebook.shape and torch.allclose(cluster_book, codebook,
                                                                                   rtol=1e-4, atol=1e-6))
        if not book_match:
            log.warning("%s: the codebook stored in %s differs from %s; using modular.npy as the official test does "
                        "(check that the files belong to the same run)", seg_path, clu_path, modular)

    imported = {"segment": str(seg_path.resolve()), "cluster": str(clu_path.resolve()), "modular": book_src,
                "sha256": {"segment": _sha256(seg_path), "cluster": _sha256(clu_path),
                           **({"modular": _sha256(Path(modular))} if modular is not None else {})}}
    official: dict[str, Any] = {"kind": kind, "head": "head_ema", "cluster_codebook_matches_modular": book_match,
                                "label_free": False}
    if name in TWELVE_HEAD_VIT_S:
        official["vit_small_heads"] = 12
        official["vit_small_note"] = ("the official CAUSE ViT-S was built with 12 attention heads (DINO: 6; "
                                      "cause-reference D1); reproduce with backbone option num_heads=12")
    meta = {
        "backbone": {"name": name, "weights": str(Path(backbone_weights).resolve()) if backbone_weights else None,
                     "options": options, "pretrained": True},
        "head": head_meta,
        "num_classes": int(num_classes),
        "train_resolution": int(train_resolution),
        "eval_resolution": int(eval_resolution),
        "imported_from": imported,
        "official": official,
        "label_free": False,
        "note": LABEL_LEAK_NOTE,
    }
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    CauseModel(nn.Identity(), head, codebook, centroids, meta).save(out_path, None)
    log.info("imported official CAUSE-%s (%s) -> %s; %s", kind.upper(), name, out_path, LABEL_LEAK_NOTE)
    return out_path
