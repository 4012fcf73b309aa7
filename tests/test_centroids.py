"""Step-3 centroid learners: the SwAV Sinkhorn-Knopp codes and the balanced ('sinkhorn') learner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from causeseg.centroids import CentroidLearner, sinkhorn_assignment_loss, sinkhorn_codes
from causeseg.config import ConfigError, load_config


def numpy_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Independent reference: SwAV's exp-form Sinkhorn-Knopp on the (C, n) transposed matrix, float64."""
    q = np.exp(scores.T / eps)
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def numpy_unbalanced_sinkhorn(scores: np.ndarray, eps: float, iters: int, fi: float) -> np.ndarray:
    """Independent reference: scaling algorithm with a KL-relaxed column marginal (Chizat et al. 2018)."""
    k = np.exp(scores / eps)
    n, c = k.shape
    a, b = np.full(n, 1.0 / n), np.full(c, 1.0 / c)
    u = np.full(n, 1.0 / k.sum())
    v = np.ones(c)
    for _ in range(iters):
        v = (b / (k.T @ u)) ** fi
        u = a / (k @ v)
    return n * u[:, None] * k * v[None, :]


@pytest.mark.parametrize("balance", [0.0, 0.3, 0.7, 1.0])
def test_unbalanced_sinkhorn_codes_match_scaling_reference(balance):
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(41, 6, generator=g, dtype=torch.float64) * 2 - 1
    scores[:, 2] += 0.4
    for iters in (1, 3, 50):
        ours = sinkhorn_codes(scores, eps=0.1, iters=iters, balance=balance)
        ref = numpy_unbalanced_sinkhorn(scores.numpy(), 0.1, iters, balance)
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-12)
    if balance == 0.0:  # no cluster constraint: the plain softmax of the scores
        torch.testing.assert_close(ours, torch.softmax(scores / 0.1, dim=1))


def test_unbalanced_sinkhorn_imbalance_decreases_with_balance():
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(80, 5, generator=g, dtype=torch.float64) * 0.2
    scores[:, 0] += 0.3
    spread = [float((sinkhorn_codes(scores, 0.05, 100, b).sum(0) - 16).abs().max()) for b in (0.0, 0.5, 0.9, 1.0)]
    assert spread[0] > spread[1] > spread[2] > spread[3] and spread[3] < 1e-6


@pytest.mark.parametrize("iters", [1, 3, 7])
def test_sinkhorn_codes_match_numpy_reference(iters):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(37, 5, generator=g, dtype=torch.float64) * 2 - 1
    ours = sinkhorn_codes(scores, eps=0.2, iters=iters)
    ref = numpy_sinkhorn(scores.numpy(), 0.2, iters)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-10, atol=1e-12)


def test_sinkhorn_codes_marginals_rows_exact_columns_converge_to_equipartition():
    g = torch.Generator().manual_seed(1)
    n, c = 60, 4
    # every token prefers cluster 0: a plain softmax would put nearly all mass there
    scores = torch.rand(n, c, generator=g, dtype=torch.float64) * 0.1
    scores[:, 0] += 0.5
    soft = torch.softmax(scores / 0.05, dim=1)
    assert soft.sum(0)[0] > 0.9 * n
    q3 = sinkhorn_codes(scores, eps=0.05, iters=3)
    torch.testing.assert_close(q3.sum(1), torch.ones(n, dtype=torch.float64))  # each token's code sums to 1
    assert (q3 >= 0).all()
    assert (q3.sum(0) - n / c).abs().max() < (soft.sum(0) - n / c).abs().max() / 10  # 3 rounds already balance
    q = sinkhorn_codes(scores, eps=0.05, iters=500)
    torch.testing.assert_close(q.sum(0), torch.full((c,), n / c, dtype=torch.float64), rtol=0, atol=1e-8)


def test_sinkhorn_codes_small_eps_stays_finite_and_input_shape_checked():
    scores = torch.tensor([[1.0, -1.0, 0.0], [0.9, -0.5, 0.2], [-1.0, 1.0, 0.3]])
    q = sinkhorn_codes(scores, eps=1e-3, iters=3)  # exp(1000) in the exp form
    assert torch.isfinite(q).all() and q.dtype == scores.dtype
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(n, C\)"):
        sinkhorn_codes(torch.zeros(2, 3, 4))


def test_sinkhorn_loss_is_cross_entropy_against_reference_codes_and_only_moves_centroids():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 10, 6, generator=g, dtype=torch.float64)
    c = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss = sinkhorn_assignment_loss(x, c, tau=0.1, eps=0.05, iters=3)
    cos = (F.normalize(x.reshape(-1, 6), dim=1) @ F.normalize(c, dim=1).t()).detach().numpy()
    q = numpy_sinkhorn(cos, 0.05, 3)
    logp = cos / 0.1 - np.log(np.exp(cos / 0.1).sum(1, keepdims=True))
    assert loss.item() == pytest.approx(-(q * logp).sum(1).mean(), rel=1e-10)
    loss.backward()
    assert c.grad is not None and c.grad.abs().sum() > 0
    # the codes are a fixed target: scaling a centroid changes neither the cosines nor the loss
    c2 = c.detach().clone()
    c2[1] *= 7.0
    assert sinkhorn_assignment_loss(x, c2).item() == pytest.approx(sinkhorn_assignment_loss(x, c.detach()).item())


def narrow_cone_blobs(n_per: int, k: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k tight blobs whose centres share a strong common direction (mean pairwise cosine ~0.8)."""
    g = torch.Generator().manual_seed(seed)
    common = F.normalize(torch.randn(dim, generator=g), dim=0)
    centres = F.normalize(2.0 * common + 0.8 * F.normalize(torch.randn(k, dim, generator=g), dim=1), dim=1)
    labels = torch.arange(k).repeat_interleave(n_per)
    x = centres[labels] + 0.03 * torch.randn(k * n_per, dim, generator=g)
    perm = torch.randperm(len(x), generator=g)
    return x[perm], labels[perm]


def train_learner(kind: str, x: torch.Tensor, k: int, steps: int = 300) -> torch.Tensor:
    learner = CentroidLearner(k, x.shape[1], kind, tau=0.1, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        batch = x[torch.randperm(len(x), generator=g)[:128]].reshape(4, 32, -1)
        opt.zero_grad()
        learner.loss(batch).backward()
        opt.step()
    return (F.normalize(x, dim=1) @ F.normalize(learner.weight.detach(), dim=1).t()).argmax(1)


def test_sinkhorn_learner_uses_every_cluster_and_recovers_blobs_in_a_narrow_cone():
    k = 5
    x, labels = narrow_cone_blobs(80, k, 16, seed=4)
    cos = F.normalize(x, dim=1) @ F.normalize(x, dim=1).t()
    assert cos.mean() > 0.6  # the data lie in a narrow cone, as the CamVid head output
    pred = train_learner("sinkhorn", x, k)
    assert len(pred.unique()) == k
    # each learned cluster is one blob: the contingency table is a permutation matrix
    table = torch.zeros(k, k, dtype=torch.long)
    table.index_put_((pred, labels), torch.ones_like(pred), accumulate=True)
    assert ((table > 0).sum(1) == 1).all() and ((table > 0).sum(0) == 1).all()


def test_centroid_learner_sinkhorn_is_deterministic_and_unknown_learner_rejected():
    x, _ = narrow_cone_blobs(50, 3, 8, seed=5)
    assert torch.equal(train_learner("sinkhorn", x, 3, steps=20), train_learner("sinkhorn", x, 3, steps=20))
    with pytest.raises(ValueError, match="unknown centroid learner 'swav'"):
        CentroidLearner(3, 8, "swav")


def test_config_accepts_sinkhorn_learner_and_rejects_bad_eps():
    cfg = load_config("camvid_effnet_tr", ["step3.learner=sinkhorn", "step3.sinkhorn_eps=0.02"])
    assert cfg.step3.learner == "sinkhorn" and cfg.step3.sinkhorn_eps == 0.02 and cfg.step3.sinkhorn_iters == 3
    assert cfg.step3.sinkhorn_balance == 0.5  # the camvid_effnet presets' dev-chosen Step 3
    with pytest.raises(ConfigError, match="sinkhorn_balance"):
        load_config("camvid_effnet_tr", ["step3.sinkhorn_balance=1.5"])
    for preset in ("cocostuff27_dino_vits8_tr", "cityscapes27_dino_vitb8_mlp", "voc_dino_vits16_tr"):
        s3 = load_config(preset, []).step3  # off in the paper presets: the official modularity centroids
        assert (s3.learner, s3.init, s3.sinkhorn_balance) == ("modularity", "uniform", 1.0)
    for preset in ("camvid_effnet_tr", "camvid_effnet_mlp"):  # chosen on the dev split (README "Quality")
        s3 = load_config(preset, []).step3
        assert (s3.learner, s3.init, s3.sinkhorn_balance) == ("sinkhorn", "kmeans++", 0.5)
    with pytest.raises(ConfigError, match="sinkhorn_eps"):
        load_config("camvid_effnet_tr", ["step3.learner=sinkhorn", "step3.sinkhorn_eps=0"])


@pytest.fixture(scope="module")
def four_images(tmp_path_factory):
    """Four CamVid training images as a plain image folder (no masks)."""
    import shutil

    from causeseg.data.root import data_root

    root = data_root()
    if root is None or not (root / "camvid" / "train" / "images").is_dir():
        pytest.skip("shared data not found (../shared/data or CAUSESEG_DATA_ROOT): camvid/train needed")
    out = tmp_path_factory.mktemp("four")
    for p in sorted((root / "camvid" / "train" / "images").glob("*.png"))[:4]:
        shutil.copy(p, out / p.name)
    return out


@pytest.mark.parametrize("schedule", ["official", "constant"])
def test_lr_schedule_official_steps_per_epoch_in_steps_1_and_3(four_images, tmp_path, monkeypatch, schedule):
    """step{1,3}.lr_schedule=official: Step 1 StepLR(1, 0.2), Step 3 StepLR(2, 0.5) per epoch; constant keeps lr."""
    import causeseg.train as train

    seen: list[tuple[int, float]] = []
    real = train._optimise

    def recording(loss, opt, params):
        seen.append((len(opt.param_groups[0]["params"][0]), opt.param_groups[0]["lr"]))
        return real(loss, opt, params)

    monkeypatch.setattr(train, "_optimise", recording)
    ov = ["backbone.options={feature_stride: 16}", "data.dataset=images", f"data.root={four_images}",
          "step1.k=16", "step1.resolution=64", "step1.batch_size=4", "step1.epochs=2", "step1.lr=0.01",
          "step2.resolution=64", "step2.batch_size=4", "step2.epochs=1", "step2.projection_dim=16",
          "step2.ffn_dim=16", "step2.reduced_dim=8", "step2.bank_size=4", "step3.resolution=64",
          "step3.batch_size=4", "step3.epochs=5", "step3.lr=0.001", "step3.learner=sinkhorn", "step3.init=uniform",
          f"step1.lr_schedule={schedule}", f"step3.lr_schedule={schedule}", "run.progress=false",
          "run.device=cpu", "run.feature_cache=off"]
    train.train_all(load_config("camvid_effnet_tr", ov), tmp_path / "run")
    step1 = [lr for rows, lr in seen if rows == 16]  # codebook (k=16, c) vs centroids (C=11, r)
    step3 = [lr for rows, lr in seen if rows == 11]
    if schedule == "official":
        assert step1 == pytest.approx([0.01, 0.002])
        assert step3 == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])
    else:
        assert step1 == pytest.approx([0.01, 0.01]) and step3 == pytest.approx([1e-3] * 5)
