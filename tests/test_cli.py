"""The `causeseg` command line end to end on a few real CamVid images (train, evaluate, predict)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from causeseg.cli import main

TINY = [
    "--backbone", "efficientnet_lite0", "-s", "backbone.options={feature_stride: 16}",
    "-s", "data.dataset=camvid", "-s", "data.num_classes=11",
    "-s", "step1.k=32", "-s", "step1.resolution=128", "-s", "step1.batch_size=4",
    "-s", "step2.head=mlp", "-s", "step2.resolution=128", "-s", "step2.batch_size=4", "-s", "step2.epochs=1",
    "-s", "step2.projection_dim=32", "-s", "step2.reduced_dim=16", "-s", "step2.bank_size=4",
    "-s", "step3.resolution=128", "-s", "step3.batch_size=4", "-s", "step3.epochs=1",
    "-s", "eval.resolution=128", "-s", "eval.crf_workers=0", "-s", "eval.figures=2", "--no-progress",
]


@pytest.fixture(scope="module")
def trained(camvid_tiny, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli_run")
    assert main(["run", *TINY, "--data-root", str(camvid_tiny), "-o", str(run)]) == 0
    return run


def test_run_writes_everything(trained, capsys):
    for rel in ("config.yaml", "log.txt", "model.pt", "metrics.json", "figures/predictions.png",
                "figures/iou.png", "figures/confusion.png", "figures/concepts.png"):
        assert (trained / rel).exists(), rel
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["num_images"] == 4
    for key in ("no_crf", "crf"):
        assert 0.0 <= metrics[key]["pacc"] <= 1.0
        assert len(metrics[key]["per_class_iou"]) == 11
    assert metrics["crf_seconds_per_image"] > 0


def test_evaluate_uses_the_stored_config(trained, camvid_tiny, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "-m", str(trained / "model.pt"), "--data-root", str(camvid_tiny), "--no-crf",
                 "--out", str(out), "--no-progress"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stored = json.loads((trained / "metrics.json").read_text())
    assert line["no_crf"]["miou"] == pytest.approx(stored["no_crf"]["miou"])
    assert "crf" not in line


def test_linear_probe_is_a_separate_evaluation(trained, camvid_tiny, tmp_path, capsys):
    import torch

    before = torch.load(trained / "model.pt", weights_only=True)["head"]
    out = tmp_path / "probe"
    assert main(["evaluate", "-m", str(trained / "model.pt"), "--data-root", str(camvid_tiny), "--no-crf",
                 "--linear-probe", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["linear_probe"]["pacc"] <= 1.0 and "supervised" in metrics["linear_probe"]["note"]
    after = torch.load(trained / "model.pt", weights_only=True)["head"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the unsupervised model is untouched


def test_predict_folder_and_bad_files(trained, camvid_tiny, tmp_path, capsys):
    inputs = tmp_path / "mixed"
    inputs.mkdir()
    src = sorted((camvid_tiny / "val" / "images").glob("*.png"))[0]
    img = Image.open(src).convert("RGB")
    img.save(inputs / "a.jpg")
    img.convert("L").save(inputs / "b.png")
    np16 = (np.array(img.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(np16).save(inputs / "c16.png")
    out = tmp_path / "pred"
    assert main(["predict", str(inputs), "-m", str(trained / "model.pt"), "-o", str(out), "--no-progress"]) == 0
    for name in ("a.jpg", "b.png", "c16.png"):  # outputs keep the input's suffix: never two inputs on one file
        assert Image.open(out / "labels" / f"{name}.png").size == img.size
        assert (out / "overlays" / f"{name}.png").exists()
    # a corrupt file: a clear error naming it, or skipped and reported with --skip-bad
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["predict", str(inputs), "-m", str(trained / "model.pt"), "-o", str(out), "--no-progress"]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert main(["predict", str(inputs), "-m", str(trained / "model.pt"), "-o", str(out), "--no-progress",
                 "--skip-bad"]) == 0
    report = json.loads((out / "predictions.json").read_text())
    assert [Path(s["file"]).name for s in report["skipped"]] == ["broken.png"]


def test_listing_commands(capsys):
    assert main(["presets"]) == 0
    assert "cocostuff27_dino_vitb8_tr" in capsys.readouterr().out.split()
    assert main(["backbones"]) == 0
    names = capsys.readouterr().out.split()
    assert {"dino_vits8", "dinov2_vitb14", "efficientnet_lite0", "mae_vitb16"} <= set(names)


def test_bad_model_file_and_config_errors(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    img = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(img)
    assert main(["predict", str(img), "-m", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "o")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["predict", str(img), "-m", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "model.pt: cannot read the model file" in capsys.readouterr().err
    assert main(["train", "-c", "no_such_preset", "-o", str(tmp_path / "r")]) == 2
    assert "no_such_preset" in capsys.readouterr().err
    assert main(["train", "-s", "step2.phi_pos=0.01", "-o", str(tmp_path / "r")]) == 2
    assert "phi_neg" in capsys.readouterr().err
