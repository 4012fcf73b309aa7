"""Step-2 thresholds calibrated on the clusterbook's own concept distances (``step2.phi_rule=quantile``).

The calibrated phi+ / phi- are the quantiles numpy computes on the off-diagonal entries of D_M; they make the
requested fractions of concept pairs positive / negative; the Step-2 iteration uses the thresholds it is given
(the fixed rule is unchanged); training logs and stores them; the rule invalidates the head, not the clusterbook.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from causeseg.config import ConfigError, load_config
from causeseg.contrastive import calibrated_thresholds, concept_distance, pair_fractions
from causeseg.heads import make_teacher
from causeseg.step2 import Step2State, phi_thresholds, step2_update
from causeseg.train import build_student


def _d_m(k: int, c: int = 16, seed: int = 0) -> torch.Tensor:
    return concept_distance(torch.randn(k, c, generator=torch.Generator().manual_seed(seed)))


def _pairs(d: torch.Tensor) -> np.ndarray:
    k = d.shape[0]
    return d.numpy()[np.triu_indices(k, 1)].astype(np.float64)


@pytest.mark.parametrize("k,pos,neg", [(2, 0.1, 0.5), (3, 0.5, 0.5), (37, 0.1, 0.5), (200, 0.03, 0.45),
                                       (2048, 0.1, 0.5)])
def test_calibrated_thresholds_are_numpy_quantiles_of_the_concept_pairs(k, pos, neg):
    d = _d_m(k, seed=k)
    phi_pos, phi_neg = calibrated_thresholds(d, pos, neg)
    ref_pos, ref_neg = np.quantile(_pairs(d), [1 - pos, neg])  # numpy's default: linear interpolation
    assert phi_pos == pytest.approx(ref_pos, abs=1e-12) and phi_neg == pytest.approx(ref_neg, abs=1e-12)
    assert phi_neg <= phi_pos


def test_thresholds_select_the_requested_fractions_of_pairs():
    d = _d_m(300)
    vals = _pairs(d)
    for pos, neg in ((0.1, 0.5), (0.03, 0.45), (0.25, 0.25)):
        phi_pos, phi_neg = calibrated_thresholds(d, pos, neg)
        got_pos, got_neg = pair_fractions(d, phi_pos, phi_neg)
        assert got_pos == pytest.approx(np.mean(vals > phi_pos)) and got_neg == pytest.approx(np.mean(vals < phi_neg))
        assert abs(got_pos - pos) <= 2 / len(vals) and abs(got_neg - neg) <= 2 / len(vals)


def test_degenerate_distances_give_equal_thresholds_and_no_pairs():
    d = torch.full((5, 5), 0.25)
    d.fill_diagonal_(1.0)
    assert calibrated_thresholds(d, 0.1, 0.5) == (0.25, 0.25)
    assert pair_fractions(d, 0.25, 0.25) == (0.0, 0.0)  # strict inequalities, as concept_masks
    assert pair_fractions(d, 0.3, 0.1) == (0.0, 0.0) and pair_fractions(d, 0.2, 0.3) == (1.0, 1.0)


@pytest.mark.parametrize("pos,neg,match", [(0.0, 0.5, "pos_frac"), (1.0, 0.5, "pos_frac"), (0.1, 0.0, "neg_frac"),
                                           (0.6, 0.5, "pos_frac \\+ neg_frac")])
def test_bad_fractions_are_refused(pos, neg, match):
    with pytest.raises(ValueError, match=match):
        calibrated_thresholds(_d_m(5), pos, neg)


def test_phi_settings_are_checked_and_round_trip(tmp_path):
    from causeseg.config import save_config

    cfg = load_config(None, ["step2.phi_rule=quantile", "step2.phi_pos_frac=0.05", "step2.phi_neg_frac=0.4"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").to_dict() == cfg.to_dict()
    assert load_config(None, []).step2.phi_rule == "fixed"  # the default rule: 0.3 / 0.1 as configured
    assert load_config(None, ["step2.phi_pos_frac=0.5", "step2.phi_neg_frac=0.5"]).step2.phi_neg_frac == 0.5
    for bad, key in (("step2.phi_rule=median", "step2.phi_rule"), ("step2.phi_pos_frac=0", "step2.phi_pos_frac"),
                     ("step2.phi_neg_frac=1.5", "step2.phi_neg_frac")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="phi_pos_frac \\+ step2.phi_neg_frac must be <= 1"):
        load_config(None, ["step2.phi_pos_frac=0.6", "step2.phi_neg_frac=0.5"])


def test_phi_thresholds_follow_the_rule():
    d = _d_m(64)
    fixed = load_config(None, ["step2.phi_pos=0.2", "step2.phi_neg=0.05"])
    phi_pos, phi_neg, text = phi_thresholds(fixed, d)
    pos, neg = pair_fractions(d, 0.2, 0.05)
    assert (phi_pos, phi_neg) == (0.2, 0.05)
    assert text == f"fixed rule: {100 * pos:.1f} % positive, {100 * neg:.1f} % negative pairs"
    quant = load_config(None, ["step2.phi_rule=quantile", "step2.phi_pos_frac=0.1", "step2.phi_neg_frac=0.5"])
    phi_pos, phi_neg, text = phi_thresholds(quant, d)
    assert (phi_pos, phi_neg) == calibrated_thresholds(d, 0.1, 0.5)
    assert text == "quantile rule: 10 % positive, 50 % negative pairs"


def _state(cfg, phis=None) -> Step2State:
    torch.manual_seed(0)
    student = build_student(cfg, 12, None)
    codebook = torch.randn(10, 12, generator=torch.Generator().manual_seed(1))
    extra = {} if phis is None else {"phi_pos": phis[0], "phi_neg": phis[1]}
    return Step2State(cfg, student, make_teacher(student), codebook, concept_distance(codebook),
                      torch.optim.Adam(student.parameters(), lr=1e-2), torch.device("cpu"), **extra)


def _cfg(*extra: str):
    return load_config(None, ["step2.head=mlp", "step2.reduced_dim=8", "step2.projection_dim=16", "step2.ffn_dim=16",
                              "step2.grid=4", "step2.use_bank=false", "run.amp='off'", "run.seed=3", *extra])


def _losses(state: Step2State) -> list[float]:
    feats = torch.randn(4, 12, 8, 8, generator=torch.Generator().manual_seed(2))
    return [float(step2_update(state, feats[i:i + 2], torch.tensor([i, i + 1]), epoch=0, ema_step=i)["loss"])
            for i in (0, 2)]


def test_step2_update_uses_the_state_thresholds():
    default = _state(_cfg())
    assert (default.phi_pos, default.phi_neg) == (0.3, 0.1)  # none given: the configured fixed values
    # thresholds given to the state act exactly as the same values configured (the fixed rule's path)
    given = _losses(_state(_cfg(), (0.15, 0.02)))
    configured = _losses(_state(_cfg("step2.phi_pos=0.15", "step2.phi_neg=0.02")))
    assert given == configured
    assert given != _losses(_state(_cfg()))  # and they matter


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i]}


class _Features(torch.nn.Module):
    """A fixed random 1x1 projection of 4x4-pooled pixels to 8 channels (a stand-in backbone)."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(8, 3, generator=torch.Generator().manual_seed(4))

    def forward(self, x):
        return torch.einsum("oc,bchw->bohw", self.w, torch.nn.functional.avg_pool2d(x, 4))


def test_train_step2_logs_and_stores_the_calibrated_thresholds(tmp_path, caplog):
    from causeseg.clusterbook import Clusterbook
    from causeseg.distributed import DistContext
    from causeseg.features import FeatureSource
    from causeseg.train import train_step2

    cfg = _cfg("step2.phi_rule=quantile", "step2.phi_pos_frac=0.2", "step2.phi_neg_frac=0.3", "step2.batch_size=4",
               "step2.iterations=1", "step2.grid=2", "run.progress=false")
    src = FeatureSource(_Features(), _Images(8), device=torch.device("cpu"), amp="off", cache="off", num_workers=0,
                        progress=False)
    book = Clusterbook(torch.randn(12, 8, generator=torch.Generator().manual_seed(6)), {})
    want = calibrated_thresholds(concept_distance(book.prototypes), 0.2, 0.3)
    with caplog.at_level(logging.INFO, logger="causeseg.train"):
        _, meta = train_step2(cfg, None, book, tmp_path, torch.device("cpu"), DistContext(), source=src)
    assert meta["phi"] == {"rule": "quantile", "phi_pos": want[0], "phi_neg": want[1]}
    assert f"step 2: phi+ {want[0]:.2f}, phi- {want[1]:.2f} (quantile rule: 20 % positive, 30 % negative pairs)" \
        in caplog.text
    stored = torch.load(tmp_path / "artifacts" / "head.pt", map_location="cpu", weights_only=True)
    assert stored["meta"]["phi"] == meta["phi"]


def test_changing_the_phi_rule_rebuilds_head_and_centroids_not_the_clusterbook(tmp_path):
    from causeseg.provenance import step_fingerprints
    from causeseg.train import plan_steps

    def fps(*overrides: str):
        return step_fingerprints(load_config(None, list(overrides)), backbone_digest="b", data_digest="d", amp="off")

    old = fps()
    (tmp_path / "artifacts").mkdir()
    for step, name in (("step1", "clusterbook.pt"), ("step2", "head.pt"), ("step3", "centroids.pt")):
        torch.save({"fingerprint": old[step]}, tmp_path / "artifacts" / name)
    assert plan_steps(tmp_path, old) == {}  # same settings: everything is kept
    remove = plan_steps(tmp_path, fps("step2.phi_rule=quantile"))
    arts = tmp_path / "artifacts"
    assert set(remove) == {str(arts / "head.pt"), str(arts / "centroids.pt")}
    assert any("step2.phi_rule: 'fixed' -> 'quantile'" in r for r in remove[str(arts / "head.pt")])


def test_a_setting_added_since_an_artifact_was_written_counts_only_when_not_at_its_default():
    from causeseg.provenance import differences, step_fingerprints

    new = step_fingerprints(load_config(None, []), backbone_digest="b", data_digest="d", amp="off")["step3"]
    old = json.loads(json.dumps(new))
    for section, key in (("step2", "phi_rule"), ("step2", "phi_pos_frac"), ("step1", "iterations")):
        del old[section][key]  # written by a causeseg without these settings
    assert differences(old, new) == []
    changed = step_fingerprints(load_config(None, ["step2.phi_rule=quantile", "step1.iterations=5"]),
                                backbone_digest="b", data_digest="d", amp="off")["step3"]
    assert sorted(differences(old, changed)) == ["step1.iterations: '<absent>' -> 5",
                                                 "step2.phi_rule: '<absent>' -> 'quantile'"]
    old["step2"]["phi_pos"] = 0.2  # a setting present in both still compares as before
    assert differences(old, new) == ["step2.phi_pos: 0.2 -> 0.3"]
