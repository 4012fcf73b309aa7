"""Every number belongs to its run: reused artifacts, overrides, evaluation and prediction either do what
their settings say or stop with a one-line error (exit code 2) before any work, losing nothing.

Runs on a small synthetic paired dataset (no shared data needed) with the offline EfficientNet-Lite0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.cli import build_parser, main

TINY = [
    "--backbone", "efficientnet_lite0", "-s", "backbone.options={feature_stride: 16}",
    "-s", "data.dataset=paired", "-s", "data.num_classes=4", "-s", "data.label_spec={num_classes: 4}",
    "-s", "step1.k=16", "-s", "step1.resolution=64", "-s", "step1.batch_size=3",
    "-s", "step2.head=tr", "-s", "step2.resolution=64", "-s", "step2.batch_size=3", "-s", "step2.epochs=1",
    "-s", "step2.projection_dim=16", "-s", "step2.reduced_dim=8", "-s", "step2.ffn_dim=16", "-s", "step2.bank_size=4",
    "-s", "step3.resolution=64", "-s", "step3.batch_size=3", "-s", "step3.epochs=1",
    "-s", "eval.resolution=64", "-s", "eval.batch_size=3", "-s", "eval.crf=false", "-s", "eval.figures=1",
    "-s", "run.checkpoint_every=1", "--no-progress",
]


def _write_pairs(folder: Path, n: int, seed: int, with_masks: bool = True) -> None:
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    if with_masks:
        (folder / "masks").mkdir(parents=True, exist_ok=True)
    colours = rng.integers(0, 256, size=(4, 3))
    for i in range(n):
        mask = np.zeros((72, 96), dtype=np.uint8)
        mask[: rng.integers(20, 50)] = 1
        mask[:, rng.integers(40, 80):] = 2
        mask[rng.integers(50, 70):, : rng.integers(10, 40)] = 3
        img = colours[mask] + rng.integers(-20, 20, size=(72, 96, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / "images" / f"im{i:02d}.png")
        if with_masks:
            Image.fromarray(mask).save(folder / "masks" / f"im{i:02d}.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    _write_pairs(root / "train", 6, 0)
    _write_pairs(root / "val", 3, 1)
    return root


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished")
    assert main(["run", *TINY, "--data-root", str(data), "-o", str(run)]) == 0
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run / "artifacts").glob("*.pt")}


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# -------------------------------------------------------------------------------------------------
# 1. a run directory never lies about what produced it
# -------------------------------------------------------------------------------------------------
def test_changed_step1_k_rebuilds_clusterbook_and_everything_downstream(finished, data, tmp_path):
    run = _copy_run(finished, tmp_path / "run")
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step1.k=8", "-o", str(run)]) == 0
    book = torch.load(run / "artifacts" / "clusterbook.pt", weights_only=True)["prototypes"]
    model = torch.load(run / "model.pt", weights_only=True)
    assert book.shape[0] == 8 and model["codebook"].shape[0] == 8 and model["config"]["step1"]["k"] == 8
    log = (run / "log.txt").read_text()
    assert "rebuilding" in log and "step1.k: 16 -> 8" in log and "head.pt" in log and "centroids.pt" in log


def test_changed_num_classes_rebuilds_only_the_centroids(finished, data, tmp_path):
    run = _copy_run(finished, tmp_path / "run")
    before = _mtimes(run)
    assert main(["train", *TINY, "--data-root", str(data), "-s", "data.num_classes=3",
                 "-s", "data.label_spec={num_classes: 3, unknown: ignore}", "-o", str(run)]) == 0
    after = _mtimes(run)
    assert torch.load(run / "artifacts" / "centroids.pt", weights_only=True)["centroids"].shape[0] == 3
    assert torch.load(run / "model.pt", weights_only=True)["centroids"].shape[0] == 3
    assert after["clusterbook.pt"] == before["clusterbook.pt"] and after["head.pt"] == before["head.pt"]
    assert after["centroids.pt"] != before["centroids.pt"]


def test_unchanged_training_settings_reuse_every_artifact(finished, data, tmp_path):
    run = _copy_run(finished, tmp_path / "run")
    before = _mtimes(run)
    assert main(["train", *TINY, "--data-root", str(data), "-s", "eval.resolution=96", "-o", str(run)]) == 0
    assert _mtimes(run) == before
    assert "reusing" in (run / "log.txt").read_text()


def test_other_images_rebuild_everything(finished, data, tmp_path):
    """The demo's --images case: same settings, other training images -> nothing is reused."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(data, other)
    _write_pairs(other / "train", 1, 7)  # rewrites im00.png with other content
    run = _copy_run(finished, tmp_path / "run")
    before = _mtimes(run)
    assert main(["train", *TINY, "--data-root", str(other), "-o", str(run)]) == 0
    after = _mtimes(run)
    assert all(after[k] != before[k] for k in before)
    assert "data.files" in (run / "log.txt").read_text()


def test_checkpoint_under_other_settings_is_refused_then_force_restarts(finished, data, tmp_path, capsys):
    from causeseg.loop import TrainingInterrupted
    from causeseg.train import train_all
    from causeseg.cli import _config_from_args

    run = tmp_path / "run"
    args = build_parser().parse_args(["train", *TINY, "--data-root", str(data), "-o", str(run)])
    with pytest.raises(TrainingInterrupted):
        train_all(_config_from_args(args), run, stop_after={"step2": 1})
    config_before = (run / "config.yaml").read_bytes()
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step2.lr=0.002", "-o", str(run)]) == 2
    err = _err(capsys)
    assert "step2.pt" in err and "step2.lr: 0.001 -> 0.002" in err and "--force" in err
    assert (run / "config.yaml").read_bytes() == config_before  # nothing was touched
    assert (run / "checkpoints" / "step2.pt").exists()
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step2.lr=0.002", "-o", str(run), "--force"]) == 0
    assert json.loads(json.dumps(torch.load(run / "model.pt", weights_only=True)["config"]))["step2"]["lr"] == 0.002


def test_failed_command_never_overwrites_a_finished_run(finished, data, tmp_path, capsys):
    run = _copy_run(finished, tmp_path / "run")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "log.txt"}
    bad = tmp_path / "weights.pth"
    bad.write_bytes(os.urandom(4096))
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step1.k=8", "--backbone", "dino_vits16", "-s", "backbone.options={}",
                 "--backbone-weights", str(bad), "-o", str(run)]) == 2
    err = _err(capsys)
    assert "weights.pth" in err and "trust_pickle" not in err
    assert main(["train", *TINY, "--data-root", str(tmp_path / "nowhere"), "-s", "step1.k=8", "-o", str(run)]) == 2
    assert {p: p.read_bytes() for p in files} == files
    assert "stopped:" in (run / "log.txt").read_text()  # the log keeps the error that stopped the command


def test_log_holds_per_epoch_losses_and_timing(finished):
    log = (finished / "log.txt").read_text()
    for step in ("step1", "step2", "step3"):
        assert f"{step}: epoch 1/1: mean loss" in log
    assert "evaluate" in log


# -------------------------------------------------------------------------------------------------
# 2. evaluation scores what the user meant, or refuses
# -------------------------------------------------------------------------------------------------
def test_evaluate_refuses_a_class_count_other_than_the_centroids(finished, data, tmp_path, capsys):
    assert main(["evaluate", "-m", str(finished / "model.pt"), "-s", "data.num_classes=6",
                 "-s", "data.label_spec={num_classes: 6}", "-o", str(tmp_path / "e")]) == 2
    assert "4 centroids" in _err(capsys)


def test_evaluate_applies_overrides_on_the_stored_config(finished, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["evaluate", "-m", str(finished / "model.pt"), "-s", "eval.flip=false", "-o", str(out),
                 "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["flip_tta"] is False and "no_crf_single_view" not in m and m["num_images"] == 3
    # the same split as the run's own evaluation: the stored config was used, not the built-in CamVid defaults
    stored = json.loads((finished / "metrics.json").read_text())
    assert stored["no_crf_single_view"]["miou"] == pytest.approx(m["no_crf"]["miou"])


def test_evaluate_reports_single_view_and_flip_tta_and_says_which(finished):
    m = json.loads((finished / "metrics.json").read_text())
    assert {"no_crf", "no_crf_single_view"} <= set(m) and m["flip_tta"] is True
    assert "official" in m["settings"]["no_crf_single_view"] and "flip" in m["settings"]["no_crf"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
@pytest.mark.parametrize("cmd", ["evaluate", "train"])
def test_cuda_on_a_cpu_only_torch(finished, data, tmp_path, capsys, cmd):
    argv = (["evaluate", "-m", str(finished / "model.pt")] if cmd == "evaluate"
            else ["train", *TINY, "--data-root", str(data)])
    assert main([*argv, "--device", "cuda", "-o", str(tmp_path / "o")]) == 2
    assert "cuda" in _err(capsys) and not (tmp_path / "o").exists()


def test_evaluate_unknown_split_and_unlabelled_model(finished, data, tmp_path, capsys):
    assert main(["evaluate", "-m", str(finished / "model.pt"), "--split", "tset", "-o", str(tmp_path / "e")]) == 2
    assert "tset" in _err(capsys)
    assert main(["evaluate", "-m", str(finished / "model.pt"), "--dataset", "images",
                 "--data-root", str(data / "val" / "images"), "-o", str(tmp_path / "e")]) == 2
    assert "masks" in _err(capsys)


def test_figures_failure_keeps_metrics(finished, tmp_path, monkeypatch, capsys):
    import causeseg.evaluate as ev

    def boom(*a, **k):
        raise IndexError("figure trouble")

    monkeypatch.setattr(ev, "_figures", boom)
    out = tmp_path / "e"
    assert main(["evaluate", "-m", str(finished / "model.pt"), "-o", str(out), "--no-progress"]) == 0
    assert "no_crf" in json.loads((out / "metrics.json").read_text())


def test_figures_with_a_21_class_label_map(tmp_path):
    from causeseg.data.labelmaps import get_label_map
    from causeseg.evaluate import _figures

    rng = np.random.default_rng(0)
    conf = rng.integers(0, 50, size=(21, 21))
    res = {"no_crf": {"mapping": list(range(21)), "per_class_iou": list(rng.random(21)), "confusion": conf.tolist()}}
    keep = {"images": [np.zeros((8, 8, 3), np.uint8)], "gts": [rng.integers(0, 21, (8, 8))],
            "preds": [rng.integers(0, 21, (8, 8))], "crf": [], "concepts": []}
    _figures(tmp_path, keep, res, list(get_label_map("voc21").names), 21)
    assert (tmp_path / "iou.png").exists() and (tmp_path / "confusion.png").exists()


def test_label_map_and_num_classes_must_agree(data, tmp_path, capsys):
    assert main(["train", *TINY, "--data-root", str(data), "-s", "data.label_spec=voc21",
                 "-o", str(tmp_path / "r")]) == 2
    assert "21 classes" in _err(capsys) and not (tmp_path / "r").exists()


def test_single_view_and_tta_scores_match_the_predictor(finished):
    from causeseg.evaluate import _scores
    from causeseg.model import CauseModel
    from causeseg.predict import Predictor

    model = CauseModel.load(finished / "model.pt")
    x = torch.rand(2, 3, 64, 64)
    tta, single = _scores(Predictor(model, flip=True), x, want_single=True)
    assert torch.equal(tta, Predictor(model, flip=True).scores(x))
    assert torch.equal(single, Predictor(model, flip=False).scores(x))


# -------------------------------------------------------------------------------------------------
# 4. model files load as tensors and plain data only
# -------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_crafted_model_file_runs_no_code(finished, tmp_path, capsys):
    marker = tmp_path / "pwned"
    obj = torch.load(finished / "model.pt", weights_only=True)
    obj["meta"]["x"] = _Payload(str(marker))
    evil = tmp_path / "model.pt"
    torch.save(obj, evil)
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    assert main(["predict", str(img), "-m", str(evil), "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "refused" in _err(capsys) and not marker.exists()
    assert main(["evaluate", "-m", str(evil), "-o", str(tmp_path / "e")]) == 2
    assert not marker.exists()


def test_crafted_checkpoint_and_artifact_run_no_code(finished, data, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = _copy_run(finished, tmp_path / "run")
    head = torch.load(run / "artifacts" / "head.pt", weights_only=True)
    head["meta"]["x"] = _Payload(str(marker))
    torch.save(head, run / "artifacts" / "head.pt")
    assert main(["train", *TINY, "--data-root", str(data), "-o", str(run)]) == 0  # rebuilt, never unpickled
    assert not marker.exists()
    ck = torch.load(run / "checkpoints" / "step3.pt", weights_only=True)
    ck["x"] = _Payload(str(marker))
    torch.save(ck, run / "checkpoints" / "step3.pt")
    (run / "artifacts" / "centroids.pt").unlink()
    assert main(["train", *TINY, "--data-root", str(data), "-o", str(run)]) == 2
    assert "step3.pt" in _err(capsys) and not marker.exists()


def test_model_file_missing_entries_and_wrong_backbone(finished, tmp_path, capsys):
    obj = torch.load(finished / "model.pt", weights_only=True)
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    partial = dict(obj)
    del partial["centroids"]
    torch.save(partial, tmp_path / "partial.pt")
    assert main(["predict", str(img), "-m", str(tmp_path / "partial.pt"), "-o", str(tmp_path / "o")]) == 2
    assert "partial.pt" in (e := _err(capsys)) and "centroids" in e
    obj["meta"]["backbone"]["options"] = {"feature_stride": 8}  # 40-d features, the head wants 112
    torch.save(obj, tmp_path / "mismatch.pt")
    assert main(["predict", str(img), "-m", str(tmp_path / "mismatch.pt"), "-o", str(tmp_path / "o")]) == 2
    assert "mismatch.pt" in (e := _err(capsys)) and "112-d" in e


# -------------------------------------------------------------------------------------------------
# 5. every bad input gets a clear error before any work
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,key", [
    ("step2.epochs=0", "step2.epochs"), ("step1.batch_size=0", "step1.batch_size"), ("step2.tau=0", "step2.tau"),
    ("step2.dropout=1.5", "step2.dropout"), ("data.dataset=kitti", "data.dataset"), ("data.crop=seven", "data.crop"),
    ("data.mode=stretch", "data.mode"), ("step3.lr=-1", "step3.lr"),
    ("eval.resolution=0", "eval.resolution"), ("run.device=tpu", "run.device"), ("data.on_error=ignore", "data.on_error"),
])
def test_out_of_range_settings(data, tmp_path, capsys, override, key):
    assert main(["train", *TINY, "--data-root", str(data), "-s", override, "-o", str(tmp_path / "r")]) == 2
    assert key in _err(capsys) and not (tmp_path / "r").exists()


def test_unknown_backbone(data, tmp_path, capsys):
    assert main(["train", *TINY, "--data-root", str(data), "--backbone", "resnet50", "-o", str(tmp_path / "r")]) == 2
    assert "backbone.name" in _err(capsys) and not (tmp_path / "r").exists()


def test_k_against_tokens_and_bank_memory(data, tmp_path, capsys):
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step1.k=5000", "-o", str(tmp_path / "r")]) == 2
    assert "step1.k=5000" in (e := _err(capsys)) and "tokens" in e
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step2.bank_size=100000000",
                 "-o", str(tmp_path / "r")]) == 2
    assert "GiB" in _err(capsys)
    # 6 items x 1 window (4x4 tokens at 64 px, step3.grid 4): too few tokens to seed 8 centroids
    assert main(["train", *TINY, "--data-root", str(data), "-s", "step3.init=kmeans++", "-s", "data.num_classes=8",
                 "-s", "data.label_spec={num_classes: 8}", "-o", str(tmp_path / "r")]) == 2
    assert "step3.init=kmeans++" in (e := _err(capsys)) and "gives 6 (6 items x 1 per item" in e
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_output_under_a_file(data, finished, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["train", *TINY, "--data-root", str(data), "-o", str(f / "run")]) == 2
    assert "is a file" in _err(capsys)
    assert main(["predict", str(data / "val" / "images"), "-m", str(finished / "model.pt"), "-o", str(f / "p")]) == 2
    assert "is a file" in _err(capsys)


@pytest.mark.parametrize("res", ["0", "-3", "8"])
def test_predict_resolution(finished, data, tmp_path, capsys, res):
    assert main(["predict", str(data / "val" / "images"), "-m", str(finished / "model.pt"),
                 "-o", str(tmp_path / "p"), "--resolution", res]) == 2
    assert "--resolution" in _err(capsys)


def test_ctrl_c_in_predict_does_not_talk_about_checkpoints(finished, data, tmp_path, capsys, monkeypatch):
    import causeseg.predict as pr

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pr, "predict_folder", interrupted)
    assert main(["predict", str(data / "val" / "images"), "-m", str(finished / "model.pt"),
                 "-o", str(tmp_path / "p"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint" not in err


# -------------------------------------------------------------------------------------------------
# 7. help texts and consistent flags
# -------------------------------------------------------------------------------------------------
def test_every_subcommand_and_flag_has_help_and_o_v_work_everywhere():
    import argparse

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, p in sub.choices.items():
        assert helps.get(name), f"{name} has no help"
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        opts = {o for a in p._actions for o in a.option_strings}
        assert "-v" in opts, name
        if name not in ("presets", "backbones"):
            assert {"-o", "--out"} <= opts, name


def test_tiny_image_in_training_names_the_file_and_skip_honours_it(data, tmp_path, capsys):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(data, root)
    Image.new("RGB", (1, 1)).save(root / "train" / "images" / "zz_dot.png")
    assert main(["train", *TINY, "--data-root", str(root), "-o", str(tmp_path / "r")]) == 2
    assert "zz_dot.png" in _err(capsys)
    assert main(["train", *TINY, "--data-root", str(root), "-s", "data.on_error=skip", "-o", str(tmp_path / "r")]) == 0


def test_large_image_is_called_large_not_corrupt(finished, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAUSESEG_MAX_PIXELS", "")  # restored after the test: --max-pixels sets it
    img = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(img)
    assert main(["predict", str(img), "-m", str(finished / "model.pt"), "-o", str(tmp_path / "p"),
                 "--max-pixels", "1000", "--no-progress"]) == 2
    err = _err(capsys)
    assert "big.png" in err and "large" in err and "corrupt or truncated" not in err
    assert main(["predict", str(img), "-m", str(finished / "model.pt"), "-o", str(tmp_path / "p"),
                 "--max-pixels", "0", "--no-progress", "--no-crf"]) == 0


def test_model_refuses_other_backbone_weights(finished, tmp_path, capsys):
    obj = torch.load(finished / "model.pt", weights_only=True)
    obj["meta"]["backbone"]["digest"] = "0123456789abcdef"  # as if trained on other weights
    torch.save(obj, tmp_path / "other.pt")
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    assert main(["predict", str(img), "-m", str(tmp_path / "other.pt"), "-o", str(tmp_path / "o")]) == 2
    assert "other.pt" in (e := _err(capsys)) and "0123456789abcdef" in e
