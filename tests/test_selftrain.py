"""Pseudo-label self-training (causeseg.selftrain): targets, head, prediction, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from causeseg.crf import CRFRunner
from causeseg.evaluate import evaluate
from causeseg.model import CauseModel
from causeseg.predict import Predictor
from causeseg.selftrain import (SelfTrainConfig, SelfTrainedModel, fit_head, label_size, majority_downsample,
                                pseudo_labels, self_train, self_trained_predictor)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster than several on a busy machine (results do not depend on it
    within a run; the determinism test compares two runs under the same setting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PoolBackbone(nn.Module):
    """A fixed 'backbone': 4 x 4 average pooling of the RGB image (stride 4, 3-d features)."""

    embed_dim = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)


def kmeans_like(centroids: torch.Tensor) -> CauseModel:
    """A k-means-baseline style model (identity head) on the pooling backbone."""
    return CauseModel(PoolBackbone(), nn.Identity(), torch.zeros(1, 3), centroids, {"kind": "kmeans"})


COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.8, 0.1]])


def scenes(n: int, seed: int = 0, size: tuple[int, int] = (32, 48)) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 3 colour regions (vertical bands at random 4-aligned cuts) and their region ids."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, regions = torch.empty(n, 3, h, w), torch.empty(n, h, w, dtype=torch.long)
    for i in range(n):
        a, b = sorted((torch.randperm(w // 4 - 1, generator=g)[:2] + 1).tolist())
        lab = torch.zeros(h, w, dtype=torch.long)
        lab[:, 4 * a:4 * b], lab[:, 4 * b:] = 1, 2
        images[i] = COLOURS[lab].permute(2, 0, 1) + 0.02 * torch.randn(3, h, w, generator=g)
        regions[i] = lab
    return images.clamp(0, 1), regions


def test_majority_downsample_matches_numpy_mode():
    rng = np.random.default_rng(0)
    lab = torch.from_numpy(rng.integers(0, 4, size=(2, 8, 12)))
    out = majority_downsample(lab, (2, 3), 4)
    ref = np.zeros((2, 2, 3), dtype=np.int64)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                counts = np.bincount(lab[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].numpy().ravel(), minlength=4)
                ref[b, i, j] = np.argmax(counts)  # ties: the smallest id, as torch.argmax
    assert torch.equal(out, torch.from_numpy(ref))
    assert label_size((30, 45), 4) == (8, 12)


def test_pseudo_labels_are_the_models_crf_cluster_map():
    images, _ = scenes(2)
    pred = Predictor(kmeans_like(COLOURS), alpha=3.0)
    labels = pseudo_labels(pred, images, crf=True)
    scores = pred.scores(images)
    ref = CRFRunner(workers=0).refine(images, list(scores.softmax(1).numpy()))
    assert torch.equal(labels, torch.from_numpy(np.stack([r.argmax(0) for r in ref])).long())
    assert labels.dtype == torch.int64 and labels.shape == (2, 32, 48)
    small = pseudo_labels(pred, images, crf=False, stride=4)
    assert torch.equal(small, majority_downsample(scores.argmax(1), (8, 12), 3))


def test_head_reproduces_known_pseudo_labels_and_is_seeded():
    images, regions = scenes(12)
    feats = PoolBackbone()(images)  # (12, 3, 8, 12)
    targets = majority_downsample(regions, (8, 12), 3)
    cfg = SelfTrainConfig(epochs=40, lr=3e-2, hidden=16, batch_size=6, seed=3)
    head, history = fit_head(feats, targets, 3, cfg)
    acc = (head(feats).argmax(1) == targets).float().mean().item()
    assert acc > 0.99 and history[-1] < history[0]
    again, _ = fit_head(feats, targets, 3, cfg)
    other, _ = fit_head(feats, targets, 3, SelfTrainConfig(epochs=1, lr=3e-2, hidden=16, batch_size=6, seed=4))
    sd, sd2, sd3 = head.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not all(torch.equal(sd[k], sd3[k]) for k in sd if k not in ("mean", "std"))


def test_targets_come_from_the_model_not_from_masks():
    # label-free: the only target source is the model; permuting its centroids permutes what the head learns
    images, _ = scenes(8)
    perm = torch.tensor([2, 0, 1])
    cfg = SelfTrainConfig(epochs=30, lr=3e-2, hidden=16, batch_size=8)
    outs = []
    for centroids in (COLOURS, COLOURS[perm]):
        base = Predictor(kmeans_like(centroids), alpha=3.0)
        model, summary = self_train(base, [images[:4], images[4:]], cfg, crf=False)
        assert summary["samples"] == 16  # 8 images and their mirrors
        outs.append(self_trained_predictor(model).scores(images).argmax(1))
        own = base.scores(images).argmax(1)
        assert (outs[-1] == own).float().mean().item() > 0.97
    # the second model's cluster j is the first model's cluster perm[j]
    assert (perm[outs[1]] == outs[0]).float().mean().item() > 0.97


def test_flip_tta_and_evaluate_interface():
    images, regions = scenes(4, seed=1)
    base = kmeans_like(COLOURS)
    model, _ = self_train(Predictor(base), [images], SelfTrainConfig(epochs=30, lr=1e-2, hidden=8), crf=False)
    pred = self_trained_predictor(model)
    with torch.no_grad():
        logits = model.seg_head(base.backbone(images))
        flipped = model.seg_head(base.backbone(images.flip(-1))).flip(-1)
    ref = F.interpolate((logits + flipped) / 2, size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(pred.scores(images), ref, atol=1e-5)

    data = [{"image": images[i], "label": regions[i], "index": i, "name": f"x{i}"} for i in range(4)]
    res = evaluate(pred, data, num_classes=3, batch_size=2, crf=True, figures=0, progress=False)
    assert res["no_crf"]["miou"] > 0.9 and res["crf"]["miou"] > 0.9
    assert res["predictor"] == "selftrain" and res["alpha"] == 1.0
    base_res = evaluate(Predictor(base), data, num_classes=3, batch_size=2, crf=False, figures=0, progress=False)
    assert base_res["predictor"] == "centroids"


def test_save_load_round_trip(tmp_path):
    images, _ = scenes(4, seed=2)
    base = kmeans_like(COLOURS)
    cfg = SelfTrainConfig(epochs=2, hidden=8, use_embed=True)
    model, _ = self_train(Predictor(base), [images], cfg, crf=False)
    path = tmp_path / "head.pt"
    model.save(path, cfg)
    obj = torch.load(path, weights_only=True)
    assert obj["config"]["use_embed"] is True and obj["in_dim"] == 6  # backbone 3-d + identity head 3-d
    back = SelfTrainedModel.load(path, base)
    assert torch.equal(back.embed(images), model.embed(images))
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        SelfTrainedModel.load(tmp_path / "bad.pt", base)
    with pytest.raises(ValueError, match="other.pt"):
        SelfTrainedModel.load(tmp_path / "other.pt", base)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SelfTrainedModel.load(tmp_path / "missing.pt", base)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="selftrain.epochs"):
        SelfTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="selftrain.lr"):
        SelfTrainConfig(lr=0)
    with pytest.raises(ValueError, match="pseudo labels"):
        fit_head(torch.zeros(2, 3, 4, 4), torch.full((2, 8, 8), 5), 3, SelfTrainConfig())
