"""Step-1 artifacts and the alternative discretisers of the paper's ablation (Table 4)."""

import pytest
import torch
import torch.nn.functional as F

from causeseg.centroids import CentroidLearner, spherical_kmeans_loss
from causeseg.clusterbook import Clusterbook, Codebook, discretise


def blobs(k=4, n=40, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1) * 5
    x = torch.cat([centres[i] + 0.1 * torch.randn(n, dim, generator=g) for i in range(k)])
    return x, torch.arange(k).repeat_interleave(n), centres


@pytest.mark.filterwarnings("ignore:Graph is not fully connected")  # separated blobs, by design
@pytest.mark.parametrize("method", ["kmeans++", "spectral", "agglomerative", "ward"])
def test_discretisers_recover_separated_blobs(method):
    x, labels, centres = blobs()
    protos = discretise(x, 4, method, seed=0)
    assert protos.shape == (4, 8)
    # every prototype is closest (cosine) to a different true centre
    nearest = (F.normalize(protos, dim=1) @ F.normalize(centres, dim=1).t()).argmax(1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]


def test_discretise_rejects_too_few_tokens_and_unknown_method():
    x, _, _ = blobs(n=1)
    with pytest.raises(ValueError, match="at least k=8"):
        discretise(x, 8, "kmeans++")
    with pytest.raises(ValueError, match="unknown discretiser"):
        discretise(blobs()[0], 4, "nope")


def test_clusterbook_roundtrip_and_format_check(tmp_path):
    book = Clusterbook(torch.randn(16, 4), {"k": 16, "method": "modularity"})
    book.save(tmp_path / "cb.pt")
    again = Clusterbook.load(tmp_path / "cb.pt")
    assert torch.equal(again.prototypes, book.prototypes) and again.meta == book.meta and again.k == 16
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a causeseg clusterbook"):
        Clusterbook.load(tmp_path / "other.pt")


def test_codebook_init_is_official_uniform():
    g = torch.Generator().manual_seed(0)
    w = Codebook(2048, 32, generator=g).weight
    assert w.abs().max() <= 1 / 2048 and w.std() > 0


def test_spherical_kmeans_loss_matches_reference():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 5, 3, generator=g), torch.randn(4, 3, generator=g)
    cos = F.normalize(x.reshape(-1, 3), dim=1) @ F.normalize(c, dim=1).t()
    assert spherical_kmeans_loss(x, c).item() == pytest.approx(-cos.max(1).values.mean().item(), abs=1e-6)


def test_centroid_learner_only_sees_detached_features():
    learner = CentroidLearner(3, 4, "modularity", generator=torch.Generator().manual_seed(0))
    feats = torch.randn(2, 6, 4, requires_grad=True)
    learner.loss(feats).backward()
    assert feats.grad is None and learner.weight.grad is not None


def test_kmeanspp_seeds_are_data_points_covering_separated_blobs():
    from causeseg.centroids import kmeanspp_seeds

    g = torch.Generator().manual_seed(3)
    dirs = torch.eye(6)[:4]  # four orthogonal directions
    x = torch.cat([d + 0.05 * torch.randn(50, 6, generator=g) for d in dirs])
    seeds = kmeanspp_seeds(x, 4, seed=1)
    xn = F.normalize(x, dim=1)
    # every seed is one of the (normalised) tokens, and each blob gets exactly one seed
    assert torch.allclose((seeds @ xn.t()).max(1).values, torch.ones(4), atol=1e-6)
    assert sorted((seeds @ dirs.t()).argmax(1).tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(kmeanspp_seeds(x, 4, seed=1), seeds)  # deterministic
    with pytest.raises(ValueError, match="at least k"):
        kmeanspp_seeds(x[:3], 4)


def test_centroid_learner_init_from_data():
    learner = CentroidLearner(3, 6, "modularity", generator=torch.Generator().manual_seed(0))
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    learner.init_from(x, seed=0)
    assert torch.allclose(learner.weight.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose((learner.weight @ F.normalize(x, dim=1).t()).max(1).values, torch.ones(3), atol=1e-6)
