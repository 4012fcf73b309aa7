"""Figures: colour palettes, label colouring and overlays, prediction grids, IoU bars, confusion matrices and
the concept-retrieval figure of the CAUSE appendix.

Image grids are composed with PIL (their pixel size is exact and predictable); charts use matplotlib's
object API on the Agg canvas (no pyplot global state, no display needed). Every ``save_*`` function writes a
PNG atomically (temporary file + rename) and returns its path.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .utils import atomic_write_bytes

__all__ = [
    "palette",
    "colorize",
    "overlay",
    "save_prediction_grid",
    "save_iou_bars",
    "save_confusion",
    "concept_groups",
    "save_concept_retrieval",
]

# Cityscapes colours of labelIds 7..33 (the 27-class protocol order: labelId - 7).
# "polegroup" shares "pole"'s colour in Cityscapes; it is shifted slightly here so that all 27 are distinct.
_CITYSCAPES27 = [
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 190),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100),
    (0, 0, 230), (119, 11, 32),
]


def _voc_colours(n: int) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map (bits of the class id spread over the high bits of R, G, B)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


_NAMED = {
    "cityscapes": lambda: list(_CITYSCAPES27),
    "cityscapes27": lambda: list(_CITYSCAPES27),
    "voc": lambda: _voc_colours(21),
    "pascalvoc": lambda: _voc_colours(21),
}


def _generic_candidates() -> Iterator[tuple[int, int, int]]:
    """Deterministic, well-spread colour sequence (golden-ratio hue steps, cycling saturation/value)."""
    sats = (0.85, 0.55, 1.0, 0.7)
    vals = (0.95, 0.75, 0.55, 0.85, 0.65)
    i = 0
    while True:
        h = (0.07 + i * 0.6180339887498949) % 1.0
        s = sats[(i // 5) % len(sats)]
        v = vals[i % len(vals)]
        r, g, b = colorsys.hsv_to_rgb(h, s, v)
        yield (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))
        i += 1


def palette(n: int, name: str | None = None) -> np.ndarray:
    """``n`` distinct RGB colours, (n, 3) uint8; fixed and prefix-stable (``palette(m)`` = ``palette(n)[:m]``).

    ``name`` selects a dataset palette (``"cityscapes"``/``"cityscapes27"`` in the 27-class order,
    ``"voc"``/``"pascalvoc"``); it is extended with generic colours when ``n`` exceeds its length. The
    generic palette never contains black, which :func:`colorize` reserves for ignored pixels (the VOC palette
    keeps its black background as class 0).
    """
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    if name is not None:
        key = name.lower()
        if key not in _NAMED:
            raise ValueError(f"unknown palette {name!r}; known: {sorted(_NAMED)}")
        base = _NAMED[key]()
    else:
        base = []
    colours = base[:n]
    taken = set(base) | {(0, 0, 0)}
    if len(colours) < n:
        for c in _generic_candidates():
            if c in taken:
                continue
            taken.add(c)
            colours.append(c)
            if len(colours) == n:
                break
    return np.array(colours, dtype=np.uint8).reshape(n, 3)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_labels(labels: Any, what: str = "labels") -> np.ndarray:
    lab = _to_numpy(labels)
    if lab.ndim != 2:
        raise ValueError(f"{what} must be a (H, W) array of class ids, got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise ValueError(f"{what} must hold integer class ids, got dtype {lab.dtype}")
    return lab.astype(np.int64)


def _as_u8_image(image: Any, what: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 from uint8 HWC, float HWC/CHW in [0, 1], or grey (H, W)."""
    img = _to_numpy(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[2] != 3:
        img = img.transpose(1, 2, 0)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what} must be (H, W, 3), (3, H, W) or (H, W), got shape {img.shape}")
    if img.dtype != np.uint8:
        if not np.issubdtype(img.dtype, np.floating):
            raise ValueError(f"{what} must be uint8 or float in [0, 1], got dtype {img.dtype}")
        img = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(img)


def colorize(labels: Any, colours: np.ndarray | None = None) -> np.ndarray:
    """Colour a (H, W) label map: class ``i`` → ``colours[i]``, negative ids (ignore) → black.

    ``colours`` defaults to :func:`palette` (prefix-stable, so a class keeps its colour across images).
    """
    lab = _as_labels(labels)
    top = int(lab.max()) if lab.size else -1
    pal = palette(top + 1) if colours is None else np.asarray(colours, dtype=np.uint8)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise ValueError(f"colours must be (n, 3), got shape {pal.shape}")
    if top >= len(pal):
        raise ValueError(f"label {top} has no colour: the palette has {len(pal)} entries")
    out = np.zeros(lab.shape + (3,), dtype=np.uint8)
    valid = lab >= 0
    out[valid] = pal[lab[valid]]
    return out


def overlay(image_u8: Any, labels: Any, alpha: float = 0.5, colours: np.ndarray | None = None) -> np.ndarray:
    """Blend the colourised labels over the image (ignored pixels keep the image); (H, W, 3) uint8."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _as_u8_image(image_u8)
    lab = _as_labels(labels)
    if img.shape[:2] != lab.shape:
        raise ValueError(f"image of size {img.shape[:2]} and labels of size {lab.shape} differ")
    col = colorize(lab, colours).astype(np.float32)
    out = img.astype(np.float32)
    valid = lab >= 0
    out[valid] = (1.0 - alpha) * out[valid] + alpha * col[valid]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _save_pil(img: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _save_figure(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _font() -> Any:
    return ImageFont.load_default()


def _label_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    """White text on a black box, top-left at ``xy``."""
    x, y = xy
    box = draw.textbbox((x + 2, y + 1), text, font=_font())
    draw.rectangle((x, y, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.text((x + 2, y + 1), text, fill=(255, 255, 255), font=_font())


HEADER_H = 16


def save_prediction_grid(
    path: str | Path,
    images: Sequence[Any],
    preds: Sequence[Any],
    gts: Sequence[Any] | None = None,
    titles: Sequence[str] | None = None,
    colours: np.ndarray | None = None,
    pad: int = 4,
    header: bool = True,
) -> Path:
    """One row per image: image | prediction | ground truth (if ``gts``).

    Predictions should already be mapped to classes (e.g. with :func:`causeseg.metrics.remap_predictions`) so
    that they share the ground truth's colours. Cells are ``max H × max W`` of the inputs (smaller images are
    placed top-left on a grey background). The PNG is ``ncols·W + (ncols+1)·pad`` wide and
    ``[16 if header] + nrows·H + (nrows+1)·pad`` high.
    """
    n = len(images)
    if n == 0:
        raise ValueError("save_prediction_grid: no images")
    if len(preds) != n or (gts is not None and len(gts) != n) or (titles is not None and len(titles) != n):
        raise ValueError(
            f"save_prediction_grid: {n} images but {len(preds)} predictions"
            + (f", {len(gts)} ground truths" if gts is not None else "")
            + (f", {len(titles)} titles" if titles is not None else "")
        )
    imgs = [_as_u8_image(im, f"image {i}") for i, im in enumerate(images)]
    prs = [_as_labels(p, f"prediction {i}") for i, p in enumerate(preds)]
    gtl = [_as_labels(g, f"ground truth {i}") for i, g in enumerate(gts)] if gts is not None else None
    for i, im in enumerate(imgs):
        if prs[i].shape != im.shape[:2] or (gtl is not None and gtl[i].shape != im.shape[:2]):
            raise ValueError(f"save_prediction_grid: row {i} has label maps of a different size than its image")
    if colours is None:
        top = max(int(a.max()) if a.size else -1 for a in prs + (gtl or []))
        colours = palette(top + 1)
    cols = ["image", "prediction"] + (["ground truth"] if gtl is not None else [])
    h = max(im.shape[0] for im in imgs)
    w = max(im.shape[1] for im in imgs)
    head = HEADER_H if header else 0
    width = len(cols) * w + (len(cols) + 1) * pad
    height = head + n * h + (n + 1) * pad
    canvas = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    if header:
        for j, name in enumerate(cols):
            draw.text((pad + j * (w + pad) + 2, 2), name, fill=(255, 255, 255), font=_font())
    for i in range(n):
        y0 = head + pad + i * (h + pad)
        cells = [imgs[i], colorize(prs[i], colours)] + ([colorize(gtl[i], colours)] if gtl is not None else [])
        for j, cell in enumerate(cells):
            canvas.paste(Image.fromarray(cell), (pad + j * (w + pad), y0))
        if titles is not None and titles[i]:
            _label_text(draw, (pad, y0), str(titles[i]))
    return _save_pil(canvas, path)


def _nan_list(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def save_iou_bars(
    path: str | Path,
    per_class_iou: Sequence[float | None],
    class_names: Sequence[str],
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Horizontal bars of per-class IoU (in %), NaN/None classes marked "n/a", mIoU as a dashed line.

    The PNG is ``figsize · dpi`` pixels (default width 6 in, height 0.25 in per class + 1.5 in).
    """
    iou = _nan_list(per_class_iou)
    if len(class_names) != len(iou):
        raise ValueError(f"save_iou_bars: {len(iou)} IoU values but {len(class_names)} class names")
    from matplotlib.figure import Figure

    figsize = figsize or (6.0, 0.25 * len(iou) + 1.5)
    fig = Figure(figsize=figsize, dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(iou))
    vals = np.nan_to_num(iou * 100.0, nan=0.0)
    colours = palette(len(iou)) / 255.0
    ax.barh(y, vals, color=colours, edgecolor="black", linewidth=0.3)
    for k in np.flatnonzero(np.isnan(iou)):
        ax.text(1.0, k, "n/a", va="center", fontsize=7)
    valid = iou[~np.isnan(iou)]
    if valid.size:
        miou = float(valid.mean() * 100.0)
        ax.axvline(miou, color="black", linestyle="--", linewidth=1)
        ax.text(miou, -0.9, f" mIoU {miou:.1f}", fontsize=7, va="bottom")
    ax.set_yticks(y)
    ax.set_yticklabels(list(class_names), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, path)


def save_confusion(
    path: str | Path,
    conf: Any,
    class_names: Sequence[str],
    normalise: bool = True,
    mapping: Any = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Path:
    """Confusion-matrix heat map: rows = ground-truth class, columns = predicted class.

    Args:
        conf: confusion in the orientation of :mod:`causeseg.metrics` — ``conf[prediction, ground truth]``:
            either the (C, C) matched confusion (``compute()["confusion"]``) or a (K, C) cluster confusion
            together with its ``mapping`` (cluster → class).
        normalise: divide each ground-truth row by its total (rows of absent classes stay 0).
        figsize: default (0.3·C + 2.5) inches square; the PNG is ``figsize · dpi`` pixels.
    """
    from .metrics import mapped_confusion

    m = mapped_confusion(_to_numpy(conf), None if mapping is None else np.asarray(mapping))
    c = m.shape[0]
    if len(class_names) != c:
        raise ValueError(f"save_confusion: confusion has {c} classes but {len(class_names)} class names")
    shown = m.T.astype(np.float64)  # rows = ground truth
    if normalise:
        tot = shown.sum(axis=1, keepdims=True)
        shown = np.divide(shown, tot, out=np.zeros_like(shown), where=tot > 0)
    from matplotlib.figure import Figure

    side = 0.3 * c + 2.5
    fig = Figure(figsize=figsize or (side, side), dpi=dpi)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0 if normalise else None, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(np.arange(c))
    ax.set_yticks(np.arange(c))
    fs = 7 if c <= 30 else 4
    ax.set_xticklabels(list(class_names), rotation=90, fontsize=fs)
    ax.set_yticklabels(list(class_names), fontsize=fs)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if c <= 12:
        for i in range(c):
            for j in range(c):
                txt = f"{shown[i, j]:.2f}" if normalise else f"{int(shown[i, j])}"
                ax.text(j, i, txt, ha="center", va="center", fontsize=6, color="white" if shown[i, j] < 0.5 * max(shown.max(), 1e-12) else "black")
    fig.tight_layout()
    return _save_figure(fig, path)


def concept_groups(
    concept_ids: Sequence[int], concept_distance: Any | None = None, phi_plus: float = 0.3
) -> list[np.ndarray]:
    """For each concept ``c``: ``{c} ∪ {j : D_M[c, j] > φ⁺}`` (CAUSE paper, concept-merging threshold), sorted.

    Without ``concept_distance`` each group is the concept alone.
    """
    if concept_distance is None:
        return [np.array([int(c)]) for c in concept_ids]
    d = _to_numpy(concept_distance).astype(np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"concept_distance must be a square (k, k) matrix, got shape {d.shape}")
    out = []
    for c in concept_ids:
        if not 0 <= int(c) < d.shape[0]:
            raise ValueError(f"concept id {c} is outside [0, {d.shape[0]})")
        members = set(np.flatnonzero(d[int(c)] > phi_plus).tolist()) | {int(c)}
        out.append(np.array(sorted(members), dtype=np.int64))
    return out


def save_concept_retrieval(
    path: str | Path,
    images: Sequence[Any],
    concept_maps: Sequence[Any],
    concept_ids: Sequence[int],
    *,
    concept_distance: Any | None = None,
    phi_plus: float = 0.3,
    per_row: int = 5,
    cell_size: tuple[int, int] | None = None,
    alpha: float = 0.55,
    dim: float = 0.3,
    label_width: int = 96,
    pad: int = 4,
) -> Path:
    """Concept retrieval figure (CAUSE appendix): for each clusterbook index, the image regions assigned to it.

    Each row is one concept ``c`` (optionally merged with the concepts whose ``D_M[c, j] > φ⁺``); its cells are
    the ``per_row`` images with the largest share of pixels assigned to the concept group, the group's region
    tinted and the rest dimmed. Empty cells stay grey.

    Args:
        images: N images (H_i, W_i, 3) uint8 (or (3, H, W) floats in [0, 1]).
        concept_maps: N integer maps of concept indices (any resolution, e.g. the patch grid: resized NEAREST).
        concept_ids: clusterbook indices to show (one row each).
        concept_distance: optional (k, k) ``D_M = cos(M, M)`` used to merge similar concepts.
        cell_size: (H, W) of each cell; default: the first image's size.

    The PNG is ``label_width + per_row·(W + pad) + pad`` wide and ``rows·(H + pad) + pad`` high.
    """
    if len(images) != len(concept_maps):
        raise ValueError(f"save_concept_retrieval: {len(images)} images but {len(concept_maps)} concept maps")
    if not len(images) or not len(concept_ids):
        raise ValueError("save_concept_retrieval: needs at least one image and one concept id")
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    imgs = [_as_u8_image(im, f"image {i}") for i, im in enumerate(images)]
    maps = []
    for i, (im, cm) in enumerate(zip(imgs, concept_maps)):
        lab = _as_labels(cm, f"concept map {i}")
        if lab.shape != im.shape[:2]:
            lab = np.array(Image.fromarray(lab.astype(np.int32)).resize((im.shape[1], im.shape[0]), Image.NEAREST))
        maps.append(lab.astype(np.int64))
    ch, cw = cell_size or imgs[0].shape[:2]
    groups = concept_groups(concept_ids, concept_distance, phi_plus)
    colours = palette(len(concept_ids))
    width = label_width + per_row * (cw + pad) + pad
    height = len(concept_ids) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (cid, group) in enumerate(zip(concept_ids, groups)):
        y0 = pad + r * (ch + pad)
        masks = [np.isin(m, group) for m in maps]
        share = np.array([mk.mean() for mk in masks])
        order = [int(i) for i in np.argsort(-share, kind="stable") if share[i] > 0][:per_row]
        text = f"concept {int(cid)}"
        if len(group) > 1:
            text += f"\n+{len(group) - 1} merged"
        text += f"\n{int((share > 0).sum())} images"
        draw.multiline_text((4, y0 + 4), text, fill=(0, 0, 0), font=_font())
        for j in range(per_row):
            x0 = label_width + j * (cw + pad)
            if j >= len(order):
                canvas.paste(Image.new("RGB", (cw, ch), (200, 200, 200)), (x0, y0))
                continue
            i = order[j]
            im = imgs[i].astype(np.float32)
            mk = masks[i]
            cell = im * dim
            cell[mk] = (1.0 - alpha) * im[mk] + alpha * colours[r].astype(np.float32)
            tile = Image.fromarray(np.clip(cell + 0.5, 0, 255).astype(np.uint8))
            if tile.size != (cw, ch):
                tile = tile.resize((cw, ch), Image.BILINEAR)
            canvas.paste(tile, (x0, y0))
    return _save_pil(canvas, path)
