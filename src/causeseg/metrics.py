"""Segmentation metrics: dataset-level confusion, cluster-to-class matching, mIoU / pAcc.

Protocol (cause-reference.md §8.2, field-results.md §2):

* the confusion ``H[pred, gt]`` is accumulated over the **whole** evaluation split; pixels whose ground truth
  is outside ``[0, C)`` (``-1`` = ignore) or whose prediction is outside ``[0, K)`` are not counted;
* clusters are matched to classes **once**, on that dataset-level confusion, with the Hungarian algorithm
  (``linear_sum_assignment(H, maximize=True)``, one-to-one, K = C). Per-image matching is a different and
  inflated protocol and is deliberately not offered here;
* ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` (NaN when the denominator is 0), ``mIoU`` = mean over the classes whose
  IoU is not NaN, ``pAcc = Σ TP / Σ H`` over all counted pixels.

Over-clustering (K > C) with a many-to-one majority mapping is a *different* protocol
(:func:`majority_match`); its numbers must be reported separately and never next to one-to-one numbers as if
they were comparable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "confusion_matrix",
    "hungarian_match",
    "majority_match",
    "mapped_confusion",
    "remap_predictions",
    "segmentation_scores",
    "to_json",
    "UnsupervisedMetrics",
    "SupervisedMetrics",
]


def _as_long_tensor(x: Any, what: str, source: str | None) -> torch.Tensor:
    where = f" ({source})" if source else ""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}{where} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{what}{where} must hold integer ids, got dtype {x.dtype}")
    return x.long()


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    gt: torch.Tensor | np.ndarray,
    num_clusters: int,
    num_classes: int,
    *,
    source: str | None = None,
) -> torch.Tensor:
    """Confusion ``H[k, c]`` = number of pixels predicted as cluster ``k`` whose ground truth is class ``c``.

    Args:
        pred: predicted cluster ids, any shape (e.g. (B, H, W)), integer.
        gt: ground-truth class ids, same shape as ``pred``; ``-1`` (or anything outside ``[0, num_classes)``)
            is ignored.
        num_clusters: K, number of rows; a prediction outside ``[0, K)`` is an error (never silently dropped).
        num_classes: C, number of columns.
        source: optional name (file, image) used in error messages.

    Returns:
        (K, C) int64 tensor on the device of ``pred``.
    """
    where = f" ({source})" if source else ""
    if num_clusters <= 0 or num_classes <= 0:
        raise ValueError(f"num_clusters and num_classes must be positive, got {num_clusters}, {num_classes}{where}")
    pred_t = _as_long_tensor(pred, "pred", source)
    gt_t = _as_long_tensor(gt, "gt", source)
    if pred_t.shape != gt_t.shape:
        raise ValueError(
            f"prediction shape {tuple(pred_t.shape)} does not match ground-truth shape {tuple(gt_t.shape)}{where}"
        )
    gt_t = gt_t.to(pred_t.device)
    pred_f = pred_t.reshape(-1)
    gt_f = gt_t.reshape(-1)
    if pred_f.numel() and (int(pred_f.min()) < 0 or int(pred_f.max()) >= num_clusters):
        raise ValueError(f"predicted cluster ids span [{int(pred_f.min())}, {int(pred_f.max())}] but the confusion has "
                         f"{num_clusters} clusters: predictions outside [0, {num_clusters}) cannot be scored{where}")
    valid = (gt_f >= 0) & (gt_f < num_classes)
    idx = pred_f[valid] * num_classes + gt_f[valid]
    counts = torch.bincount(idx, minlength=num_clusters * num_classes)
    return counts.reshape(num_clusters, num_classes).to(torch.int64)


def _as_numpy_conf(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(conf, torch.Tensor):
        conf = conf.detach().cpu().numpy()
    conf = np.asarray(conf)
    if conf.ndim != 2:
        raise ValueError(f"confusion matrix must be 2-D (clusters, classes), got shape {conf.shape}")
    if conf.size and conf.min() < 0:
        raise ValueError("confusion matrix holds negative counts")
    return conf


def hungarian_match(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """One-to-one cluster → class matching maximising the matched pixel count (the protocol's matching).

    Solves ``linear_sum_assignment(conf, maximize=True)`` on the **dataset-level** (K, C) confusion.
    K must not exceed C (with K < C some classes are never predicted). For K > C use
    :func:`majority_match`, which is a different (many-to-one, over-clustering) protocol.

    Returns:
        int64 array of length K; ``mapping[k]`` is the class assigned to cluster ``k``.
    """
    c = _as_numpy_conf(conf)
    k, n_cls = c.shape
    if k > n_cls:
        raise ValueError(
            f"Hungarian (one-to-one) matching needs clusters <= classes, got {k} clusters for {n_cls} classes; "
            "many-to-one matching of over-clustered predictions is a different protocol: use majority_match"
        )
    rows, cols = linear_sum_assignment(c.astype(np.float64), maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_match(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """Many-to-one mapping: each cluster → the class it overlaps most (over-clustering protocol, K ≥ C).

    This is **not** the one-to-one protocol of the paper tables; numbers obtained with it must be reported
    separately (field-results.md §3, "Over-clustering + many-to-one mapping"). Clusters that were never
    predicted on a labelled pixel are mapped to -1 (they then count as wrong wherever they occur).
    """
    c = _as_numpy_conf(conf)
    mapping = c.argmax(axis=1).astype(np.int64)
    mapping[c.sum(axis=1) == 0] = -1
    return mapping


def mapped_confusion(conf: torch.Tensor | np.ndarray, mapping: np.ndarray | None = None) -> np.ndarray:
    """Aggregate a (K, C) cluster×class confusion into a (C, C) predicted-class×class confusion.

    Row ``mapping[k]`` receives row ``k``; rows of clusters mapped to ``-1`` are dropped (their pixels are
    still counted in the total by :func:`segmentation_scores`). ``mapping=None`` means identity (K = C).
    """
    c = _as_numpy_conf(conf).astype(np.int64)
    k, n_cls = c.shape
    if mapping is None:
        if k != n_cls:
            raise ValueError(f"identity mapping needs a square confusion, got shape {c.shape}")
        return c.copy()
    mapping = np.asarray(mapping, dtype=np.int64)
    if mapping.shape != (k,):
        raise ValueError(f"mapping has shape {mapping.shape}, expected ({k},) for a confusion of shape {c.shape}")
    if mapping.size and (mapping.max() >= n_cls or mapping.min() < -1):
        raise ValueError(f"mapping values must be in [-1, {n_cls}), got [{mapping.min()}, {mapping.max()}]")
    out = np.zeros((n_cls, n_cls), dtype=np.int64)
    keep = mapping >= 0
    np.add.at(out, mapping[keep], c[keep])
    return out


def remap_predictions(pred: torch.Tensor | np.ndarray, mapping: np.ndarray) -> torch.Tensor | np.ndarray:
    """Apply a cluster → class mapping to a prediction map (ids outside the mapping become -1)."""
    mapping = np.asarray(mapping, dtype=np.int64)
    lut = np.concatenate([mapping, np.array([-1], dtype=np.int64)])  # last slot: out of range
    if isinstance(pred, torch.Tensor):
        p = pred.long()
        p = torch.where((p >= 0) & (p < len(mapping)), p, torch.full_like(p, len(mapping)))
        return torch.from_numpy(lut).to(p.device)[p]
    p = np.asarray(pred).astype(np.int64)
    p = np.where((p >= 0) & (p < len(mapping)), p, len(mapping))
    return lut[p]


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def segmentation_scores(conf: torch.Tensor | np.ndarray, mapping: np.ndarray | None = None) -> dict[str, Any]:
    """Per-class IoU, mIoU, pixel accuracy and mean precision of a (K, C) confusion under ``mapping``.

    * ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``; NaN where the denominator is 0 (class absent and never predicted).
    * ``mIoU`` = mean of the non-NaN IoUs (CAUSE/STEGO convention).
    * ``pAcc = Σ_c TP_c / (number of counted pixels)``.
    * ``precision_c = TP_c / (TP_c + FP_c)`` (NaN if class never predicted), ``mean_precision`` = nan-mean.

    Args:
        conf: (K, C) confusion ``H[cluster, class]`` from :func:`confusion_matrix`.
        mapping: cluster → class (length K, -1 = unmapped); ``None`` = identity.

    Returns:
        dict with lists ``per_class_iou``, ``per_class_precision`` (floats, NaN allowed), floats ``miou``,
        ``pacc``, ``mean_precision``, int ``num_pixels``, list ``mapping`` and ``confusion``: the (C, C)
        confusion *after* mapping (rows = predicted class, columns = ground-truth class) as nested lists.
        Use :func:`to_json` before ``json.dump``.
    """
    raw = _as_numpy_conf(conf).astype(np.int64)
    total = int(raw.sum())
    m = mapped_confusion(raw, mapping)
    tp = np.diag(m).astype(np.float64)
    fp = m.sum(axis=1) - tp  # predicted as c, other class
    fn = raw.sum(axis=0) - tp  # class c, not predicted as c (incl. unmapped clusters)
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
        pden = tp + fp
        prec = np.where(pden > 0, tp / np.where(pden > 0, pden, 1), np.nan)
    if mapping is None:
        mapping_out = list(range(raw.shape[0]))
    else:
        mapping_out = [int(v) for v in np.asarray(mapping)]
    return {
        "per_class_iou": [float(v) for v in iou],
        "per_class_precision": [float(v) for v in prec],
        "miou": _nanmean(iou),
        "pacc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_precision": _nanmean(prec),
        "num_pixels": total,
        "mapping": mapping_out,
        "confusion": m.tolist(),
    }


def to_json(obj: Any) -> Any:
    """Recursively convert to JSON-safe values: NaN/inf → None, numpy/torch scalars and arrays → Python."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_json(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


class UnsupervisedMetrics:
    """Accumulates a dataset-level (K, C) confusion and scores it after matching clusters to classes.

    ``compute()`` matches on the **cumulative** confusion of everything passed to ``update`` (never per image).

    Args:
        num_classes: C.
        num_clusters: K (default C).
        matching: ``"hungarian"`` (one-to-one, the protocol; needs K ≤ C) or ``"majority"`` (many-to-one
            over-clustering protocol, reported separately).

    For distributed evaluation, all-reduce (sum) :attr:`confusion` across ranks (see :meth:`all_reduce`) or
    merge the ``state_dict`` of every rank with :meth:`merge` before ``compute()``.
    """

    def __init__(self, num_classes: int, num_clusters: int | None = None, *, matching: str = "hungarian") -> None:
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.num_clusters = int(num_clusters if num_clusters is not None else num_classes)
        if self.num_clusters <= 0:
            raise ValueError(f"num_clusters must be positive, got {num_clusters}")
        if matching not in ("hungarian", "majority"):
            raise ValueError(f"matching must be 'hungarian' or 'majority', got {matching!r}")
        if matching == "hungarian" and self.num_clusters > self.num_classes:
            raise ValueError(
                f"{self.num_clusters} clusters > {self.num_classes} classes: one-to-one Hungarian matching is "
                "impossible; pass matching='majority' for the (separate) many-to-one over-clustering protocol"
            )
        self.matching = matching
        self.confusion = torch.zeros(self.num_clusters, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Zero the accumulated confusion."""
        self.confusion = torch.zeros(self.num_clusters, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray, source: str | None = None) -> None:
        """Add a batch: ``pred`` cluster ids and ``gt`` class ids (-1 ignore), same shape."""
        conf = confusion_matrix(pred, gt, self.num_clusters, self.num_classes, source=source)
        if self.confusion.device != conf.device:
            self.confusion = self.confusion.to(conf.device)
        self.confusion += conf

    def match(self) -> np.ndarray:
        """Cluster → class mapping computed on the whole accumulated confusion."""
        if self.matching == "hungarian":
            return hungarian_match(self.confusion)
        return majority_match(self.confusion)

    def compute(self) -> dict[str, Any]:
        """Scores (see :func:`segmentation_scores`) plus ``matching``, ``num_clusters`` and
        ``cluster_confusion`` (the raw (K, C) cluster × class confusion the matching was computed on)."""
        mapping = self.match()
        out = segmentation_scores(self.confusion, mapping)
        out["matching"] = self.matching
        out["num_clusters"] = self.num_clusters
        out["cluster_confusion"] = self.confusion.detach().cpu().tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "confusion": self.confusion.detach().cpu().clone(),
            "num_classes": self.num_classes,
            "num_clusters": self.num_clusters,
            "matching": self.matching,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        conf = torch.as_tensor(state["confusion"], dtype=torch.int64)
        if tuple(conf.shape) != (self.num_clusters, self.num_classes):
            raise ValueError(
                f"state confusion has shape {tuple(conf.shape)}, expected ({self.num_clusters}, {self.num_classes})"
            )
        self.confusion = conf.clone()

    def merge(self, other: "UnsupervisedMetrics | dict[str, Any]") -> None:
        """Add another accumulator's confusion (an instance or its ``state_dict``)."""
        conf = other.confusion if isinstance(other, UnsupervisedMetrics) else torch.as_tensor(other["confusion"])
        if tuple(conf.shape) != tuple(self.confusion.shape):
            raise ValueError(f"cannot merge confusion of shape {tuple(conf.shape)} into {tuple(self.confusion.shape)}")
        self.confusion += conf.to(self.confusion.device, torch.int64)

    def all_reduce(self) -> None:
        """Sum the confusion over all ranks when ``torch.distributed`` is initialised (no-op otherwise).

        With the NCCL backend the confusion must live on the current CUDA device; move it there first
        (``metrics.confusion = metrics.confusion.cuda()``).
        """
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.confusion, op=dist.ReduceOp.SUM)


class SupervisedMetrics(UnsupervisedMetrics):
    """Metrics with the identity class mapping (predictions are class ids, e.g. from the linear probe)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, num_classes)
        self.matching = "identity"

    def match(self) -> np.ndarray:
        return np.arange(self.num_classes, dtype=np.int64)
