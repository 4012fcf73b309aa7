"""Configuration: dataclasses, YAML presets under ``causeseg/configs/`` (inside the package) and ``key.path=value`` overrides.

A preset may name another preset it extends with ``_base_: other.yaml`` (resolved relative to the
preset's folder); the child's values are merged over the base's, section by section. The resolved
configuration is written into every run directory so that a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped inside the package (wheel installs keep them)


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    weights: str | None = None  # path to an official checkpoint file
    download: bool = False  # fetch the official weights from their URL (needs a network)
    options: dict[str, Any] = field(default_factory=dict)  # e.g. feature_stride, num_heads


@dataclass
class DataConfig:
    dataset: str = "camvid"  # cocostuff27, coco81, coco171, cityscapes27, voc, camvid, paired, images
    root: str | None = None  # dataset root; None = the shared data root for 'paired'/'camvid' presets
    train_split: str = "train"
    val_split: str = "val"
    crop: str = "none"  # training crops: none, five, ten, double, super
    mode: str | None = None  # protocol geometry: center (default) or squash (VOC)
    num_classes: int = 11
    label_spec: str | dict[str, Any] | None = None  # label map: a preset name (camvid11, ...) or a spec dict
    on_error: str = "raise"  # raise | skip (bad files are skipped and reported)
    num_workers: int | None = None  # loader workers; None = auto (cores / processes per node - 1, at most 16; logged)
    shuffle_window: int = 256  # items per shuffle/loader window of a multi-crop order (decode once); 0 = full shuffle


@dataclass
class Step1Config:
    """Step 1: the concept clusterbook (mediator)."""

    method: str = "modularity"  # modularity | kmeans++ | spectral | agglomerative | ward
    k: int = 2048
    tau: float = 0.1
    variant: str = "code"  # code: max over concepts (official) | paper: Eq. 6 (sum over concepts)
    grid: int = 4
    resolution: int = 320
    batch_size: int = 16
    epochs: int = 1
    iterations: int | None = None  # optimiser steps of the step; None = step1.epochs whole epochs
    lr: float = 1e-3
    max_samples: int = 20000  # tokens sampled for the alternative discretisers
    lr_schedule: str = "constant"  # constant | official: StepLR(step 1 epoch, gamma 0.2), as the official code


@dataclass
class Step2Config:
    """Step 2: the segmentation head trained by concept-wise contrastive learning."""

    head: str = "tr"  # tr | mlp
    reduced_dim: int = 90
    projection_dim: int = 2048
    ffn_dim: int = 2048
    dropout: float = 0.1
    extra_residual: bool = True  # official TR: u = T + LN3(u)
    resolution: int = 320
    batch_size: int = 16
    epochs: int = 2
    iterations: int | None = None  # optimiser steps of the step; None = step2.epochs whole epochs
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 2.0  # global norm over the unsupervised head only; 0 = off
    tau: float = 0.07
    phi_pos: float = 0.3
    phi_neg: float = 0.1
    # fixed: phi_pos / phi_neg as given | quantile: from the clusterbook's D_M (contrastive.calibrated_thresholds)
    phi_rule: str = "fixed"
    phi_pos_frac: float = 0.1  # phi_rule=quantile: fraction of the concept pairs that count as positive
    phi_neg_frac: float = 0.5  # phi_rule=quantile: fraction of the concept pairs that count as negative
    loss_form: str = "official"  # official (SupCon-style) | paper (Eq. 4)
    feature_space: str = "projection"  # projection (official, 2048-d) | head (paper, r-d)
    bank_size: int = 100
    bank_policy: str = "official"  # official (keep half of new, FIFO) | paper (discard half, add half)
    use_bank: bool = True
    ema: float = 0.99
    ema_warmup: bool = False  # mean-teacher ramp min(ema, 1 - 1/(t+1)); off = official constant decay
    grid: int = 4
    loss_chunk: int | None = None  # anchors per chunk for the bank log-sum-exp (memory bound)
    # official-form bank log-sum-exp: auto (triton on CUDA, else torch) | torch | triton | reference (fp32, exact)
    bank_impl: str = "auto"


@dataclass
class Step3Config:
    """Step 3: the C class centroids (label-free)."""

    learner: str = "modularity"  # modularity (official) | kmeans (online spherical k-means probe) | sinkhorn (SwAV)
    resolution: int = 320
    batch_size: int = 16
    epochs: int = 5
    iterations: int | None = None  # optimiser steps of the step; None = step3.epochs whole epochs
    lr: float = 1e-3
    tau: float = 0.1
    gamma: float = 1.0  # modularity resolution (Reichardt-Bornholdt); 1 = official / Eq. 3
    init: str = "uniform"  # uniform U(-1/C, 1/C) (official) | kmeans++ (seeded on head outputs)
    init_tokens: int = 20000  # head-output tokens sampled for the kmeans++ init
    grid: int = 4
    dropout_active: bool = True  # official: the teacher head runs with dropout during Step 3
    sinkhorn_eps: float = 0.05  # learner=sinkhorn: entropic temperature of the balanced codes (SwAV 0.05)
    sinkhorn_iters: int = 3  # learner=sinkhorn: Sinkhorn-Knopp iterations (SwAV 3)
    sinkhorn_balance: float = 1.0  # learner=sinkhorn: 1 = equipartition (SwAV); < 1 KL-relaxed cluster sizes
    lr_schedule: str = "constant"  # constant | official: StepLR(step 2 epochs, gamma 0.5), as the official code


@dataclass
class EvalConfig:
    resolution: int = 320
    batch_size: int = 16
    flip: bool = True
    crf: bool = True
    alpha: float = 3.0  # CRF unary = softmax(alpha * cos); CAUSE 3, STEGO/HP 2
    crf_workers: int = 2
    crf_timeout: float | None = 120.0
    linear_probe: bool = False  # separate supervised evaluation (paper Table 2)
    probe_epochs: int = 2
    figures: int = 8  # number of images in the prediction figure


@dataclass
class SelfTrainSection:
    """Pseudo-label self-training after Step 3 (:mod:`causeseg.selftrain`): beyond the paper, off in every preset.

    A light conv head is trained on the Steps 1-3 model's own cluster maps of the training images (no label);
    the seed is ``run.seed`` and the pseudo labels are made at ``eval.resolution`` with ``eval.flip`` and
    ``eval.alpha``, as the evaluation predicts.
    """

    enabled: bool = False
    epochs: int = 8
    lr: float = 1e-3
    hidden: int = 128  # channels of the 3 x 3 conv
    batch_size: int = 16  # pseudo-labelled maps per head update
    label_stride: int = 4  # pseudo labels at 1/label_stride of the image size (majority vote)
    use_embed: bool = False  # the head also sees the cluster model's head output
    crf: bool = True  # pseudo labels refined by the dense CRF


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16/fp16 on CUDA, off on CPU) | bf16 | fp16 | off
    checkpoint_every: int = 100  # optimiser steps between atomic checkpoints
    feature_cache: str = "auto"  # auto (cache when the estimate fits) | on | off
    cache_limit_gb: float = 8.0
    # none | linear (lr x world size) | published (lr x 4, the GPU count of the official runs: 4e-3 per copy)
    lr_scaling: str = "none"
    progress: bool = True


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    step1: Step1Config = field(default_factory=Step1Config)
    step2: Step2Config = field(default_factory=Step2Config)
    step3: Step3Config = field(default_factory=Step3Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    selftrain: SelfTrainSection = field(default_factory=SelfTrainSection)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("options", "label_spec"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular _base_ chain")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("_base_", None)
    if base:
        data = _merge(_read_yaml(path.parent / base, seen + (path,)), data)
    return data


def _coerce(value: str) -> Any:
    return yaml.safe_load(value) if value != "" else ""


# string options whose values YAML would read as booleans (on/off)
_ON_OFF = {("run", "amp"), ("run", "feature_cache")}


#: annotation -> accepts(value); bool is an int subclass, so int and float fields reject it explicitly
_TYPE_CHECKS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    dict: lambda v: isinstance(v, dict),
}


def _typed(name: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` checked against the field's annotation; for a float an int or a numeric string is converted."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in (o for o in options if o is not type(None)):
            try:
                return _typed(name, value, opt, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    base = origin or hint
    if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not _TYPE_CHECKS.get(base, lambda v: True)(value):
        want = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{source}: {name}={value!r} must be of type {want}")
    return float(value) if base is float else value


def _from_dict(data: dict, source: str) -> Config:
    cfg = Config()
    valid = {f.name: f for f in fields(Config)}
    for section, values in data.items():
        if section not in valid:
            raise ConfigError(f"{source}: unknown section '{section}' (known: {', '.join(valid)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping")
        obj = getattr(cfg, section)
        names = {f.name for f in fields(obj)}
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if (section, key) in _ON_OFF and isinstance(value, bool):
                value = "on" if value else "off"
            if key not in names:
                raise ConfigError(f"{source}: unknown key '{section}.{key}' (known: {', '.join(sorted(names))})")
            setattr(obj, key, _typed(f"{section}.{key}", value, hints[key], source))
    return cfg


def resolve_preset(name_or_path: str | Path) -> Path:
    """A preset name (``camvid_effnet``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = CONFIG_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    if p.exists():
        return p
    raise ConfigError(f"no preset or config file named '{name_or_path}' (presets: {', '.join(list_presets())})")


def list_presets() -> list[str]:
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None, *,
                base: dict | None = None, base_source: str = "<stored config>") -> Config:
    """Load a preset (name or YAML path), or start from ``base`` (a stored config dict, e.g. the one in a
    ``model.pt``), and apply ``section.key=value`` overrides."""
    import copy

    data: dict = copy.deepcopy(base) if base is not None else {}
    source = base_source if base is not None else "<defaults>"
    if preset is not None and base is not None:
        raise ConfigError("pass either a preset or a stored config, not both")
    if preset is not None:
        path = resolve_preset(preset)
        data = _read_yaml(path)
        source = str(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ConfigError(f"override '{item}' must name a section and a key, e.g. step2.phi_pos=0.2")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _coerce(value)
    if overrides:
        source += " with overrides"
    cfg = _from_dict(data, source)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _from_dict(data, "<dict>")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every setting's choice and range, checked before anything runs (one error naming the key)."""

    def choice(name: str, value: Any, allowed: tuple) -> None:
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {allowed}")

    _validate_ranges(cfg)
    _validate_data_and_device(cfg)

    choice("step1.method", cfg.step1.method, ("modularity", "kmeans++", "spectral", "agglomerative", "ward"))
    choice("step1.variant", cfg.step1.variant, ("code", "paper"))
    choice("step2.head", cfg.step2.head, ("tr", "mlp"))
    choice("step2.loss_form", cfg.step2.loss_form, ("official", "paper"))
    choice("step2.feature_space", cfg.step2.feature_space, ("projection", "head"))
    choice("step2.bank_policy", cfg.step2.bank_policy, ("official", "paper"))
    choice("step2.bank_impl", cfg.step2.bank_impl, ("auto", "torch", "triton", "reference"))
    choice("step3.learner", cfg.step3.learner, ("modularity", "kmeans", "sinkhorn"))
    choice("step1.lr_schedule", cfg.step1.lr_schedule, ("constant", "official"))
    choice("step3.lr_schedule", cfg.step3.lr_schedule, ("constant", "official"))
    if cfg.step3.sinkhorn_eps <= 0 or cfg.step3.sinkhorn_iters < 1:
        raise ConfigError(f"step3.sinkhorn_eps must be > 0 and step3.sinkhorn_iters >= 1, got "
                          f"{cfg.step3.sinkhorn_eps}, {cfg.step3.sinkhorn_iters}")
    if not 0 <= cfg.step3.sinkhorn_balance <= 1:
        raise ConfigError(f"step3.sinkhorn_balance must be in [0, 1], got {cfg.step3.sinkhorn_balance}")
    choice("step3.init", cfg.step3.init, ("uniform", "kmeans++"))
    choice("run.amp", cfg.run.amp, ("auto", "bf16", "fp16", "off"))
    choice("run.feature_cache", cfg.run.feature_cache, ("auto", "on", "off"))
    choice("run.lr_scaling", cfg.run.lr_scaling, ("none", "linear", "published"))
    choice("step2.phi_rule", cfg.step2.phi_rule, ("fixed", "quantile"))
    if not 0 <= cfg.step2.phi_neg <= cfg.step2.phi_pos <= 1:
        raise ConfigError(f"need 0 <= phi_neg <= phi_pos <= 1, got {cfg.step2.phi_neg}, {cfg.step2.phi_pos}")
    if cfg.step2.phi_pos_frac + cfg.step2.phi_neg_frac > 1 + 1e-9:
        raise ConfigError(f"step2.phi_pos_frac + step2.phi_neg_frac must be <= 1 (a pair is not both positive and "
                          f"negative), got {cfg.step2.phi_pos_frac} + {cfg.step2.phi_neg_frac}")
    if cfg.step3.gamma <= 0:
        raise ConfigError(f"step3.gamma (modularity resolution) must be > 0, got {cfg.step3.gamma}")
    if cfg.step3.init_tokens < cfg.data.num_classes:
        raise ConfigError(f"step3.init_tokens ({cfg.step3.init_tokens}) must be at least data.num_classes "
                          f"({cfg.data.num_classes})")
    if cfg.step1.k < 2:
        raise ConfigError("step1.k must be at least 2")
    if cfg.data.num_classes < 2:
        raise ConfigError("data.num_classes must be at least 2")
    if not 0 <= cfg.step2.ema < 1:
        raise ConfigError("step2.ema must be in [0, 1)")


def save_config(cfg: Config, path: str | Path) -> None:
    from .utils import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def _validate_ranges(cfg: Config) -> None:
    """Numeric ranges: ``(section.key, value, test, requirement)``; the first failure is the error."""
    def at_least(lo):
        return (lambda v: v is not None and v >= lo), f">= {lo}"

    def positive():
        return (lambda v: v is not None and v > 0), "> 0"

    def unit_open():
        return (lambda v: v is not None and 0 <= v < 1), "in [0, 1)"

    s1, s2, s3, e, r, d = cfg.step1, cfg.step2, cfg.step3, cfg.eval, cfg.run, cfg.data
    checks = [
        ("step1.epochs", s1.epochs, *at_least(1)), ("step1.batch_size", s1.batch_size, *at_least(1)),
        ("step1.resolution", s1.resolution, *at_least(16)), ("step1.tau", s1.tau, *positive()),
        ("step1.lr", s1.lr, *at_least(0)), ("step1.grid", s1.grid, *at_least(1)),
        ("step1.max_samples", s1.max_samples, *at_least(1)),
        ("step2.epochs", s2.epochs, *at_least(1)), ("step2.batch_size", s2.batch_size, *at_least(1)),
        ("step2.resolution", s2.resolution, *at_least(16)), ("step2.tau", s2.tau, *positive()),
        ("step2.lr", s2.lr, *at_least(0)), ("step2.weight_decay", s2.weight_decay, *at_least(0)),
        ("step2.grad_clip", s2.grad_clip, *at_least(0)), ("step2.dropout", s2.dropout, *unit_open()),
        ("step2.reduced_dim", s2.reduced_dim, *at_least(1)), ("step2.projection_dim", s2.projection_dim, *at_least(1)),
        ("step2.ffn_dim", s2.ffn_dim, *at_least(1)), ("step2.bank_size", s2.bank_size, *at_least(1)),
        ("step2.grid", s2.grid, *at_least(1)),
        ("step3.epochs", s3.epochs, *at_least(1)), ("step3.batch_size", s3.batch_size, *at_least(1)),
        ("step3.resolution", s3.resolution, *at_least(16)), ("step3.tau", s3.tau, *positive()),
        ("step3.lr", s3.lr, *at_least(0)), ("step3.grid", s3.grid, *at_least(1)),
        ("eval.resolution", e.resolution, *at_least(16)), ("eval.batch_size", e.batch_size, *at_least(1)),
        ("eval.alpha", e.alpha, *positive()), ("eval.crf_workers", e.crf_workers, *at_least(0)),
        ("eval.probe_epochs", e.probe_epochs, *at_least(1)), ("eval.figures", e.figures, *at_least(0)),
        ("run.checkpoint_every", r.checkpoint_every, *at_least(0)), ("run.cache_limit_gb", r.cache_limit_gb, *at_least(0)),
        ("selftrain.epochs", cfg.selftrain.epochs, *at_least(1)), ("selftrain.lr", cfg.selftrain.lr, *positive()),
        ("selftrain.hidden", cfg.selftrain.hidden, *at_least(1)),
        ("selftrain.batch_size", cfg.selftrain.batch_size, *at_least(1)),
        ("selftrain.label_stride", cfg.selftrain.label_stride, *at_least(1)),
    ]
    if s2.loss_chunk is not None:
        checks.append(("step2.loss_chunk", s2.loss_chunk, *at_least(1)))
    for name, sec in (("step1", s1), ("step2", s2), ("step3", s3)):
        if sec.iterations is not None:
            checks.append((f"{name}.iterations", sec.iterations, *at_least(1)))
    frac = ((lambda v: v is not None and 0 < v < 1), "in (0, 1)")
    checks += [("step2.phi_pos_frac", s2.phi_pos_frac, *frac), ("step2.phi_neg_frac", s2.phi_neg_frac, *frac)]
    if e.crf_timeout is not None:
        checks.append(("eval.crf_timeout", e.crf_timeout, *positive()))
    checks.append(("data.shuffle_window", d.shuffle_window, *at_least(0)))
    if isinstance(d.num_workers, int):
        checks.append(("data.num_workers", d.num_workers, *at_least(0)))
    for name, value, ok, want in checks:
        if not ok(value):
            raise ConfigError(f"{name}={value!r} must be {want}")


def _validate_data_and_device(cfg: Config) -> None:
    """Dataset kind, crop, geometry, error policy, label map, backbone name and device."""
    from .data.crops import num_crops
    from .data.datasets import _ALIASES, DATASET_NAMES
    from .data.transforms import MODES

    d = cfg.data
    if d.dataset not in DATASET_NAMES and d.dataset not in _ALIASES:
        raise ConfigError(f"data.dataset={d.dataset!r} is not one of {DATASET_NAMES}")
    try:
        num_crops(d.crop)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"data.crop={d.crop!r}: {exc}") from None
    if d.mode is not None and d.mode not in MODES:
        raise ConfigError(f"data.mode={d.mode!r} is not one of {tuple(MODES)} (or null for the dataset's default)")
    if d.on_error not in ("raise", "skip"):
        raise ConfigError(f"data.on_error={d.on_error!r} is not one of ('raise', 'skip')")
    if d.label_spec is not None:
        from .data.io import DataError
        from .data.labelmaps import get_label_map

        try:
            lm = get_label_map(d.label_spec)
        except (KeyError, ValueError, TypeError, DataError) as exc:
            raise ConfigError(f"data.label_spec={d.label_spec!r}: {exc}") from None
        if lm.num_classes != d.num_classes:
            raise ConfigError(f"data.label_spec={d.label_spec!r} has {lm.num_classes} classes but "
                              f"data.num_classes={d.num_classes}; set data.num_classes={lm.num_classes}")
    from .backbones import list_backbones

    if cfg.backbone.name not in list_backbones():
        raise ConfigError(f"backbone.name={cfg.backbone.name!r} is not a known backbone "
                          f"(see `causeseg backbones`: {', '.join(list_backbones())})")
    check_device(cfg.run.device, "run.device")


def check_device(name: str, key: str = "--device") -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that this torch can use; else a ConfigError."""
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no usable GPU"
            raise ConfigError(f"{key}={name!r} but this torch ({torch.__version__}) has {build}; use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type not in ("cpu", "mps"):
        raise ConfigError(f"{key}={name!r}: unsupported device type {dev.type!r} (auto, cpu, cuda, cuda:N)")
