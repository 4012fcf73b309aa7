"""Inference: centroid assignment, horizontal-flip TTA, bilinear upsampling, dense CRF.

``Predictor`` turns a batch of images into per-pixel class scores and labels following the
field's protocol (CAUSE `test_tr.py`, docs/evaluation.md): the head output of the image and of its mirror are
averaged, upsampled bilinearly to the image size, compared by cosine with the C centroids; the
CRF (optional) refines ``softmax(alpha * cos)``. ``predict_folder`` segments a user's own images
of any size and format and writes label PNGs at their original resolution plus colour overlays.

Output layout of ``predict_folder(inputs, out)`` (see :func:`output_name`)::

    out/labels/<name>.png     class ids (palette PNG: pixel value = class id, colours of figures.palette;
                              over 256 classes a 16-bit grey PNG)
    out/overlays/<name>.png   the colour labels blended over the photo
    out/predictions.json      what was written (merged over calls, see merge_report) and what was skipped

``<name>`` is the input's path relative to the folder given (a file given by itself: its file name), suffix
kept: ``photos/a/x.jpg`` from input ``photos`` -> ``labels/a/x.jpg.png``. Two different inputs that still
share a name (same relative path under two input folders, or a name an earlier call into the same folder
gave another file) get ``~2``, ``~3``, ... before ``.png`` in input order: ``x.jpg~2.png``.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.io import IMAGE_EXTENSIONS, DataError, load_image
from .features import autocast_context
from .model import CauseModel
from .tta import flip_average, upsample
from .utils import atomic_write_bytes

log = logging.getLogger(__name__)

REPORT_NAME = "predictions.json"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [0,1] -> (B,H,W,3) uint8, truncating like ``to_pil_image`` (the protocol)."""
    return (images.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy().copy()


@dataclass
class Prediction:
    scores: torch.Tensor  # (B, C, H, W) alpha * cosine
    labels: torch.Tensor  # (B, H, W) argmax without CRF
    crf_labels: torch.Tensor | None = None  # (B, H, W) after the CRF


class Predictor:
    def __init__(self, model: CauseModel, *, device: torch.device | str = "cpu", amp: str = "off",
                 flip: bool = True, alpha: float = 3.0, crf_runner=None):
        self.model = model.eval()
        self.device = torch.device(device)
        self.amp = amp
        self.flip = flip
        self.alpha = alpha
        self.crf_runner = crf_runner

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.amp):
            if self.flip:
                return flip_average(self.model.embed, images).float()
            return self.model.embed(images).float()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """alpha * cos(upsampled head output, centroids): (B, C, H, W).

        The r-d head output is upsampled one image at a time: a whole batch of full-resolution
        r-d maps (16 x 320 x 640 x 640 in fp32 is 8 GB) never exists, only the C-class scores.
        """
        images = images.to(self.device)
        y = self.embed(images)
        size = size or tuple(images.shape[-2:])
        return torch.cat([self.alpha * self.model.cosine(upsample(y[i:i + 1], size)) for i in range(len(y))])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, crf: bool = False) -> Prediction:
        s = self.scores(images)
        labels = s.argmax(1)
        crf_labels = None
        if crf:
            crf_labels = self.refine(images, s)
        return Prediction(s, labels, crf_labels)

    def refine(self, images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Dense CRF on softmax(scores) with the images (B, 3, H, W) in [0, 1]; returns labels (B, H, W).

        The runner converts the images as the official evaluation does (BGR after the normalise round trip,
        :func:`causeseg.crf.protocol_image`).
        """
        from .crf import CRFRunner

        probs = scores.float().softmax(1).cpu().numpy()
        runner = self.crf_runner or CRFRunner(workers=0)
        out = runner.refine(images.detach().float().cpu(), list(probs))
        return torch.from_numpy(np.stack([o.argmax(0) for o in out])).long()


def _resize_for_model(img: Image.Image, size: int, max_side: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    if max(w, h) * scale > max_side:
        scale = max_side / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return img.resize((nw, nh), Image.BILINEAR)


# -- inputs and output names -----------------------------------------------------------------------------------
def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def collect_inputs(inputs: list[str | Path], exclude: str | Path | None = None) -> list[tuple[Path, str]]:
    """``(file, name)`` for every image to segment, in order, each file once.

    A folder contributes its images (recursive, sorted; hidden files and folders and anything under
    ``exclude``, the output folder, left out) named by their POSIX path relative to it; a file given by itself
    is named by its file name. A missing path or a folder without images is a ``DataError`` naming it.
    """
    skip = Path(exclude).resolve() if exclude is not None else None
    out: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
                            and not _hidden(f.relative_to(p))
                            and not (skip is not None and f.resolve().is_relative_to(skip))),
                           key=lambda f: f.relative_to(p).as_posix())
            if not found:
                raise DataError(f"{p}: no images found (extensions {sorted(IMAGE_EXTENSIONS)})")
            pairs = [(f, f.relative_to(p).as_posix()) for f in found]
        elif p.is_file():
            pairs = [(p, p.name)]
        else:
            raise DataError(f"{p}: no such file or folder")
        for f, name in pairs:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append((f, name))
    return out


def output_name(name: str, source: str, taken: dict[str, str]) -> str:
    """The output name (under ``labels/`` and ``overlays/``) of input ``name`` from file ``source``.

    ``name + ".png"``; if ``taken`` (output name -> source file, from this call and earlier ones) gives it to
    another file, ``name + "~2.png"``, ``"~3"``, ... (the first free one). Records the choice in ``taken``.
    """
    k = 1
    while True:
        out = f"{name}.png" if k == 1 else f"{name}~{k}.png"
        if taken.get(out, source) == source:
            taken[out] = source
            return out
        k += 1


# -- writing -----------------------------------------------------------------------------------------------
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """Class ids -> PNG-ready image: mode ``P`` (value = class id, colours of :func:`causeseg.figures.palette`)
    for up to 256 classes, 16-bit grey (``I;16``, no palette) above."""
    from .figures import palette

    lab = np.asarray(labels)
    if num_classes > 256:
        return Image.fromarray(lab.astype(np.uint16))
    img = Image.fromarray(lab.astype(np.uint8), mode="L")
    img.putpalette(palette(num_classes).reshape(-1).tolist())  # an 'L' image becomes 'P'
    return img


def save_labels(labels: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Write a label PNG (:func:`label_image`) atomically: a crash never leaves half a file."""
    atomic_write_bytes(path, _png_bytes(label_image(labels, num_classes)))


def read_report(out_dir: str | Path) -> dict:
    """The ``predictions.json`` of ``out_dir`` (``{"written": [], "skipped": []}`` when there is none).

    A file that is not such a report is a ``DataError`` naming it (nothing is overwritten).
    """
    path = Path(out_dir) / REPORT_NAME
    if not path.exists():
        return {"written": [], "skipped": []}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable predictions report ({exc}); move it away or choose another "
                        "output folder") from None
    ok = isinstance(data, dict) and all(isinstance(data.get(k, []), list) for k in ("written", "skipped")) \
        and all(isinstance(e, dict) and "labels" in e and "file" in e for e in data.get("written", []))
    if not ok:
        raise DataError(f"{path}: not a causeseg predictions report (expected 'written' entries with 'file' and "
                        "'labels'); move it away or choose another output folder")
    return {"written": list(data.get("written", [])), "skipped": list(data.get("skipped", []))}


def merge_report(out_dir: str | Path, report: dict) -> dict:
    """This call's ``report`` merged into the folder's ``predictions.json`` (returned, not written).

    ``written`` entries are merged by output path (``labels``): this call's replace earlier ones of the same
    path, the others are kept. An earlier ``skipped`` entry is dropped when this call wrote or skipped that
    file again. Sorted by output path / file.
    """
    old = read_report(out_dir)
    written = {e["labels"]: e for e in old["written"]}
    written.update({e["labels"]: e for e in report["written"]})
    redone = {e["file"] for e in report["written"]} | {e["file"] for e in report["skipped"]}
    skipped = [e for e in old["skipped"] if e.get("file") not in redone] + list(report["skipped"])
    return {"written": [written[k] for k in sorted(written)], "skipped": sorted(skipped, key=lambda e: e["file"])}


def _segment(predictor: Predictor, img: Image.Image, resolution: int, max_side: int, crf: bool) -> np.ndarray:
    """Labels (H, W) at the image's own size: the model sees it resized (shorter side ``resolution``)."""
    w, h = img.size
    small = _resize_for_model(img, resolution, max_side)
    x = torch.from_numpy(np.array(small, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    s = predictor.scores(x)  # at the working size
    if crf:
        lab_small = predictor.refine(x, s)[0]
        labels = F.interpolate(lab_small[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    else:
        labels = upsample(s, (h, w)).argmax(1)[0].cpu()
    return labels.numpy()


def predict_folder(predictor: Predictor, inputs: list[str | Path], out_dir: str | Path, *, resolution: int = 320,
                   crf: bool = True, max_side: int | None = None, class_names: list[str] | None = None,
                   progress: bool = True, on_error: str = "raise") -> dict:
    """Segment every image of ``inputs`` (files and/or folders); write ``labels/`` and ``overlays/`` PNGs at
    each image's original size (EXIF orientation applied), named as the module docstring says.

    Returns this call's report: ``written`` (``file`` = absolute input path, ``name``, ``size`` [w, h],
    ``labels`` and ``overlay`` relative to ``out_dir``, ``predictor``: "centroids", "selftrain" or "custom") and
    ``skipped`` (``file``, ``reason``; only with ``on_error='skip'``). Earlier reports of ``out_dir`` reserve
    their output names: a new file never overwrites another file's prediction. Store the result with
    ``merge_report``.
    """
    from tqdm import tqdm

    from .figures import overlay

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    out_dir = Path(out_dir)
    items = collect_inputs(inputs, exclude=out_dir)  # errors before any work
    taken = {e["labels"][len("labels/"):]: e["file"] for e in read_report(out_dir)["written"]
             if str(e["labels"]).startswith("labels/")}
    max_side = max_side or 4 * resolution
    num_classes = predictor.model.num_classes
    predictor_kind = getattr(predictor.model, "predictor_name", "custom")
    written, skipped = [], []
    for path, name in tqdm(items, desc="predict", unit="img", disable=not progress):
        source = str(path.resolve())
        try:
            img = load_image(path, exif_transpose=True)
        except DataError as exc:
            if on_error == "skip":
                log.warning("%s", exc)
                skipped.append({"file": source, "reason": str(exc)})
                continue
            raise
        labels = _segment(predictor, img, resolution, max_side, crf)
        out_name = output_name(name, source, taken)
        save_labels(labels, num_classes, out_dir / "labels" / out_name)
        ov = Image.fromarray(overlay(np.array(img, dtype=np.uint8), labels))
        atomic_write_bytes(out_dir / "overlays" / out_name, _png_bytes(ov))
        written.append({"file": source, "name": name, "size": list(img.size), "labels": f"labels/{out_name}",
                        "overlay": f"overlays/{out_name}", "predictor": predictor_kind})
    return {"written": written, "skipped": skipped}
