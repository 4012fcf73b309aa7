"""Reading images and label masks, with errors that name the file and the problem."""

from __future__ import annotations

import os
import threading
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


#: Environment variable holding the largest image (in pixels) that is opened: a count, or 0 / none = no limit.
MAX_PIXELS_ENV = "CAUSESEG_MAX_PIXELS"
#: PIL's own guard against decompression bombs (89,478,485 pixels), the default limit.
DEFAULT_MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
_PIL_LIMIT_LOCK = threading.Lock()


def set_max_image_pixels(n: int | None) -> None:
    """Largest image (width x height) that :func:`load_image` / :func:`load_mask` open; ``None`` = no limit.

    Stored in the ``CAUSESEG_MAX_PIXELS`` environment variable, so worker processes started afterwards
    (data loaders) use it too. Larger images are a ``DataError`` that names the file, its pixel count and
    the limit (PIL's guard against decompression bombs, not corruption). Only this module's readers use it:
    PIL's global ``Image.MAX_IMAGE_PIXELS`` is left as it is.
    """
    if n is None:
        os.environ[MAX_PIXELS_ENV] = "none"
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max image pixels must be a positive integer or None (no limit), got {n!r}")
    os.environ[MAX_PIXELS_ENV] = str(n)


def max_image_pixels() -> int | None:
    """The limit in force: ``CAUSESEG_MAX_PIXELS`` (a positive count; ``0`` or ``none`` = no limit) or PIL's default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    if raw.lower() in ("none", "0"):
        return None
    try:
        n = int(raw.replace("_", ""))
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={raw!r}: expected a positive pixel count, or 0 / none for no limit")
    return n


def _pil_open(path: Path, limit: int | None) -> Image.Image:
    """``Image.open`` with PIL's size guard set to ``limit`` for this call only (the global is restored, so other
    code keeps PIL's own setting). PIL warns above the guard and raises above twice it."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = limit
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header with no size guard (only to word the too-large message)."""
    try:
        with _pil_open(path, None) as img:
            return img.size
    except Exception:  # noqa: BLE001 - only used to improve a message
        return None


def _too_large(path: Path, limit: int | None) -> DataError:
    size = _header_size(path)
    what = f"{size[0]}x{size[1]} = {size[0] * size[1]:,} pixels" if size else "its pixel count"
    return DataError(f"{path}: image is very large ({what}), over the limit of {limit:,} pixels (a guard against "
                     f"decompression bombs, not a corrupt file); raise it with --max-pixels N or "
                     f"{MAX_PIXELS_ENV}=N (0 or none = no limit)")


def _open_checked(path: Path, what: str = "image") -> Image.Image:
    """``Image.open`` (header only) under the pixel limit in force, with errors that name the file.

    A larger image is a ``DataError`` saying it is large (pixel count and limit), not that it is corrupt.
    """
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _pil_open(path, limit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(path, limit) from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (PIL cannot identify its format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: corrupt or truncated {what} ({type(exc).__name__}: {exc})") from None


def _open_full(path: Path, what: str, exif_transpose: bool = False) -> Image.Image:
    """Open ``path`` and force a full decode so that truncated or corrupt files fail here.

    The returned image holds no open file handle (multi-frame formats keep theirs, so those are copied).
    """
    if not path.exists():
        raise DataError(f"{path}: {what} file not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} path is not a file")
    img = _open_checked(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            out = ImageOps.exif_transpose(img) if exif_transpose else img
            if out is img and getattr(img, "fp", None) is not None:
                out = img.copy()
            if out is not img:
                img.close()
            return out
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
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
    """(width, height) of an image file from its header, without decoding (``DataError`` if unreadable or over
    the pixel limit)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with _open_checked(path) as img:
        return img.size
