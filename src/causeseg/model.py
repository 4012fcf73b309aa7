"""The trained CAUSE model: backbone + clusterbook + (EMA) head + class centroids, self-contained.

A ``model.pt`` file holds everything needed to segment images except the backbone's weights
(those are large, public, and loaded by path or from the package): the backbone name and
options, the clusterbook, the head's kind, shape and weights, the centroids and the resolved
configuration. Loading is strict: a file that does not fit raises an error that lists the
missing and unexpected keys.

A model trained with ``selftrain.enabled=true`` also holds its self-trained head (``"selftrain"``, the
:meth:`causeseg.selftrain.SelfTrainedModel.state` dict); :func:`load_model` predicts with it by default and with
the Step-3 centroids on request (``predictor="centroids"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .contrastive import assign_concepts
from .heads import MLPHead, TRHead
from .tta import cluster_cosine

FORMAT = "causeseg-model-v1"


def build_head(kind: str, in_dim: int, out_dim: int, *, num_queries: int | None = None, ffn_dim: int = 2048,
               dropout: float = 0.1, extra_residual: bool = True) -> nn.Module:
    if kind == "mlp":
        return MLPHead(in_dim, out_dim, dropout=dropout)
    if kind == "tr":
        if not num_queries:
            raise ValueError("the TR head needs num_queries (tokens per training crop)")
        return TRHead(in_dim, out_dim, num_queries=num_queries, ffn_dim=ffn_dim, dropout=dropout,
                      extra_residual=extra_residual)
    raise ValueError(f"unknown head '{kind}' (mlp or tr)")


def tokens(feats: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h*w, C) tokens (row-major)."""
    return feats.flatten(2).transpose(1, 2)


def run_head(head: nn.Module, t: torch.Tensor, codebook: torch.Tensor, grid: tuple[int, int],
             concepts: torch.Tensor | None = None) -> torch.Tensor:
    """Apply an MLP or TR head to tokens ``t`` (B, N, c); the TR head needs the codebook."""
    if isinstance(head, TRHead):
        if concepts is None:
            concepts = assign_concepts(t, codebook)
        return head(t, codebook, concepts=concepts, grid=grid)
    return head(t)


class CauseModel(nn.Module):
    """Inference model. ``embed`` gives the head's r-d output map; ``cosine`` the class scores."""

    predictor_name = "centroids"  # what metrics.json / predictions.json call its predictions

    def __init__(self, backbone: nn.Module, head: nn.Module, codebook: torch.Tensor, centroids: torch.Tensor,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("codebook", codebook.detach().clone().float())
        self.register_buffer("centroids", centroids.detach().clone().float())
        self.meta = dict(meta or {})
        self.selftrain: dict | None = None  # the self-trained head's state (tensors and plain data), if any

    @property
    def num_classes(self) -> int:
        return int(self.centroids.shape[0])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,H,W) in [0,1] -> head output (B, r, h, w) in fp32."""
        feats = self.backbone(images).float()
        b, _, h, w = feats.shape
        y = run_head(self.head, tokens(feats), self.codebook, (h, w))
        return y.float().transpose(1, 2).reshape(b, -1, h, w)

    def cosine(self, y: torch.Tensor) -> torch.Tensor:
        """(B, r, H, W) -> (B, C, H, W) cosine similarity to the centroids."""
        return cluster_cosine(y, self.centroids)

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path, config: dict | None = None) -> None:
        from .utils import atomic_torch_save

        atomic_torch_save(
            {
                "format": FORMAT,
                "meta": self.meta,
                "config": config,
                "head": self.head.state_dict(),
                "codebook": self.codebook.cpu(),
                "centroids": self.centroids.cpu(),
                **({"selftrain": self.selftrain} if self.selftrain is not None else {}),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | Path, *, backbone_weights: str | None = None, device: str | torch.device = "cpu",
             backbone: nn.Module | None = None) -> "CauseModel":
        from .backbones import build_backbone

        path = Path(path)
        obj = read_model_file(path)
        meta = obj["meta"]
        if backbone is None:
            bb = meta["backbone"]
            weights = backbone_weights or bb.get("weights")
            backbone = build_backbone(bb["name"], weights=weights, pretrained=bb.get("pretrained", True),
                                      **bb.get("options", {}))
        h = meta["head"]
        head = build_head(h["kind"], h["in_dim"], h["out_dim"], num_queries=h.get("num_queries"),
                          ffn_dim=h.get("ffn_dim", 2048), dropout=h.get("dropout", 0.1),
                          extra_residual=h.get("extra_residual", True))
        from .backbones.checkpoint import load_state_dict_strict

        load_state_dict_strict(head, obj["head"], str(path))
        _check_fits_backbone(path, backbone, h["in_dim"], obj["codebook"])
        _check_backbone_digest(path, backbone, meta["backbone"].get("digest"))
        model = cls(backbone, head, obj["codebook"], obj["centroids"], meta)
        model.config = obj.get("config")
        model.selftrain = obj.get("selftrain")
        return model.to(device).eval()


PREDICTORS = ("auto", "selftrain", "centroids")


def load_model(path: str | Path, *, backbone_weights: str | None = None, device: str | torch.device = "cpu",
               predictor: str = "auto") -> nn.Module:
    """The model of a ``model.pt`` as it predicts: ``predictor="auto"`` gives the self-trained head
    (a :class:`causeseg.selftrain.SelfTrainedModel`, scores = logits, use alpha 1) when the file holds one and
    the Step-3 centroids (a :class:`CauseModel`) otherwise; ``"selftrain"`` requires the head, ``"centroids"``
    ignores it. Either carries ``predictor_name`` ("selftrain" or "centroids")."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor={predictor!r} is not one of {PREDICTORS}")
    model = CauseModel.load(path, backbone_weights=backbone_weights, device=device)
    if predictor == "centroids" or (predictor == "auto" and model.selftrain is None):
        return model
    if model.selftrain is None:
        raise ValueError(f"{path}: holds no self-trained head (trained without selftrain.enabled=true); "
                         f"use --predictor centroids or auto")
    from .selftrain import SelfTrainedModel

    return SelfTrainedModel.from_state(model.selftrain, model, f"{path} (self-trained head)").to(device).eval()


_REQUIRED = ("meta", "head", "codebook", "centroids")


def read_model_file(path: str | Path) -> dict:
    """Read a ``model.pt`` as tensors and plain data only (``torch.load(weights_only=True)``).

    A file that needs more (arbitrary Python objects, which unpickling would execute) is refused,
    as are files that are not causeseg models or lack entries; every error names the file.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        from .backbones.checkpoint import holds_python_objects

        if not holds_python_objects(exc):
            raise ValueError(f"{path}: cannot read the model file: not a torch file (corrupt, truncated or another "
                             f"format)") from exc
        raise ValueError(f"{path}: refused: the file holds Python objects beyond tensors and plain data, which "
                         f"causeseg never unpickles (loading them could run code). It is not a model written by "
                         f"causeseg.") from exc
    except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, ...
        raise ValueError(f"{path}: cannot read the model file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path}: not a causeseg model file (expected format '{FORMAT}')")
    missing = [k for k in _REQUIRED if k not in obj]
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    missing += [f"meta.{k}" for k in ("backbone", "head") if "meta" in obj and k not in meta]
    missing += [f"meta.head.{k}" for k in ("kind", "in_dim", "out_dim")
                if isinstance(meta.get("head"), dict) and k not in meta["head"]]
    if missing:
        raise ValueError(f"{path}: the model file lacks {', '.join(missing)} (damaged, or written by another tool)")
    return obj


def _check_fits_backbone(path: Path, backbone: nn.Module, in_dim: int, codebook: torch.Tensor) -> None:
    """The head and clusterbook were trained on ``in_dim``-d features: the backbone must give those."""
    dim = getattr(backbone, "embed_dim", None) or getattr(backbone, "out_dim", None) or getattr(backbone, "dim", None)
    if dim is None:
        try:
            p = next(backbone.parameters())
            with torch.no_grad():
                dim = backbone(torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype)).shape[1]
        except Exception:  # noqa: BLE001 - cannot tell: the forward pass will say
            return
    if int(dim) != int(in_dim) or int(codebook.shape[1]) != int(in_dim):
        raise ValueError(f"{path}: the head was trained on {in_dim}-d features but the backbone gives {dim}-d "
                         f"(wrong --backbone-weights or backbone options?)")


def _check_backbone_digest(path: Path, backbone: nn.Module, trained: str | None) -> None:
    """The backbone must carry the weights the model was trained on (recorded as a digest since v0.1)."""
    if not trained:
        return  # imported official models and older files record none
    from .provenance import state_digest

    now = state_digest(backbone)
    if now != trained:
        raise ValueError(f"{path}: the backbone's weights (digest {now}) are not the ones this model was trained on "
                         f"(digest {trained}); pass the original --backbone-weights")
