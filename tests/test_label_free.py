"""Label-free by construction: training runs with a trap that fails on any access to a mask.

A subprocess installs a Python audit hook (``sys.addaudithook``) that raises on every ``open`` of a file under a
masks folder and on every listing of one, and replaces ``causeseg.data.io.load_mask`` with a function that raises;
then it trains (``causeseg.train.train_all``) over the variants that matter: MLP and TR heads, every Step-1
discretiser, every Step-3 learner, every crop kind, feature cache on and off, bf16 autocast on the CPU, loader
worker processes (forked, so the hook is theirs too), and pseudo-label self-training after Step 3
(``selftrain.enabled``, CRF-refined pseudo labels). The dataset has three images and masks for two of them:
every variant must train on all three images. The audit hook records any attempt even if some code swallowed the
exception, and the test fails on a non-empty record.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

RUNNER = r"""
import json, os, sys
from pathlib import Path

MASKS = [os.path.realpath(p) for p in json.loads(os.environ["TRAP_MASK_DIRS"])]
touched = []

class MaskTouched(RuntimeError):
    pass

def _hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        rp = os.path.realpath(p)
        if any(rp == m or rp.startswith(m + os.sep) for m in MASKS):
            touched.append(f"{event} {p}")
            raise MaskTouched(f"training touched a mask: {event} {p}")

sys.addaudithook(_hook)

import causeseg.data.io as io
import causeseg.data.datasets as datasets

def _no_masks(path, *a, **k):
    touched.append(f"load_mask {path}")
    raise MaskTouched(f"training called load_mask({path})")

io.load_mask = datasets.load_mask = _no_masks

import causeseg.train as train
from causeseg.config import load_config

seen = []

class RecordingSource(train.FeatureSource):
    def __init__(self, backbone, dataset, **kw):
        super().__init__(backbone, dataset, **kw)
        seen.append({"items": self.n, "images": dataset.num_images, "cached": self.cached})

train.FeatureSource = RecordingSource
out = []
for v in json.loads(os.environ["TRAP_VARIANTS"]):
    seen.clear()
    cfg = load_config(None, v["overrides"])
    model = train.train_all(cfg, v["run"])
    st = os.path.join(v["run"], "artifacts", "selftrain.pt")
    samples = None
    if os.path.exists(st):
        import torch
        samples = torch.load(st, weights_only=True)["meta"]["selftrain"]["samples"]
    out.append({"name": v["name"], "model": os.path.exists(model), "sources": list(seen), "selftrain": samples})
print("RESULT " + json.dumps({"runs": out, "touched": touched}))
"""

BASE = [
    "backbone.name=efficientnet_lite0", "backbone.options={feature_stride: 16}",
    "data.dataset=paired", "data.num_classes=11", "data.label_spec=camvid11",
    "step1.k=8", "step1.resolution=64", "step1.batch_size=4", "step1.epochs=1", "step1.max_samples=400",
    "step2.resolution=64", "step2.batch_size=4", "step2.epochs=1", "step2.projection_dim=16", "step2.ffn_dim=16",
    "step2.reduced_dim=8", "step2.bank_size=4",
    "step3.resolution=64", "step3.batch_size=4", "step3.epochs=1", "step3.init_tokens=64",
    "eval.resolution=64", "run.progress=false", "run.checkpoint_every=1000", "data.num_workers=0",
]

#: (name, head, Step-1 discretiser, Step-3 learner, crop, feature cache, amp, loader workers, dataset folder)
VARIANTS = [
    ("tr-modularity-none", "tr", "modularity", "modularity", "none", "on", "off", 0, "data"),
    ("mlp-kmeanspp-five", "mlp", "kmeans++", "kmeans", "five", "off", "bf16", 1, "data"),
    ("tr-spectral-ten", "tr", "spectral", "sinkhorn", "ten", "off", "off", 0, "data"),
    ("mlp-agglomerative-double", "mlp", "agglomerative", "modularity", "double", "on", "bf16", 0, "data"),
    ("tr-ward-super", "tr", "ward", "kmeans", "super", "on", "off", 0, "data"),
    ("mlp-modularity-five-nomasks", "mlp", "modularity", "modularity", "five", "on", "bf16", 1, "nomasks"),
    ("mlp-kmeans-none-selftrain", "mlp", "kmeans++", "kmeans", "none", "off", "off", 0, "data"),
]
#: extra settings of some variants: self-training labels the training images (CRF on) after Step 3
EXTRA = {"mlp-kmeans-none-selftrain": ["selftrain.enabled=true", "selftrain.epochs=1", "selftrain.hidden=4",
                                       "selftrain.batch_size=2", "eval.crf_workers=0"]}
CROPS = {"none": 1, "five": 5, "ten": 10, "double": 20, "super": 50}


def _write_data(root: Path, with_masks: bool) -> None:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    for i in range(3):
        img = np.zeros((48, 64, 3), np.uint8)
        img[:, : 16 * (i + 1)] = (200, 30 * i, 40)  # a two-region scene with some noise
        img = np.clip(img.astype(int) + rng.integers(0, 40, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"im{i}.png")
    if with_masks:
        (root / "masks").mkdir()
        for i in range(2):  # no mask for im2
            Image.fromarray(rng.integers(0, 11, (48, 64)).astype(np.uint8)).save(root / "masks" / f"im{i}.png")


def test_training_never_touches_a_mask(tmp_path):
    _write_data(tmp_path / "data", with_masks=True)
    _write_data(tmp_path / "nomasks", with_masks=False)
    variants = []
    for name, head, disc, learner, crop, cache, amp, workers, folder in VARIANTS:
        ov = BASE + [f"data.root={tmp_path / folder}", f"step2.head={head}", f"step1.method={disc}",
                     f"step3.learner={learner}", f"data.crop={crop}", f"run.feature_cache={cache}",
                     f"run.amp={amp}", f"data.num_workers={workers}", *EXTRA.get(name, [])]
        bs = 2 if crop == "none" else 8
        ov += [f"step1.batch_size={bs}", f"step2.batch_size={bs}", f"step3.batch_size={bs}"]
        variants.append({"name": name, "overrides": ov, "run": str(tmp_path / "runs" / name)})
    env = dict(os.environ, TRAP_VARIANTS=json.dumps(variants),
               TRAP_MASK_DIRS=json.dumps([str(tmp_path / "data" / "masks"), str(tmp_path / "nomasks" / "masks")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUNNER], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(line[-1][len("RESULT "):])
    assert result["touched"] == []
    assert [r["name"] for r in result["runs"]] == [v[0] for v in VARIANTS]
    for run, (name, _h, _d, _l, crop, cache, *_rest) in zip(result["runs"], VARIANTS):
        assert run["model"], name
        assert run["sources"], name
        for src in run["sources"]:  # all three images train, though one has no mask (or none has)
            assert src["images"] == 3 and src["items"] == 3 * CROPS[crop], (name, src)
            assert src["cached"] == (cache == "on"), (name, src)
        # the self-trained variant pseudo-labelled all three images and their mirrors; the others have no stage
        assert run["selftrain"] == (6 if name in EXTRA else None), (name, run["selftrain"])


def test_the_trap_fires_on_a_mask_read(tmp_path):
    """The trap is real: evaluation-style reading (with labels) under the same hook fails."""
    _write_data(tmp_path / "data", with_masks=True)
    code = RUNNER.split("import causeseg.train as train")[0] + (
        "try:\n"
        "    datasets.PairedFolder(os.environ['TRAP_ROOT'], 'camvid11', with_labels=True)[0]\n"
        "except MaskTouched:\n    pass\n"
        "print('TOUCHED', len(touched))\n")
    env = dict(os.environ, TRAP_MASK_DIRS=json.dumps([str(tmp_path / "data" / "masks")]),
               TRAP_ROOT=str(tmp_path / "data"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TOUCHED 1" in proc.stdout, proc.stdout
