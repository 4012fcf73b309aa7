"""End-to-end Steps 1-3 on real CamVid images with the packaged EfficientNet-Lite0 backbone.

Proves: the pipeline writes its artifacts; it is label-free (random or absent masks give
bit-identical clusterbook, head and centroids); an interrupted run resumes to the same result;
the same seed gives the same result; the model file round-trips and predicts at original size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from causeseg.config import load_config
from causeseg.loop import TrainingInterrupted
from causeseg.train import train_all

N_IMAGES = 8


@pytest.fixture(scope="module")
def camvid_subset(tmp_path_factory, request):
    from causeseg.data.root import data_root

    root = data_root()
    if root is None or not (root / "camvid" / "train" / "images").is_dir():
        pytest.skip("shared data not found (../shared/data or CAUSESEG_DATA_ROOT): camvid/train needed")
    src = root / "camvid" / "train"
    names = sorted(p.stem for p in (src / "images").glob("*.png"))[:N_IMAGES]
    base = tmp_path_factory.mktemp("camvid")
    for variant in ("real", "random"):
        (base / variant / "images").mkdir(parents=True)
        (base / variant / "masks").mkdir(parents=True)
    (base / "nolabels").mkdir()
    rng = np.random.default_rng(0)
    for n in names:
        for variant in ("real", "random"):
            shutil.copy(src / "images" / f"{n}.png", base / variant / "images" / f"{n}.png")
        shutil.copy(src / "images" / f"{n}.png", base / "nolabels" / f"{n}.png")
        shutil.copy(src / "masks" / f"{n}.png", base / "real" / "masks" / f"{n}.png")
        m = np.array(Image.open(src / "masks" / f"{n}.png"))
        Image.fromarray(rng.integers(0, 12, size=m.shape).astype(np.uint8)).save(base / "random" / "masks" / f"{n}.png")
    return base


def tiny_config(root: Path, dataset: str = "paired", head: str = "tr", **extra):
    ov = [
        "backbone.name=efficientnet_lite0", "backbone.options={feature_stride: 16}",
        f"data.dataset={dataset}", f"data.root={root}", "data.num_classes=11", "data.label_spec=camvid11",
        "step1.k=32", "step1.resolution=128", "step1.batch_size=4", "step1.epochs=1", "step1.lr=0.01",
        f"step2.head={head}", "step2.resolution=128", "step2.batch_size=4", "step2.epochs=2",
        "step2.projection_dim=64", "step2.ffn_dim=64", "step2.reduced_dim=16", "step2.bank_size=8",
        "step2.phi_pos=0.2", "step2.ema_warmup=true",  # the resume test then covers the EMA step counter
        "step3.resolution=128", "step3.batch_size=4", "step3.epochs=2",
        "eval.resolution=128", "run.progress=false", "run.checkpoint_every=1",
    ]
    ov += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, ov)


def artifacts(run: Path) -> dict[str, torch.Tensor]:
    book = torch.load(run / "artifacts" / "clusterbook.pt", weights_only=True)["prototypes"]
    head = torch.load(run / "artifacts" / "head.pt", weights_only=True)["teacher"]
    cent = torch.load(run / "artifacts" / "centroids.pt", weights_only=True)["centroids"]
    out = {"clusterbook": book, "centroids": cent}
    out.update({f"head.{k}": v for k, v in head.items()})
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference_run(camvid_subset, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    train_all(tiny_config(camvid_subset / "real"), run)
    return run


def test_pipeline_writes_artifacts(reference_run):
    for rel in ("config.yaml", "model.pt", "artifacts/clusterbook.pt", "artifacts/head.pt", "artifacts/centroids.pt",
                "checkpoints/step2.pt", "train_summary.json"):
        assert (reference_run / rel).exists(), rel
    a = artifacts(reference_run)
    assert a["clusterbook"].shape == (32, 112)
    assert a["centroids"].shape == (11, 16)
    assert all(torch.isfinite(v).all() for v in a.values() if v.is_floating_point())


def test_label_free_random_and_absent_masks(camvid_subset, reference_run, tmp_path):
    """Masks replaced by random labels, or absent altogether, give bit-identical results."""
    run_random = tmp_path / "random"
    train_all(tiny_config(camvid_subset / "random"), run_random)
    assert_identical(artifacts(reference_run), artifacts(run_random))
    run_images = tmp_path / "images"
    train_all(tiny_config(camvid_subset / "nolabels", dataset="images"), run_images)
    assert_identical(artifacts(reference_run), artifacts(run_images))


def test_interrupt_and_resume_gives_same_result(camvid_subset, reference_run, tmp_path):
    run = tmp_path / "resumed"
    cfg = tiny_config(camvid_subset / "real")
    with pytest.raises(TrainingInterrupted):
        train_all(cfg, run, stop_after={"step2": 1})
    assert (run / "checkpoints" / "step2.pt").exists() and not (run / "artifacts" / "head.pt").exists()
    with pytest.raises(TrainingInterrupted):
        train_all(cfg, run, stop_after={"step2": 2, "step3": 1})
    train_all(cfg, run)
    assert_identical(artifacts(reference_run), artifacts(run))


def test_resume_from_incomplete_checkpoint_names_file_and_missing_state(camvid_subset, tmp_path):
    run = tmp_path / "old"
    cfg = tiny_config(camvid_subset / "real")
    with pytest.raises(TrainingInterrupted):
        train_all(cfg, run, stop_after={"step2": 1})
    path = run / "checkpoints" / "step2.pt"
    ck = torch.load(path, weights_only=True)
    del ck["state"]["step2"]["bank_gen"]  # a checkpoint that lacks part of the step's state
    torch.save(ck, path)
    with pytest.raises(RuntimeError, match=r"step2\.pt: cannot resume 'step2'.*bank_gen.*delete the checkpoint"):
        train_all(cfg, run)
    path.unlink()  # the remedy the message names
    train_all(cfg, run)
    assert (run / "artifacts" / "head.pt").exists()


def test_model_roundtrip_and_predict_original_size(reference_run, camvid_subset, tmp_path):
    from causeseg.model import CauseModel
    from causeseg.predict import Predictor, predict_folder

    model = CauseModel.load(reference_run / "model.pt")
    # a folder mixing sizes and formats: grayscale, RGBA, tiny and a non-square crop
    src = sorted((camvid_subset / "real" / "images").glob("*.png"))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    img = Image.open(src[0]).convert("RGB")
    img.convert("L").save(inputs / "gray.png")
    img.convert("RGBA").save(inputs / "rgba.png")
    img.resize((20, 15)).save(inputs / "tiny.jpg")
    img.crop((0, 0, 301, 97)).save(inputs / "wide.bmp")
    files = sorted(inputs.iterdir())
    report = predict_folder(Predictor(model, flip=True), files, tmp_path / "out", resolution=128, crf=False,
                            progress=False)
    assert len(report["written"]) == 4
    for item in report["written"]:
        w, h = Image.open(item["file"]).size
        lab = Image.open(tmp_path / "out" / item["labels"])
        assert lab.size == (w, h)
        assert np.array(lab).max() < 11


def test_step3_kmeanspp_init_seeds_centroids_on_head_outputs(reference_run, camvid_subset, tmp_path):
    """step3.init=kmeans++ with lr 0: every centroid is the (unit) EMA-head output of a training token."""
    from causeseg.model import CauseModel
    from causeseg.train import build_split

    runs = []
    for name in ("a", "b"):
        run = tmp_path / name
        (run / "artifacts").mkdir(parents=True)
        for f in ("clusterbook.pt", "head.pt"):  # reuse Steps 1-2 of the reference run
            shutil.copy(reference_run / "artifacts" / f, run / "artifacts" / f)
        cfg = tiny_config(camvid_subset / "real", **{"step3.init": "kmeans++", "step3.lr": 0.0})
        runs.append(CauseModel.load(train_all(cfg, run)))
    model = runs[0]
    assert torch.equal(model.centroids, runs[1].centroids)  # same seed, same seeds
    ds = build_split(cfg, ".", 128, with_labels=False)
    with torch.no_grad():
        y = model.embed(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    y = torch.nn.functional.normalize(y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]), dim=1)
    best = (model.centroids @ y.t()).max(1).values
    torch.testing.assert_close(best, torch.ones_like(best), rtol=0, atol=1e-4)
    assert torch.linalg.matrix_rank(model.centroids) == len(model.centroids)  # distinct seeds
