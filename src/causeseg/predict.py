"""Inference: centroid assignment, horizontal-flip TTA, bilinear upsampling, dense CRF.

``Predictor`` turns a batch of images into per-pixel class scores and labels following the
field's protocol (cause-reference.md §8): the head output of the image and of its mirror are
averaged, upsampled bilinearly to the image size, compared by cosine with the C centroids; the
CRF (optional) refines ``softmax(alpha * cos)``. ``predict_folder`` segments a user's own images
of any size and format and writes label PNGs at their original resolution plus colour overlays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .features import autocast_context
from .model import CauseModel
from .tta import flip_average, upsample

log = logging.getLogger(__name__)


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
        """Dense CRF on softmax(scores) with the image; returns labels (B, H, W)."""
        from .crf import CRFRunner

        probs = scores.float().softmax(1).cpu().numpy()
        imgs = to_uint8(images)
        runner = self.crf_runner or CRFRunner(workers=0)
        out = runner.run(list(imgs), list(probs))
        return torch.from_numpy(np.stack([o.argmax(0) for o in out])).long()


def _resize_for_model(img: Image.Image, size: int, max_side: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    if max(w, h) * scale > max_side:
        scale = max_side / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return img.resize((nw, nh), Image.BILINEAR)


def predict_folder(predictor: Predictor, inputs: list[Path], out_dir: str | Path, *, resolution: int = 320,
                   crf: bool = True, max_side: int | None = None, class_names: list[str] | None = None,
                   progress: bool = True, on_error: str = "raise") -> dict:
    """Segment each image of ``inputs``; write ``labels/<stem>.png`` (original size) and ``overlays/``.

    Returns a report with the files written and the files skipped (with ``on_error='skip'``).
    """
    from tqdm import tqdm

    from .data.io import DataError, load_image
    from .figures import overlay

    out_dir = Path(out_dir)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    max_side = max_side or 4 * resolution
    written, skipped = [], []
    for path in tqdm(inputs, desc="predict", unit="img", disable=not progress):
        try:
            img = load_image(path, exif_transpose=True)
        except DataError as exc:
            if on_error == "skip":
                log.warning("%s", exc)
                skipped.append({"file": str(path), "reason": str(exc)})
                continue
            raise
        w, h = img.size
        small = _resize_for_model(img, resolution, max_side)
        x = torch.from_numpy(np.array(small, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        s = predictor.scores(x)  # at the working size
        if crf:
            lab_small = predictor.refine(x, s)[0]
            labels = F.interpolate(lab_small[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        else:
            s_full = upsample(s, (h, w))
            labels = s_full.argmax(1)[0].cpu()
        lab = labels.numpy().astype(np.uint8 if predictor.model.num_classes <= 256 else np.uint16)
        stem = Path(path).stem
        Image.fromarray(lab).save(out_dir / "labels" / f"{stem}.png")
        Image.fromarray(overlay(np.array(img, dtype=np.uint8), labels.numpy())).save(out_dir / "overlays" / f"{stem}.png")
        written.append({"file": str(path), "size": [w, h], "labels": str(out_dir / "labels" / f"{stem}.png")})
    return {"written": written, "skipped": skipped}
