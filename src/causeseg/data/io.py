"""Reading images and label masks, with errors that name the file and the problem."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: File suffixes (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".gif"}
)


class DataError(Exception):
    """A data file (or data folder / list / manifest) is missing, unreadable or inconsistent.

    The message always starts with the offending path(s), followed by the problem.
    """


def _open_full(path: Path, what: str, exif_transpose: bool = False) -> Image.Image:
    """Open ``path`` and force a full decode so that truncated or corrupt files fail here.

    The returned image holds no open file handle (multi-frame formats keep theirs, so those are copied).
    """
    if not path.exists():
        raise DataError(f"{path}: {what} file not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} path is not a file")
    img = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
            out = ImageOps.exif_transpose(img) if exif_transpose else img
            if out is img and getattr(img, "fp", None) is not None:
                out = img.copy()
            if out is not img:
                img.close()
            return out
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        if img is not None:
            img.close()
        raise DataError(f"{path}: corrupt or truncated {what} ({type(exc).__name__}: {exc})") from None


def _wide_to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """16-bit (or 32-bit integer holding 16-bit data) grey values -> 8 bits, by scaling 65535 -> 255 (no clipping)."""
    a = arr.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise DataError(f"{path}: integer image values in [{a.min()}, {a.max()}] are outside the 16-bit range "
                        "0..65535; cannot convert to 8 bits")
    # round(v * 255 / 65535) == round(v / 257), exact in integers
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def load_image(path: str | Path, exif_transpose: bool = False) -> Image.Image:
    """Load ``path`` as an 8-bit RGB PIL image.

    Converts grey (``L``, ``1``), grey+alpha (``LA``), ``RGBA`` (alpha dropped, as ``convert('RGB')`` does),
    palette (``P``, through its colours), ``CMYK``, ``YCbCr`` and 16-bit grey (``I;16*`` / ``I``: scaled so that
    65535 -> 255, never clipped). ``F`` images with values in [0, 1] are scaled by 255.
    ``exif_transpose=True`` applies the EXIF orientation tag (for user photos; the benchmark protocol does not).
    Raises ``DataError`` for missing, corrupt, truncated or non-image files.
    """
    path = Path(path)
    img = _open_full(path, "image", exif_transpose=exif_transpose)
    try:
        mode = img.mode
        if mode == "RGB":
            return img
        if mode.startswith("I;16") or mode == "I":
            return Image.fromarray(_wide_to_uint8(np.array(img), path), mode="L").convert("RGB")
        if mode == "F":
            a = np.array(img, dtype=np.float64)
            if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
                raise DataError(f"{path}: float image values outside [0, 1]; cannot convert to 8 bits")
            return Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L").convert("RGB")
        if mode == "P":
            # through RGBA so that a palette with transparency converts without a warning; alpha is dropped
            return img.convert("RGBA").convert("RGB")
        return img.convert("RGB")
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot convert image mode {img.mode!r} to RGB ({exc})") from None


def load_mask(path: str | Path) -> np.ndarray:
    """Load a label mask as an (H, W) int64 array of the *raw* stored values.

    Palette (``P``) masks give palette indices (not colours); ``L``, ``1``, ``I;16*`` and ``I`` give their values.
    Colour masks (``RGB``, ``RGBA``, ...) and masks with alpha are rejected: they are not label maps.
    """
    path = Path(path)
    img = _open_full(path, "mask")
    mode = img.mode
    if mode in ("P", "L", "I") or mode.startswith("I;16"):
        return np.array(img).astype(np.int64)
    if mode == "1":
        return np.array(img).astype(np.int64)
    raise DataError(f"{path}: mask has image mode {mode!r}; a label mask must be single-channel "
                    "(palette 'P' indices, 8-bit 'L' or 16-bit values), colour masks are not label maps")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding (``DataError`` if unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as img:
            return img.size
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image header ({exc})") from None
