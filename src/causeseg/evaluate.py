"""Evaluation under the field's protocol, with and without the dense CRF.

The confusion matrix is accumulated over the whole split (sharded over ranks and all-reduced
when distributed) and matched once with the Hungarian algorithm; mIoU is the nan-mean of the
per-class IoU, pAcc the overall pixel accuracy. Labels are only read here, after training.
``metrics.json`` names the predictor scored: ``"centroids"`` (Step 3), ``"selftrain"`` (the self-trained head) or
``"custom"`` (a duck-typed predictor without either).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from . import distributed as D
from .data.datasets import collate
from .metrics import UnsupervisedMetrics, to_json
from .predict import Predictor, to_uint8
from .utils import atomic_write_json

log = logging.getLogger(__name__)


def evaluate(predictor: Predictor, dataset, *, num_classes: int, batch_size: int = 16, crf: bool = True,
             crf_workers: int = 0, crf_timeout: float | None = None, out_dir: str | Path | None = None,
             class_names: list[str] | None = None, figures: int = 8, progress: bool = True,
             num_workers: int = 0) -> dict[str, Any]:
    """Score ``predictor`` on a labelled dataset; writes ``metrics.json`` and figures to ``out_dir``."""
    from tqdm import tqdm

    from .crf import CRFRunner

    ctx = D.current()
    if getattr(dataset, "with_labels", True) is False:
        raise ValueError(f"{getattr(dataset, 'source', dataset)}: evaluation needs masks (a labelled dataset)")
    idx = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    plain = UnsupervisedMetrics(num_classes)
    single = UnsupervisedMetrics(num_classes) if predictor.flip else None  # the official "without CRF" number
    refined = UnsupervisedMetrics(num_classes) if crf else None
    keep: dict[str, list] = {"images": [], "gts": [], "preds": [], "crf": [], "concepts": []}
    crf_seconds = 0.0
    n_images = 0
    runner = CRFRunner(workers=crf_workers, timeout=crf_timeout) if crf else None
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=len(idx), desc="evaluate", unit="img", disable=not (progress and ctx.is_main))
        for batch in loader:
            if "label" not in batch:
                raise ValueError(f"{getattr(dataset, 'source', 'dataset')}: images without masks "
                                 f"({batch['name'][:3]}): evaluation needs a mask for every image")
            images, labels = batch["image"], batch["label"]
            scores, single_scores = _scores(predictor, images, want_single=single is not None)
            pred = scores.argmax(1).cpu()
            plain.update(pred, labels)
            if single is not None:
                single.update(single_scores.argmax(1).cpu(), labels)
            crf_pred = None
            if runner is not None:
                t = time.perf_counter()
                # the official CRF input: BGR after the normalise / un-normalise round trip (crf.protocol_image)
                out = runner.refine(images.float().cpu(), list(scores.float().softmax(1).cpu().numpy()))
                crf_seconds += time.perf_counter() - t
                crf_pred = torch.from_numpy(np.stack([o.argmax(0) for o in out])).long()
                refined.update(crf_pred, labels)
            n_images += len(images)
            bar.update(len(images))
            if len(keep["images"]) < figures:
                take = figures - len(keep["images"])
                keep["images"] += list(to_uint8(images[:take]))
                keep["gts"] += list(labels[:take].numpy())
                keep["preds"] += list(pred[:take].numpy())
                keep["concepts"] += _concept_maps(predictor, images[:take])
                if crf_pred is not None:
                    keep["crf"] += list(crf_pred[:take].numpy())
        bar.close()
    finally:
        if runner is not None:
            crf_timeouts = int(getattr(runner, "num_timeouts", 0))
            runner.close()
    # the confusion of the whole split, then one Hungarian matching
    reduce_device = predictor.device if predictor.device.type == "cuda" else torch.device("cpu")
    for m in (plain, single, refined):
        if m is not None and ctx.enabled:
            m.confusion = m.confusion.to(reduce_device)  # NCCL reduces CUDA tensors only
            m.all_reduce()
            m.confusion = m.confusion.cpu()
    total_images = torch.tensor([n_images], device=reduce_device)
    D.all_reduce_sum(total_images)
    res: dict[str, Any] = {"num_images": int(total_images.item()), "num_classes": num_classes,
                           "protocol": "Hungarian matching on the dataset-level confusion matrix (one-to-one)",
                           "predictor": getattr(getattr(predictor, "model", None), "predictor_name", "custom"),
                           "flip_tta": predictor.flip, "alpha": predictor.alpha,
                           "seconds": time.perf_counter() - t0, "settings": _SETTINGS}
    res["no_crf"] = plain.compute()
    if single is not None:
        res["no_crf_single_view"] = single.compute()
    if refined is not None:
        res["crf"] = refined.compute()
        res["crf_seconds_per_image"] = crf_seconds / max(n_images, 1)
        res["crf_timeouts"] = crf_timeouts
    if out_dir is not None and ctx.is_main:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(to_json(res), out_dir / "metrics.json")
        try:  # figures are a courtesy: they never cost the user the metrics written above
            _figures(out_dir / "figures", keep, res, class_names, num_classes,
                     codebook=getattr(predictor.model, "codebook", None))
        except Exception as exc:  # noqa: BLE001
            log.warning("figures not written (%s: %s); metrics.json is complete", type(exc).__name__, exc)
    return res


_SETTINGS = {
    "no_crf_single_view": "one view, no flip, no CRF: the official code's 'without CRF' number (test_without_crf)",
    "no_crf": "flip TTA (head outputs of the image and its mirror averaged), no CRF",
    "crf": "flip TTA + dense CRF: the official code's reported setting",
}


def _scores(predictor: Predictor, images: torch.Tensor, want_single: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class scores of the predictor's setting and, with flip TTA, of the single (unflipped) view, from the
    same two forward passes: ``tta = (y + unflip(y_flip)) / 2`` as :func:`causeseg.tta.flip_average` computes."""
    if not (want_single and predictor.flip):
        return predictor.scores(images), None
    from .features import autocast_context
    from .tta import hflip, upsample

    x = images.to(predictor.device)
    with torch.no_grad(), autocast_context(predictor.device, predictor.amp):
        y = predictor.model.embed(x)
        y_flip = predictor.model.embed(hflip(x))
    y, y_flip = y.float(), y_flip.float()
    tta = ((y + hflip(y_flip)) / 2).float()
    size = tuple(x.shape[-2:])

    def score(maps):
        return torch.cat([predictor.alpha * predictor.model.cosine(upsample(maps[i:i + 1], size))
                          for i in range(len(maps))])

    return score(tta), score(y)



def _concept_maps(predictor: Predictor, images: torch.Tensor) -> list:
    """Clusterbook index of every backbone token (for the concept-retrieval figure)."""
    from .contrastive import assign_concepts
    from .model import tokens

    model = predictor.model
    if getattr(model, "codebook", None) is None or model.codebook.shape[0] < 2:
        return []
    with torch.no_grad():
        feats = model.backbone(images.to(predictor.device)).float()
        q = assign_concepts(tokens(feats), model.codebook)
    return list(q.reshape(feats.shape[0], *feats.shape[-2:]).cpu().numpy())


def _figures(fig_dir: Path, keep: dict, res: dict, class_names, num_classes: int, codebook=None) -> None:
    from .figures import save_concept_retrieval, save_confusion, save_iou_bars, save_prediction_grid

    fig_dir.mkdir(parents=True, exist_ok=True)
    best = res.get("crf", res["no_crf"])
    mapping = np.asarray(best["mapping"]) if "mapping" in best else np.arange(num_classes)
    names = class_names if class_names and len(class_names) == num_classes else [f"class {i}"
                                                                                 for i in range(num_classes)]
    if keep["images"]:
        preds = [mapping[p] for p in (keep["crf"] or keep["preds"])]
        save_prediction_grid(fig_dir / "predictions.png", keep["images"], preds, keep["gts"])
    if "per_class_iou" in best:
        save_iou_bars(fig_dir / "iou.png", best["per_class_iou"], names)
    if "confusion" in best:
        save_confusion(fig_dir / "confusion.png", np.asarray(best["confusion"]), names)
    if keep["concepts"] and codebook is not None:
        from .contrastive import concept_distance

        counts = np.bincount(np.concatenate([c.ravel() for c in keep["concepts"]]), minlength=codebook.shape[0])
        top = [int(c) for c in np.argsort(-counts)[:6] if counts[c] > 0]
        save_concept_retrieval(fig_dir / "concepts.png", keep["images"], keep["concepts"], top,
                               concept_distance=concept_distance(codebook.float().cpu()).numpy(), phi_plus=0.3)
    (fig_dir / "README.txt").write_text(json.dumps({"figures": sorted(p.name for p in fig_dir.glob("*.png"))}))
