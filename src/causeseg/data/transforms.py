"""Protocol transforms with torchvision semantics, written on PIL + torch (no torchvision).

* ``resize_shorter``: ``Resize(s)``: the shorter side becomes ``s``, the longer ``int(s * long / short)``.
* ``center_crop``: ``CenterCrop(s)``: offsets ``int(round((H - s) / 2))`` (Python ``round``); a crop larger than the
  image is padded with ``fill`` first, as torchvision does.
* ``squash``: ``Resize((s, s))`` (Pascal VOC protocol).
* ``to_tensor01``: ``ToTensor``: uint8 HWC -> float CHW / 255.
* ``mask_to_tensor``: int64 without scaling.

Masks go through the same geometry as images; they are carried as 32-bit integer PIL images (mode ``I``) so that
-1 (ignore) and values above 255 survive, and they are always resampled with NEAREST.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

MODES = ("center", "squash", "none")


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) from an int or a (h, w) pair."""
    if isinstance(size, (tuple, list)):
        if len(size) == 1:
            return int(size[0]), int(size[0])
        return int(size[0]), int(size[1])
    return int(size), int(size)


def shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """Output (width, height) of ``resize_shorter`` for a (w, h) input (torchvision rule, long side truncated)."""
    if w <= h:
        return int(size), int(size * h / w)
    return int(size * w / h), int(size)


def resize_shorter(img: Image.Image, size: int, resample: int = Image.NEAREST) -> Image.Image:
    """Resize so that the shorter side is ``size`` (the protocol uses NEAREST for images and labels)."""
    w, h = img.size
    ow, oh = shorter_side_size(w, h, size)
    if (ow, oh) == (w, h):
        return img.copy()
    return img.resize((ow, oh), resample=resample)


def center_crop_box(w: int, h: int, size: int | tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the torchvision centre crop of a (w, h) image (may reach outside: padding)."""
    ch, cw = _pair(size)
    if cw > w or ch > h:
        # torchvision pads (left=(cw-w)//2, top=(ch-h)//2, right/bottom the rest), then crops the centre
        pl = (cw - w) // 2 if cw > w else 0
        pr = (cw - w + 1) // 2 if cw > w else 0
        pt = (ch - h) // 2 if ch > h else 0
        pb = (ch - h + 1) // 2 if ch > h else 0
        pw, ph = w + pl + pr, h + pt + pb
        top = int(round((ph - ch) / 2.0)) - pt
        left = int(round((pw - cw) / 2.0)) - pl
    else:
        top = int(round((h - ch) / 2.0))
        left = int(round((w - cw) / 2.0))
    return left, top, left + cw, top + ch


def center_crop(img: Image.Image, size: int | tuple[int, int], fill: int = 0) -> Image.Image:
    """Centre crop of ``size`` ((h, w) or int), torchvision offsets; areas outside the image get ``fill``."""
    w, h = img.size
    box = center_crop_box(w, h, size)
    left, top, right, bottom = box
    if left >= 0 and top >= 0 and right <= w and bottom <= h:
        return img.crop(box)
    out = Image.new(img.mode, (right - left, bottom - top), fill)
    out.paste(img, (-left, -top))
    return out


def squash(img: Image.Image, size: int | tuple[int, int], resample: int = Image.NEAREST) -> Image.Image:
    """Resize to exactly ``size`` ((h, w) or int) ignoring the aspect ratio (torchvision ``Resize((s, s))``)."""
    h, w = _pair(size)
    if img.size == (w, h):
        return img.copy()
    return img.resize((w, h), resample=resample)


def to_tensor01(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1] (torchvision ``ToTensor``)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def mask_to_tensor(arr: np.ndarray | Image.Image) -> torch.Tensor:
    """Label array (H, W) -> int64 tensor, values unchanged."""
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {a.shape}")
    return torch.from_numpy(a.astype(np.int64, copy=True))


def mask_to_pil(arr: np.ndarray) -> Image.Image:
    """(H, W) integer array -> 32-bit integer PIL image (mode ``I``) for geometric transforms."""
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {a.shape}")
    a64 = a.astype(np.int64)
    if a64.size and (a64.min() < -(2 ** 31) or a64.max() >= 2 ** 31):
        raise ValueError("mask values do not fit in 32 bits")
    return Image.fromarray(a64.astype(np.int32), mode="I")


def pil_to_mask(img: Image.Image) -> np.ndarray:
    """Inverse of ``mask_to_pil``: int64 (H, W)."""
    return np.asarray(img).astype(np.int64)


def protocol_transform(img: Image.Image, mask: np.ndarray | None, size: int, mode: str = "center",
                       ignore_fill: int = -1) -> tuple[Image.Image, np.ndarray | None]:
    """The evaluation/training geometry of the protocol, applied identically to image and mask (NEAREST for both).

    ``mode='center'``: ``resize_shorter(size)`` then ``center_crop(size)`` (COCO, Cityscapes, CamVid, custom);
    ``'squash'``: resize to (size, size) (Pascal VOC); ``'none'``: no geometric change (native resolution).
    Padding (only possible for ``center_crop`` on inputs smaller than the crop) is 0 in the image and
    ``ignore_fill`` in the mask. Returns (RGB PIL image, int64 mask or None).
    """
    if mode not in MODES:
        raise ValueError(f"unknown transform mode {mode!r}; expected one of {MODES}")
    m = mask_to_pil(mask) if mask is not None else None
    if m is not None and m.size != img.size:
        raise ValueError(f"image size {img.size} and mask size {m.size} differ")
    if mode == "center":
        img = center_crop(resize_shorter(img, size, Image.NEAREST), size)
        if m is not None:
            m = center_crop(resize_shorter(m, size, Image.NEAREST), size, fill=ignore_fill)
    elif mode == "squash":
        img = squash(img, size, Image.NEAREST)
        if m is not None:
            m = squash(m, size, Image.NEAREST)
    return img, (pil_to_mask(m) if m is not None else None)
