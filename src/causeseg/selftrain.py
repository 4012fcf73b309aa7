"""Pseudo-label self-training: a refinement stage beyond the CAUSE paper (off in the paper presets).

As in U2Seg (Niu et al., 2024) and CUPS (Hahn et al., 2025), the clustering model's own CRF-refined cluster
maps of the training images become the targets of a light segmentation head on the frozen backbone features,
and the head (with flip TTA) predicts in place of the centroid assignment. Strictly label-free: the targets
are :func:`pseudo_labels` of the model (``Predictor.scores`` + ``CRFRunner.refine``), no mask is read.

* Targets: the CRF cluster map at the image size, reduced to ``label_stride`` (4 by default) by a majority
  vote per cell (:func:`majority_downsample`).
* Head (:class:`SegHead`): per-channel standardisation (statistics of the training features, fixed), a 3 x 3
  conv to ``hidden`` channels, ReLU, a 1 x 1 conv to C logits at the feature grid. Its logits are upsampled
  bilinearly to the target size and trained with cross-entropy (:func:`pseudo_label_loss`), Adam, seeded
  (same seed and CPU, same head). The horizontal mirror of every image is a second training sample.
* Prediction (:class:`SelfTrainedModel`): ``embed`` gives the head's logits, ``cosine`` passes them through,
  so a plain :class:`causeseg.predict.Predictor` with ``alpha=1`` (:func:`self_trained_predictor`) averages the
  logits of the image and its mirror, upsamples them bilinearly and hands ``softmax(logits)`` to the CRF, and
  :func:`causeseg.evaluate.evaluate` scores it unchanged.

Works for any model with ``backbone``, ``embed`` and ``num_classes`` (a :class:`causeseg.model.CauseModel`,
including the k-means baseline, whose head is the identity). With ``use_embed`` the head also sees the
model's own (unit-normalised) head output next to the backbone features.

In the pipeline: ``selftrain.enabled=true`` (off in every preset) makes :func:`causeseg.train.train_all` run the
stage after Step 3 into ``artifacts/selftrain.pt`` and store the head in ``model.pt`` (:meth:`SelfTrainedModel.state`);
:func:`causeseg.model.load_model` then predicts with it (``predictor="auto"`` or ``"selftrain"``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import run_head, tokens

FORMAT = "causeseg-selftrain-v1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SelfTrainConfig:
    epochs: int = 8
    lr: float = 1e-3
    hidden: int = 128
    batch_size: int = 16
    label_stride: int = 4  # pseudo labels at 1/4 of the image size
    use_embed: bool = False  # also feed the cluster model's head output
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "hidden", "batch_size", "label_stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"selftrain.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"selftrain.lr must be > 0, got {self.lr}")


def settings(cfg: Any) -> SelfTrainConfig:
    """The stage's settings from a :class:`causeseg.config.Config`: its ``selftrain`` section, seeded by
    ``run.seed`` (``selftrain.enabled`` and ``selftrain.crf`` are the caller's business)."""
    s = cfg.selftrain
    return SelfTrainConfig(epochs=s.epochs, lr=s.lr, hidden=s.hidden, batch_size=s.batch_size,
                           label_stride=s.label_stride, use_embed=s.use_embed, seed=cfg.run.seed)


# -- targets ------------------------------------------------------------------------------------------------
def majority_downsample(labels: torch.Tensor, size: tuple[int, int], num_classes: int) -> torch.Tensor:
    """(B, H, W) ids -> (B, h, w): the most frequent id of each cell (adaptive average pooling of one-hots)."""
    one_hot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(one_hot, size).argmax(1)


def label_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Pseudo-label grid of an image: ``ceil(H / stride) x ceil(W / stride)``."""
    return (-(-image_size[0] // stride), -(-image_size[1] // stride))


@torch.no_grad()
def pseudo_labels(predictor: Any, images01: torch.Tensor, *, crf: bool = True,
                  stride: int = 1) -> torch.Tensor:
    """The model's cluster map of each image (B, H, W) int64: ``argmax`` of the dense CRF on
    ``softmax(predictor.scores(images))`` (:meth:`causeseg.predict.Predictor.refine`), or of the scores
    without ``crf``; reduced to ``label_size(.., stride)`` by majority vote when ``stride > 1``."""
    scores = predictor.scores(images01)
    labels = predictor.refine(images01, scores) if crf else scores.argmax(1).cpu()
    if stride > 1:
        labels = majority_downsample(labels, label_size(tuple(labels.shape[-2:]), stride), scores.shape[1])
    return labels.long()


# -- the head -----------------------------------------------------------------------------------------------
class SegHead(nn.Module):
    """Standardise (fixed statistics) -> 3 x 3 conv -> ReLU -> 1 x 1 conv: (B, D, h, w) -> (B, C, h, w)."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 128):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.conv = nn.Conv2d(in_dim, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return self.out(F.relu(self.conv(x)))


def channel_stats(feats: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of (N, D, h, w) features."""
    x = feats.transpose(0, 1).reshape(feats.shape[1], -1).double()
    return x.mean(1).float(), x.std(1).clamp_min(eps).float()


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits (B, C, h, w), upsampled bilinearly to the targets' (B, H, W) size."""
    up = F.interpolate(logits, size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False)
    return F.cross_entropy(up, targets)


def fit_head(feats: torch.Tensor, targets: torch.Tensor, num_classes: int, cfg: SelfTrainConfig,
             log_every: int = 0) -> tuple[SegHead, list[float]]:
    """Train a :class:`SegHead` on features (N, D, h, w) against pseudo labels (N, H, W); returns it in eval
    mode with the mean loss of every epoch. Seeded by ``cfg.seed`` (initialisation and batch order)."""
    if len(feats) != len(targets):
        raise ValueError(f"{len(feats)} feature maps but {len(targets)} pseudo-label maps")
    if int(targets.max()) >= num_classes or int(targets.min()) < 0:
        raise ValueError(f"pseudo labels must lie in [0, {num_classes}), got [{int(targets.min())}, "
                         f"{int(targets.max())}]")
    torch.manual_seed(cfg.seed)
    head = SegHead(feats.shape[1], num_classes, cfg.hidden)
    head.mean.copy_(channel_stats(feats)[0])
    head.std.copy_(channel_stats(feats)[1])
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    history = []
    head.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(feats), generator=g)
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = pseudo_label_loss(head(feats[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(feats))
        if log_every and (epoch + 1) % log_every == 0:
            log.info("selftrain epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, history[-1])
    return head.eval(), history


# -- the self-trained model -----------------------------------------------------------------------------------
@torch.no_grad()
def head_inputs(model: nn.Module, images: torch.Tensor, use_embed: bool) -> torch.Tensor:
    """What the light head sees: the frozen backbone features (B, D, h, w), with ``use_embed`` followed by
    the cluster model's unit-normalised head output on the same grid."""
    feats = model.backbone(images).float()
    if not use_embed:
        return feats
    b, _, h, w = feats.shape
    y = run_head(model.head, tokens(feats), model.codebook, (h, w)).float()
    y = F.normalize(y.transpose(1, 2).reshape(b, -1, h, w), dim=1)
    return torch.cat([feats, y], 1)


class SelfTrainedModel(nn.Module):
    """The cluster model's backbone (and head, with ``use_embed``) + the self-trained :class:`SegHead`.

    Duck-types :class:`causeseg.model.CauseModel` for :class:`causeseg.predict.Predictor`: ``embed`` returns
    the class logits on the feature grid and ``cosine`` returns its input (the logits are the scores).
    """

    predictor_name = "selftrain"  # what metrics.json / predictions.json call its predictions

    def __init__(self, base: nn.Module, head: SegHead, use_embed: bool = False, meta: dict | None = None):
        super().__init__()
        self.base = base.eval()
        self.backbone = base.backbone
        self.seg_head = head.eval()
        self.use_embed = bool(use_embed)
        self.codebook = None  # no concept figure: the prediction does not go through the clusterbook
        self.meta = dict(meta or {})

    @property
    def num_classes(self) -> int:
        return int(self.seg_head.out.out_channels)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.seg_head(head_inputs(self.base, images, self.use_embed))

    def cosine(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def state(self, cfg: SelfTrainConfig | None = None) -> dict:
        """The head as tensors and plain data (what :meth:`save` writes and ``model.pt`` embeds)."""
        conv = self.seg_head.conv
        return {"format": FORMAT, "head": {k: v.detach().cpu() for k, v in self.seg_head.state_dict().items()},
                "use_embed": self.use_embed, "in_dim": int(conv.in_channels), "hidden": int(conv.out_channels),
                "num_classes": self.num_classes, "config": asdict(cfg) if cfg else None, "meta": self.meta}

    def save(self, path: str | Path, cfg: SelfTrainConfig | None = None) -> None:
        from .utils import atomic_torch_save

        atomic_torch_save(self.state(cfg), path)

    @classmethod
    def from_state(cls, obj: Any, base: nn.Module, source: str = "<state>") -> "SelfTrainedModel":
        """The self-trained model of a :meth:`state` dict on the cluster model ``base``; a dict that does not
        fit is an error naming ``source`` (``ValueError``; ``CheckpointError`` for a head of other shapes)."""
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"{source}: not a causeseg self-trained head (expected format '{FORMAT}')")
        missing = [k for k in ("head", "in_dim", "num_classes", "hidden", "use_embed") if k not in obj]
        if missing:
            raise ValueError(f"{source}: the self-trained head lacks {', '.join(missing)}")
        from .backbones.checkpoint import load_state_dict_strict

        head = SegHead(int(obj["in_dim"]), int(obj["num_classes"]), int(obj["hidden"]))
        load_state_dict_strict(head, obj["head"], source)
        return cls(base, head, bool(obj["use_embed"]), obj.get("meta"))

    @classmethod
    def load(cls, path: str | Path, base: nn.Module) -> "SelfTrainedModel":
        """Read a head written by :meth:`save` (``torch.load(weights_only=True)``) onto the cluster model ``base``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"self-trained head not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - not a torch file, truncated, or Python objects (refused)
            raise ValueError(f"{path}: cannot read the self-trained head ({type(exc).__name__})") from None
        return cls.from_state(obj, base, str(path))


def self_trained_predictor(model: SelfTrainedModel, *, flip: bool = True, crf_runner=None,
                           device: torch.device | str = "cpu", amp: str = "off"):
    """A :class:`causeseg.predict.Predictor` over the self-trained head: scores = flip-averaged logits (alpha 1)."""
    from .predict import Predictor

    return Predictor(model, device=device, amp=amp, flip=flip, alpha=1.0, crf_runner=crf_runner)


# -- the stage ------------------------------------------------------------------------------------------------
@torch.no_grad()
def training_set(predictor: Any, batches: Iterable[torch.Tensor], cfg: SelfTrainConfig, *,
                 crf: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Head inputs and pseudo labels of the training images (each image and its mirror): (2N, D, h, w) and
    (2N, H/s, W/s). ``batches`` yields images (B, 3, H, W) in [0, 1] only: nothing else is read."""
    feats, targets = [], []
    for images in batches:
        lab = pseudo_labels(predictor, images, crf=crf, stride=cfg.label_stride)
        for view, t in ((images, lab), (images.flip(-1), lab.flip(-1))):
            feats.append(head_inputs(predictor.model, view.to(predictor.device), cfg.use_embed).cpu())
            targets.append(t)
    return torch.cat(feats), torch.cat(targets)


def self_train(predictor: Any, batches: Iterable[torch.Tensor], cfg: SelfTrainConfig, *, crf: bool = True,
               log_every: int = 0) -> tuple[SelfTrainedModel, dict]:
    """The whole stage: pseudo labels of the cluster model behind ``predictor``, a head trained on them, the
    self-trained model. Returns it with a summary (images, label histogram, loss per epoch)."""
    feats, targets = training_set(predictor, batches, cfg, crf=crf)
    c = predictor.model.num_classes
    head, history = fit_head(feats, targets, c, cfg, log_every=log_every)
    hist = np.bincount(targets.reshape(-1).numpy(), minlength=c)
    summary = {"samples": len(feats), "label_fraction": (hist / hist.sum()).round(4).tolist(), "loss": history,
               "crf_targets": crf, "config": asdict(cfg)}
    return SelfTrainedModel(predictor.model, head, cfg.use_embed, {"selftrain": summary}), summary
