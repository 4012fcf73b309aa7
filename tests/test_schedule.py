"""Step lengths in optimiser steps (``step*.iterations``) and the learning-rate scaling of the published runs.

A run of ``iterations`` steps visits the seeded epoch orders like an epoch run and stops inside the last epoch
with a checkpoint there; interrupted and resumed it gives bit for bit the run without interruption; a multiple of
the steps per epoch equals the epoch run; ``run.lr_scaling=published`` multiplies every step's lr by 4.
"""

from __future__ import annotations

import math

import pytest
import torch

from causeseg.config import ConfigError, load_config, save_config
from causeseg.distributed import DistContext
from causeseg.features import FeatureSource, epoch_order
from causeseg.loop import LoopSpec, TrainingInterrupted, planned_epochs, run_loop

N_ITEMS, BATCH = 12, 4  # 3 steps per epoch


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i]}


class _Pool(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)


class _State:
    """Module + optimiser as one stateful object (as the training steps' adapter)."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def _source() -> FeatureSource:
    return FeatureSource(_Pool(), _Images(N_ITEMS), device=torch.device("cpu"), amp="off", cache="off",
                         num_workers=0, progress=False)


def _run(ckpt, *, iterations=None, epochs=1, stop_after=None, trace=None):
    """One (possibly interrupted) run on a fresh model rebuilt from the seed; returns (model, summary, trace)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    trace = [] if trace is None else trace

    def step(feats, idx, epoch, global_step):
        noise = 1 + 0.1 * torch.rand(feats.shape[0], 1)  # the global RNG: a resume must restore it
        loss = (model(feats.reshape(feats.shape[0], -1)) * noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append((epoch, global_step, idx.tolist()))
        return {"loss": loss.item()}

    spec = LoopSpec("step2", _source(), epochs, BATCH, 3, ckpt, checkpoint_every=0, progress=False,
                    ctx=DistContext(), iterations=iterations)
    summary = run_loop(spec, step, {"step2": _State(model, opt)}, stop_after=stop_after)
    return model, summary, trace


def test_planned_epochs_is_ceil_of_iterations_over_steps_per_epoch():
    spec = LoopSpec("step1", None, 5, BATCH, 0, None)  # type: ignore[arg-type]
    assert planned_epochs(spec, 3) == 5  # epochs when no iterations are given
    for it in (1, 2, 3, 4, 6, 7, 300):
        spec.iterations = it
        assert planned_epochs(spec, 3) == math.ceil(it / 3)


def test_iterations_stop_inside_the_last_epoch_with_a_checkpoint_there(tmp_path):
    ckpt = tmp_path / "step2.pt"
    _, summary, trace = _run(ckpt, iterations=7)
    assert summary["steps"] == 7 and len(trace) == 7
    assert [t[0] for t in trace] == [0, 0, 0, 1, 1, 1, 2] and [t[1] for t in trace] == list(range(7))
    expected = torch.cat([epoch_order(N_ITEMS, 3, 0), epoch_order(N_ITEMS, 3, 1), epoch_order(N_ITEMS, 3, 2)[:4]])
    assert [i for t in trace for i in t[2]] == expected.tolist()  # the epochs' seeded orders, cut at step 7
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (ck["epoch"], ck["offset"], ck["global_step"]) == (2, 4, 7)  # inside epoch 2, after its first batch


def test_interrupted_iteration_run_resumes_bit_for_bit(tmp_path):
    ref_model, _, ref_trace = _run(tmp_path / "ref.pt", iterations=7)
    ckpt, trace = tmp_path / "step2.pt", []
    with pytest.raises(TrainingInterrupted):
        _run(ckpt, iterations=7, stop_after=2, trace=trace)  # inside epoch 0
    with pytest.raises(TrainingInterrupted):
        _run(ckpt, iterations=7, stop_after=2, trace=trace)  # ends on epoch 1's first step, across the boundary
    model, summary, _ = _run(ckpt, iterations=7, trace=trace)
    assert trace == ref_trace and summary["steps"] == 7
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    # a checkpoint that has reached the last iteration runs no further step
    again, summary, more = _run(ckpt, iterations=7)
    assert more == [] and summary["steps"] == 7
    for a, b in zip(again.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_interruption_at_the_last_iteration_resumes_to_the_same_end(tmp_path):
    ref_model, _, _ = _run(tmp_path / "ref.pt", iterations=5)
    ckpt = tmp_path / "step2.pt"
    with pytest.raises(TrainingInterrupted):
        _run(ckpt, iterations=5, stop_after=5)
    model, summary, trace = _run(ckpt, iterations=5)
    assert trace == [] and summary["steps"] == 5
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_whole_epochs_of_iterations_equal_the_epoch_run(tmp_path):
    by_epochs, s1, t1 = _run(tmp_path / "a.pt", epochs=2)
    by_steps, s2, t2 = _run(tmp_path / "b.pt", iterations=6, epochs=1)  # iterations win over epochs
    assert t1 == t2 and s1["steps"] == s2["steps"] == 6
    for a, b in zip(by_epochs.parameters(), by_steps.parameters()):
        assert torch.equal(a, b)


def test_iterations_and_lr_scaling_settings_are_checked_and_round_trip(tmp_path):
    cfg = load_config(None, ["step1.iterations=10", "step2.iterations=20", "step3.iterations=30",
                             "run.lr_scaling=published"])
    assert (cfg.step1.iterations, cfg.step2.iterations, cfg.step3.iterations) == (10, 20, 30)
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back.to_dict() == cfg.to_dict()
    assert load_config(None, []).step2.iterations is None  # default: the epochs decide
    for bad, key in (("step1.iterations=0", "step1.iterations"), ("step3.iterations=-2", "step3.iterations"),
                     ("step2.iterations=1.5", "step2.iterations"), ("run.lr_scaling=gpus", "run.lr_scaling")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


@pytest.mark.parametrize("scaling,world,factor", [("none", 2, 1), ("linear", 2, 2), ("linear", 3, 3),
                                                  ("published", 1, 4), ("published", 2, 4)])
def test_lr_scaling_rules(scaling, world, factor):
    from causeseg.train import PUBLISHED_GPUS, _lr

    assert PUBLISHED_GPUS == 4  # the official `run` script's GPU count
    cfg = load_config(None, [f"run.lr_scaling={scaling}"])
    assert _lr(1e-3, cfg, DistContext(rank=0, world_size=world)) == pytest.approx(1e-3 * factor, rel=1e-15)


def test_train_steps_pass_iterations_and_published_lr(tmp_path):
    """Step 1 (modularity) and Step 3 run exactly their iterations with lr x 4 under run.lr_scaling=published."""
    from causeseg.train import train_step1, train_step2, train_step3

    cfg = load_config(None, ["step1.k=4", "step1.batch_size=4", "step1.iterations=4", "step1.lr=0.01",
                             "step2.head=mlp", "step2.batch_size=4", "step2.iterations=2", "step2.projection_dim=8",
                             "step2.reduced_dim=4", "step2.ffn_dim=8", "step2.bank_size=2",
                             "step3.batch_size=4", "step3.iterations=5", "data.num_classes=2",
                             "step3.init_tokens=2", "step1.grid=1", "step2.grid=1", "step3.grid=1",
                             "run.lr_scaling=published", "run.progress=false", "run.checkpoint_every=0", "run.amp=off"])
    dev, ctx, src = torch.device("cpu"), DistContext(), _source()
    book = train_step1(cfg, None, tmp_path, dev, ctx, source=src)
    assert book.meta["summary"]["steps"] == 4  # 1 epoch of 3 steps + 1 step of the second
    ck = torch.load(tmp_path / "checkpoints" / "step1.pt", map_location="cpu", weights_only=True)
    assert ck["state"]["step1"]["opt"]["param_groups"][0]["lr"] == pytest.approx(0.04)
    teacher, meta = train_step2(cfg, None, book, tmp_path, dev, ctx, source=src)
    assert meta["summary"]["steps"] == 2
    train_step3(cfg, None, book, teacher, tmp_path, dev, ctx, source=src)
    obj = torch.load(tmp_path / "artifacts" / "centroids.pt", map_location="cpu", weights_only=True)
    assert obj["summary"]["steps"] == 5
    ck = torch.load(tmp_path / "checkpoints" / "step3.pt", map_location="cpu", weights_only=True)
    assert ck["state"]["step3"]["opt"]["param_groups"][0]["lr"] == pytest.approx(4e-3)
    assert (ck["epoch"], ck["offset"], ck["global_step"]) == (1, 8, 5)
