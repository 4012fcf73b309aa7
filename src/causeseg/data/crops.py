"""Training crops produced on the fly (the official code writes them to disk first; the pixels are the same,
without its JPEG re-compression).

Semantics follow torchvision exactly:

* ``five_crop(img, (ch, cw))`` with ``(ch, cw) = (int(ratio * H), int(ratio * W))``: top-left, top-right,
  bottom-left, bottom-right, centre (centre offsets ``int(round((H - ch) / 2))``, ``int(round((W - cw) / 2))``).
* ``ten_crop``: the five crops, then ``five_crop`` of the horizontally flipped image. Expressed in the coordinates of
  the unflipped image these are flipped crops of tr, tl, br, bl and a centre box whose left offset is
  ``W - cw - int(round((W - cw) / 2))`` (one pixel left of the unflipped centre when ``W - cw`` is odd and rounds up).
* ``double`` (COCO-81/171): ten crops at 0.5 and 0.8 (20); ``super`` (Pascal VOC): ten crops at 0.3..0.7 (50).

Order: ratio-major, then the ten-crop order above.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np
from PIL import Image


class Crop(NamedTuple):
    """A crop box in the coordinates of the original image; ``flip``: mirror the crop horizontally afterwards."""

    left: int
    top: int
    width: int
    height: int
    flip: bool = False


#: crop kinds -> ratios and whether the flipped five are added
CROP_KINDS: dict[str, tuple[tuple[float, ...], bool]] = {
    "none": ((), False),
    "five": ((0.5,), False),
    "ten": ((0.5,), True),
    "double": ((0.5, 0.8), True),
    "super": ((0.3, 0.4, 0.5, 0.6, 0.7), True),
}


def _crop_size(w: int, h: int, ratio: float) -> tuple[int, int]:
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    cw, ch = int(ratio * w), int(ratio * h)
    if cw < 1 or ch < 1:
        raise ValueError(f"crop ratio {ratio} of a {w}x{h} image gives an empty crop ({cw}x{ch})")
    return cw, ch


def five_crop_boxes(w: int, h: int, ratio: float) -> list[Crop]:
    """torchvision ``five_crop`` boxes (tl, tr, bl, br, centre) of size (int(ratio*H), int(ratio*W))."""
    cw, ch = _crop_size(w, h, ratio)
    ct, cl = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return [
        Crop(0, 0, cw, ch, False),
        Crop(w - cw, 0, cw, ch, False),
        Crop(0, h - ch, cw, ch, False),
        Crop(w - cw, h - ch, cw, ch, False),
        Crop(cl, ct, cw, ch, False),
    ]


def ten_crop_boxes(w: int, h: int, ratio: float) -> list[Crop]:
    """torchvision ``ten_crop``: five crops of the image, then five crops of its horizontal mirror.

    A box (l, t, cw, ch) of the mirrored image is the mirrored box (W - l - cw, t, cw, ch) of the original.
    """
    first = five_crop_boxes(w, h, ratio)
    second = [Crop(w - c.left - c.width, c.top, c.width, c.height, True) for c in five_crop_boxes(w, h, ratio)]
    return first + second


def multi_crop_boxes(w: int, h: int, ratios: tuple[float, ...] | list[float]) -> list[Crop]:
    """Ten crops per ratio, ratio-major (``double`` = (0.5, 0.8) -> 20; ``super`` = 0.3..0.7 -> 50)."""
    out: list[Crop] = []
    for r in ratios:
        out.extend(ten_crop_boxes(w, h, r))
    return out


def num_crops(kind: str) -> int:
    """Crops per image for a crop kind."""
    ratios, flips = _kind(kind)
    return 1 if not ratios else len(ratios) * (10 if flips else 5)


def _kind(kind: str) -> tuple[tuple[float, ...], bool]:
    if kind not in CROP_KINDS:
        raise ValueError(f"unknown crop kind {kind!r}; expected one of {sorted(CROP_KINDS)}")
    return CROP_KINDS[kind]


def crop_boxes(kind: str, w: int, h: int) -> list[Crop]:
    """Boxes for a crop kind: 'none' (the whole image), 'five', 'ten' (ratio 0.5), 'double', 'super'."""
    ratios, flips = _kind(kind)
    if not ratios:
        return [Crop(0, 0, w, h, False)]
    if not flips:
        return [c for r in ratios for c in five_crop_boxes(w, h, r)]
    return multi_crop_boxes(w, h, ratios)


@dataclass(frozen=True)
class CropSpec:
    """A named crop kind (``'none'``, ``'five'``, ``'ten'``, ``'double'``, ``'super'``)."""

    kind: str = "none"

    def __post_init__(self) -> None:
        _kind(self.kind)

    @property
    def count(self) -> int:
        return num_crops(self.kind)

    def boxes(self, w: int, h: int) -> list[Crop]:
        return crop_boxes(self.kind, w, h)


T = TypeVar("T", Image.Image, np.ndarray)


def apply_crop(img: T, crop: Crop) -> T:
    """Cut ``crop`` out of a PIL image or an (H, W[, C]) array, then mirror it if ``crop.flip``."""
    if isinstance(img, Image.Image):
        w, h = img.size
        _check(crop, w, h)
        out = img.crop((crop.left, crop.top, crop.left + crop.width, crop.top + crop.height))
        return out.transpose(Image.FLIP_LEFT_RIGHT) if crop.flip else out
    arr = np.asarray(img)
    h, w = arr.shape[:2]
    _check(crop, w, h)
    out_a = arr[crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    if crop.flip:
        out_a = out_a[:, ::-1]
    return np.ascontiguousarray(out_a)


def _check(crop: Crop, w: int, h: int) -> None:
    if crop.left < 0 or crop.top < 0 or crop.left + crop.width > w or crop.top + crop.height > h \
            or crop.width < 1 or crop.height < 1:
        raise ValueError(f"crop {crop} does not fit in a {w}x{h} image")
