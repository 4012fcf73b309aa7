"""Pseudo-label self-training as a pipeline option (``selftrain.enabled``) end to end on a few real CamVid images:
the stage's artifact and fingerprint, ``model.pt``, evaluate / predict with the self-trained head or the centroids,
what a changed setting rebuilds, determinism, and the errors of bad values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.cli import main
from causeseg.config import load_config
from causeseg.provenance import differences, step_fingerprints
from test_cli import TINY as CLI_TINY

# the CLI tests' tiny CamVid run, without figures
TINY = ["eval.figures=0" if x == "eval.figures=2" else x for x in CLI_TINY]
SELFTRAIN = ["-s", "selftrain.enabled=true", "-s", "selftrain.epochs=2", "-s", "selftrain.hidden=8",
             "-s", "selftrain.batch_size=4"]
STEP_FILES = ("clusterbook.pt", "head.pt", "centroids.pt")


@pytest.fixture(scope="module")
def selftrained(camvid_tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("selftrain_run")
    assert main(["run", *TINY, *SELFTRAIN, "--data-root", str(camvid_tiny), "-o", str(run)]) == 0
    return run


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _stamps(run: Path) -> dict[str, int]:
    return {f: (run / "artifacts" / f).stat().st_mtime_ns for f in (*STEP_FILES, "selftrain.pt")}


def _train(run: Path, data: Path, *extra: str) -> None:
    assert main(["train", *TINY, *SELFTRAIN, *extra, "--data-root", str(data), "-o", str(run)]) == 0


def test_enabled_run_writes_the_head_and_scores_it(selftrained):
    art = _load(selftrained / "artifacts" / "selftrain.pt")
    assert art["format"] == "causeseg-selftrain-v1" and art["num_classes"] == 11 and art["hidden"] == 8
    assert art["fingerprint"]["selftrain"]["epochs"] == 2 and art["fingerprint"]["pseudo_labels"]["alpha"] == 3.0
    summary = art["meta"]["selftrain"]
    assert summary["samples"] == 16 and len(summary["loss"]) == 2  # 8 training images and their mirrors
    assert abs(sum(summary["label_fraction"]) - 1) < 1e-3
    model = _load(selftrained / "model.pt")  # tensors and plain data only
    for k, v in art["head"].items():
        assert torch.equal(model["selftrain"]["head"][k], v), k
    assert model["config"]["selftrain"]["enabled"] is True
    metrics = json.loads((selftrained / "metrics.json").read_text())
    assert metrics["predictor"] == "selftrain" and metrics["alpha"] == 1.0 and metrics["num_images"] == 4
    for key in ("no_crf", "crf"):
        assert 0.0 <= metrics[key]["miou"] <= 1.0 and len(metrics[key]["per_class_iou"]) == 11


def test_evaluate_scores_either_predictor(selftrained, capsys):
    model = str(selftrained / "model.pt")
    for choice, want, alpha in (("centroids", "centroids", 3.0), ("auto", "selftrain", 1.0)):
        out = selftrained / f"eval-{choice}"
        assert main(["evaluate", "-m", model, "--predictor", choice, "--no-crf", "-o", str(out)]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["predictor"] == want
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["predictor"] == want and metrics["alpha"] == alpha
    # the default (auto) reproduces the run's own no-CRF score of the self-trained head
    run_metrics = json.loads((selftrained / "metrics.json").read_text())
    auto = json.loads((selftrained / "eval-auto" / "metrics.json").read_text())
    assert auto["no_crf"]["miou"] == run_metrics["no_crf"]["miou"]


def test_predict_matches_the_head_built_by_hand(selftrained, camvid_tiny, tmp_path, capsys):
    from causeseg.crf import CRFRunner
    from causeseg.model import CauseModel
    from causeseg.predict import predict_folder
    from causeseg.selftrain import SelfTrainedModel, self_trained_predictor

    images = camvid_tiny / "val" / "images"
    out = tmp_path / "pred"
    assert main(["predict", str(images), "-m", str(selftrained / "model.pt"), "-o", str(out), "--no-progress"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    assert len(report["written"]) == 4 and {e["predictor"] for e in report["written"]} == {"selftrain"}
    # reference: the artifact's head on the Step 1-3 model, alpha 1, flip TTA, the CRF
    base = CauseModel.load(selftrained / "model.pt")
    head = SelfTrainedModel.load(selftrained / "artifacts" / "selftrain.pt", base)
    ref_dir = tmp_path / "ref"
    predict_folder(self_trained_predictor(head, crf_runner=CRFRunner(workers=0)), [images], ref_dir,
                   resolution=128, progress=False)
    for e in report["written"]:
        got, ref = (np.array(Image.open(d / e["labels"])) for d in (out, ref_dir))
        assert np.array_equal(got, ref), e["name"]
    # the centroids of the same file give another prediction, and say so
    cen = tmp_path / "cen"
    assert main(["predict", str(images), "-m", str(selftrained / "model.pt"), "-o", str(cen), "--no-progress",
                 "--predictor", "centroids"]) == 0
    cen_report = json.loads((cen / "predictions.json").read_text())
    assert {e["predictor"] for e in cen_report["written"]} == {"centroids"}
    capsys.readouterr()


def test_changed_settings_rebuild_what_they_shape(selftrained, camvid_tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(selftrained, run)
    before = _stamps(run)
    _train(run, camvid_tiny)  # same settings: everything is reused
    assert _stamps(run) == before
    _train(run, camvid_tiny, "-s", "selftrain.epochs=3")  # a selftrain setting: only the head is rebuilt
    after = _stamps(run)
    assert all(after[f] == before[f] for f in STEP_FILES) and after["selftrain.pt"] != before["selftrain.pt"]
    art = _load(run / "artifacts" / "selftrain.pt")
    assert art["fingerprint"]["selftrain"]["epochs"] == 3 and len(art["meta"]["selftrain"]["loss"]) == 3
    assert _load(run / "model.pt")["selftrain"]["fingerprint"]["selftrain"]["epochs"] == 3
    _train(run, camvid_tiny, "-s", "selftrain.epochs=3", "-s", "step3.epochs=2")  # Step 3 and what follows
    last = _stamps(run)
    assert last["clusterbook.pt"] == after["clusterbook.pt"] and last["head.pt"] == after["head.pt"]
    assert last["centroids.pt"] != after["centroids.pt"] and last["selftrain.pt"] != after["selftrain.pt"]
    assert _load(run / "artifacts" / "selftrain.pt")["fingerprint"]["step3"]["epochs"] == 2


def test_same_seed_same_head(selftrained, camvid_tiny, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(selftrained, run)
    (run / "artifacts" / "selftrain.pt").unlink()
    _train(run, camvid_tiny)
    a, b = (_load(r / "artifacts" / "selftrain.pt") for r in (selftrained, run))
    assert a["head"].keys() == b["head"].keys()
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    assert a["meta"]["selftrain"]["loss"] == b["meta"]["selftrain"]["loss"]


def test_fingerprint_lists_the_stage_only_when_enabled():
    def fps(*ov):
        return step_fingerprints(load_config(None, list(ov)), backbone_digest="b", data_digest="d", amp="off")

    assert "selftrain" not in fps()  # off by default
    on = fps("selftrain.enabled=true")
    assert on["selftrain"]["step3"] == on["step3"]["step3"]
    # what shapes the pseudo labels is in the stage's fingerprint only
    for ov, key in (("eval.alpha=2.0", "pseudo_labels.alpha"), ("eval.flip=false", "pseudo_labels.flip"),
                    ("eval.resolution=256", "pseudo_labels.resolution"), ("selftrain.crf=false", "selftrain.crf"),
                    ("selftrain.lr=0.01", "selftrain.lr")):
        other = fps("selftrain.enabled=true", ov)
        assert other["step3"] == on["step3"], ov
        diffs = differences(on["selftrain"], other["selftrain"])
        assert all(d.startswith(("pseudo_labels.", "selftrain.")) for d in diffs), (ov, diffs)
        assert any(d.startswith(key + ":") for d in diffs), (ov, diffs)
    assert fps("selftrain.enabled=true", "run.seed=1")["selftrain"]["run"]["seed"] == 1


@pytest.mark.parametrize("override, key", [("selftrain.epochs=0", "selftrain.epochs"),
                                           ("selftrain.lr=-1", "selftrain.lr"),
                                           ("selftrain.hidden=0", "selftrain.hidden"),
                                           ("selftrain.batch_size=0", "selftrain.batch_size"),
                                           ("selftrain.label_stride=0", "selftrain.label_stride"),
                                           ("selftrain.enabled=maybe", "selftrain.enabled"),
                                           ("selftrain.unknown=1", "selftrain.unknown")])
def test_bad_values_are_one_line_errors(override, key, tmp_path, capsys):
    assert main(["train", "-s", override, "-o", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and err.startswith("causeseg train: error:")
    assert not (tmp_path / "r" / "artifacts").exists()


def test_selftrain_predictor_needs_a_head(selftrained, tmp_path, capsys):
    obj = _load(selftrained / "model.pt")
    del obj["selftrain"]
    plain = tmp_path / "plain.pt"
    torch.save(obj, plain)
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(img)
    assert main(["predict", str(img), "-m", str(plain), "-o", str(tmp_path / "o"), "--predictor", "selftrain"]) == 2
    err = capsys.readouterr().err  # the log's command line, then the error's one line
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("causeseg predict: error: ") and \
        "plain.pt: holds no self-trained head" in err.strip().splitlines()[-1]
    assert main(["evaluate", "-m", str(plain), "-o", str(tmp_path / "e"), "--predictor", "selftrain"]) == 2
    assert "plain.pt: holds no self-trained head" in capsys.readouterr().err
    # auto falls back to the centroids of a model without a head
    assert main(["predict", str(img), "-m", str(plain), "-o", str(tmp_path / "a"), "--no-crf"]) == 0
    report = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert report["written"][0]["predictor"] == "centroids"


def test_selftrain_section_is_off_in_every_preset_and_round_trips(tmp_path):
    from causeseg.config import list_presets, save_config

    for name in list_presets():
        assert load_config(name).selftrain.enabled is False, name
    cfg = load_config(None, ["selftrain.enabled=true", "selftrain.lr=3e-3", "selftrain.use_embed=true",
                             "selftrain.crf=false", "selftrain.label_stride=2"])
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back.selftrain == cfg.selftrain and back.selftrain.lr == 3e-3 and back.selftrain.crf is False
