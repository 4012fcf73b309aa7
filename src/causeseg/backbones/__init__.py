"""Frozen backbones: timm-free ViTs (DINO, DINOv2, iBOT, MSN, MAE) and EfficientNet-Lite0, loaded strictly.

Main API::

    from causeseg.backbones import build_backbone, list_backbones
    bb = build_backbone("dino_vits8", weights="dino_deitsmall8_pretrain.pth")
    feats = bb(images01)            # (B, 384, H/8, W/8); images in [0, 1]

See ``docs/backbones.md``.
"""

from .checkpoint import (
    CheckpointError,
    extract_backbone_state_dict,
    load_checkpoint_file,
    load_state_dict_strict,
)
from .efficientnet import EfficientNetLite0
from .registry import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneSpec,
    EfficientNetBackbone,
    ViTBackbone,
    WeightsRequiredError,
    build_backbone,
    get_spec,
    list_backbones,
)
from .vit import VisionTransformer, interpolate_pos_embed

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneSpec",
    "CheckpointError",
    "EfficientNetBackbone",
    "EfficientNetLite0",
    "ViTBackbone",
    "VisionTransformer",
    "WeightsRequiredError",
    "build_backbone",
    "extract_backbone_state_dict",
    "get_spec",
    "interpolate_pos_embed",
    "list_backbones",
    "load_checkpoint_file",
    "load_state_dict_strict",
]
