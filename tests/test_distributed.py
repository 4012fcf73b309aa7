"""Data-parallel training and evaluation with torch.distributed (gloo, 2 processes on the CPU).

Proves:
* one Step-2 update on 2 ranks x b gives the same head, teacher and bank as one single-process
  update on the combined batch 2b with the same samples (TR and MLP heads), also when the ranks
  hold different numbers of loss terms (the global-mean weighting), and likewise for the Step-1
  and Step-3 updates;
* after several realistic steps (dropout on, Adam) the student, the EMA teacher and the concept
  bank are bit-identical on both ranks;
* distributed evaluation (images sharded, CRF in worker processes, confusion all-reduced)
  gives the confusion and scores of single-process evaluation and of a naive count;
* the sharding, sample-offset resume and seeding helpers behave as documented;
* a real 2-process ``train_all`` on CamVid images completes, writes its feature cache
  data-parallel, and its mid-epoch checkpoint resumes with 1 process at the same sample offset
  (and a 1-process checkpoint resumes with 2 processes).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from causeseg import distributed as D
from causeseg.config import load_config

B = 2  # per-rank batch
C, H, W = 12, 8, 8  # synthetic backbone features: 12 channels on an 8x8 grid (4 windows of 4x4)
K = 6  # concepts: the first 6 unit vectors


# ---------------------------------------------------------------------------------------------
# process helpers
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, args: tuple, nprocs: int = 2, timeout: float = 90.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes; fail (and stop them) on a hang."""
    pc = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not pc.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in pc.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")


def _init(rank: int, world: int, port: int) -> D.DistContext:
    """What torchrun does, then the package's own initialisation (gloo on the CPU)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu")
    assert ctx.rank == rank and ctx.world_size == world
    import torch.distributed as dist

    assert dist.get_backend() == "gloo"
    return ctx


# ---------------------------------------------------------------------------------------------
# synthetic Step-2 problem
# ---------------------------------------------------------------------------------------------
def _cfg(head: str, dropout: float = 0.0):
    return load_config(None, [
        f"step2.head={head}", "step2.reduced_dim=8", "step2.projection_dim=16", "step2.ffn_dim=16",
        f"step2.dropout={dropout}", "step2.bank_size=4", "step2.grid=4", "step2.ema=0.9", "step2.grad_clip=0.5",
        "run.amp='off'", "run.seed=3",
    ])


def _codebook() -> torch.Tensor:
    return torch.eye(K, C)


def _features(windows: list[list[int]], seed: int) -> torch.Tensor:
    """(len, C, H, W) features whose 4x4 windows carry the given concepts (prototype + noise)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(windows), C, H, W)
    for b, concepts in enumerate(windows):
        for wi, m in enumerate(concepts):
            r, c = divmod(wi, 2)
            out[b, m, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 3.0
    return out + 0.3 * torch.rand(out.shape, generator=g)


def _step2_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two global batches of 2B images. In the first, image 0 (rank 0) has four concepts that occur
    nowhere else, so its in-batch term has no positive pair and is dropped: rank 0 holds 1 term,
    rank 1 holds 2 (the bank is still empty). The second batch also has bank terms."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda: torch.randint(0, 2, (4,), generator=g).tolist()  # noqa: E731
    first = _features([[2, 3, 4, 5], rnd(), rnd(), rnd()], seed=10)
    second = _features([rnd(), rnd(), [0, 2, 4, 5], [1, 3, 3, 2]], seed=11)
    return [(first, torch.tensor([5, 1, 7, 2])), (second, torch.tensor([0, 3, 6, 4]))]


def _step2_objects(cfg, head: str, opt_kind: str):
    from causeseg.bank import ConceptBank
    from causeseg.contrastive import concept_distance
    from causeseg.heads import make_teacher
    from causeseg.train import build_student

    torch.manual_seed(0)
    student = build_student(cfg, C, H * W if head == "tr" else None)
    teacher = make_teacher(student)
    bank = ConceptBank(K, cfg.step2.bank_size, cfg.step2.projection_dim, policy=cfg.step2.bank_policy)
    opt = (torch.optim.SGD(student.parameters(), lr=0.5) if opt_kind == "sgd"
           else torch.optim.Adam(student.parameters(), lr=1e-2))
    gen = torch.Generator().manual_seed(9)
    return student, teacher, bank, opt, gen, concept_distance(_codebook())


def _run_step2(cfg, head: str, batches, rank: int, world: int, opt_kind: str = "sgd") -> dict:
    from causeseg.train import step2_update

    student, teacher, bank, opt, gen, d_m = _step2_objects(cfg, head, opt_kind)
    stats = []
    for epoch, (feats, idx) in enumerate(batches):
        sl = slice(rank * len(feats) // world, (rank + 1) * len(feats) // world)
        stats.append(step2_update(cfg, student, teacher, bank, _codebook(), d_m, feats[sl], idx[sl], epoch, opt, gen,
                                  torch.device("cpu")))
    return {"student": {k: v.clone() for k, v in student.state_dict().items()},
            "teacher": {k: v.clone() for k, v in teacher.state_dict().items()},
            "bank": {k: v.clone() for k, v in bank.state_dict().items() if torch.is_tensor(v)},
            "gen": gen.get_state(), "stats": stats}


# ---------------------------------------------------------------------------------------------
# Step 1 and Step 3 updates (the per-step logic of causeseg.train, driven directly)
# ---------------------------------------------------------------------------------------------
def _run_step1_step3(feats: torch.Tensor, idx: torch.Tensor, rank: int, world: int) -> dict:
    from causeseg.centroids import CentroidLearner
    from causeseg.clusterbook import Codebook
    from causeseg.model import tokens
    from causeseg.modularity import gather_tokens, modularity_objective
    from causeseg.sampling import per_sample_grid

    sl = slice(rank * len(feats) // world, (rank + 1) * len(feats) // world)
    f, i = feats[sl], idx[sl]
    out = {}
    book = Codebook(K, C, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.SGD(book.parameters(), lr=1.0)
    x = gather_tokens(tokens(f), per_sample_grid(i, H, W, 4, seed=3, stage="step1", epoch=0, device="cpu"))
    loss = -modularity_objective(x, book.weight, tau=0.1, variant="code").mean()
    opt.zero_grad()
    loss.backward()
    D.average_gradients(book.parameters())
    opt.step()
    out["step1"] = book.weight.detach().clone()
    for learner_kind in ("modularity", "kmeans"):
        learner = CentroidLearner(3, C, learner_kind, 0.1, generator=torch.Generator().manual_seed(5))
        opt = torch.optim.SGD(learner.parameters(), lr=1.0)
        y = gather_tokens(tokens(f), per_sample_grid(i, H, W, 4, seed=3, stage="step3", epoch=1, device="cpu"))
        loss = learner.loss(y)
        opt.zero_grad()
        loss.backward()
        D.average_gradients(learner.parameters())
        opt.step()
        out[f"step3_{learner_kind}"] = learner.weight.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------
# evaluation problem
# ---------------------------------------------------------------------------------------------
NUM_CLASSES = 4


class _ColourPredictor:
    """A fixed per-pixel linear scorer standing in for a trained model (duck-types Predictor)."""

    def __init__(self) -> None:
        self.weight = torch.randn(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(2))
        self.device = torch.device("cpu")
        self.flip = False
        self.alpha = 1.0

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> torch.Tensor:
        return 4.0 * torch.einsum("kc,bchw->bkhw", self.weight, images - 0.5)


def _eval_dataset() -> list[dict]:
    g = torch.Generator().manual_seed(8)
    items = []
    for i in range(5):  # odd: the shards have 3 and 2 images
        lab = torch.randint(-1, NUM_CLASSES, (20, 24), generator=g)
        img = torch.rand(3, 20, 24, generator=g) * 0.3 + 0.7 * torch.nn.functional.one_hot(
            lab.clamp_min(0), 4)[..., :3].permute(2, 0, 1).float()
        items.append({"image": img, "label": lab, "index": i, "name": f"im{i}"})
    return items


def _evaluate(crf_workers: int) -> dict:
    from causeseg.evaluate import evaluate

    return evaluate(_ColourPredictor(), _eval_dataset(), num_classes=NUM_CLASSES, batch_size=2, crf=True,
                    crf_workers=crf_workers, progress=False, figures=0)


# ---------------------------------------------------------------------------------------------
# the 2-process worker for the synthetic checks (one spawn for all of them)
# ---------------------------------------------------------------------------------------------
def _synthetic_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, 2, port)
    res: dict = {}
    batches = _step2_batches()
    for head in ("tr", "mlp"):
        res[f"step2_{head}"] = _run_step2(_cfg(head), head, batches, rank, 2)
    # realistic settings: dropout on (masks differ per rank), Adam, more steps
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(12)
    many = [(_features(torch.randint(0, K, (4, 4), generator=g).tolist(), seed=20 + s), torch.arange(4) + 4 * s)
            for s in range(4)]
    res["sync"] = _run_step2(_cfg("tr", dropout=0.1), "tr", many, rank, 2, opt_kind="adam")
    res["step13"] = _run_step1_step3(batches[0][0], batches[0][1], rank, 2)
    res["eval"] = _evaluate(crf_workers=1)
    ranks = D.all_gather_object(rank)
    res["ranks"] = ranks
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    D.cleanup()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    _spawn(_synthetic_worker, (_free_port(), str(out)))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_close(a: dict, b: dict, what: str, atol: float = 2e-6, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        if torch.is_floating_point(a[k]):
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{what} {k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}"


def _assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what} {k} differs between ranks"


# ---------------------------------------------------------------------------------------------
# tests: synthetic
# ---------------------------------------------------------------------------------------------
def test_ranks_and_collectives(synthetic):
    assert synthetic[0]["ranks"] == [0, 1] == synthetic[1]["ranks"]


@pytest.mark.parametrize("head", ["tr", "mlp"])
def test_step2_update_matches_single_process_on_combined_batch(synthetic, head):
    torch.set_num_threads(1)
    single = _run_step2(_cfg(head), head, _step2_batches(), 0, 1)
    for r in range(2):
        dist_res = synthetic[r][f"step2_{head}"]
        _assert_close(dist_res["student"], single["student"], f"{head} student (rank {r})")
        _assert_close(dist_res["teacher"], single["teacher"], f"{head} teacher (rank {r})")
        _assert_close(dist_res["bank"], single["bank"], f"{head} bank (rank {r})")
        assert torch.equal(dist_res["gen"], single["gen"])
    # the parameters really moved (the comparison is not between two untouched inits)
    torch.manual_seed(0)
    from causeseg.train import build_student

    init = build_student(_cfg(head), C, H * W if head == "tr" else None).state_dict()
    assert any(not torch.allclose(init[k], single["student"][k]) for k in init)
    # the first step had unequal term counts per rank: only the global-mean weighting matches
    used = [synthetic[r][f"step2_{head}"]["stats"][0]["terms_used"] for r in range(2)]
    assert used == [1, 2]
    assert single["stats"][0]["terms_used"] == 3
    assert single["stats"][1]["terms_used"] > 4  # bank terms present in the second step


def test_bank_and_ema_teacher_identical_on_all_ranks(synthetic):
    a, b = synthetic[0]["sync"], synthetic[1]["sync"]
    _assert_equal(a["student"], b["student"], "student")
    _assert_equal(a["teacher"], b["teacher"], "EMA teacher")
    _assert_equal(a["bank"], b["bank"], "bank")
    assert int(a["bank"]["count"].sum()) > 0  # the bank was filled
    assert torch.equal(a["gen"], b["gen"])
    # the teacher is not a copy of the student (EMA lagged behind)
    assert any(not torch.equal(a["student"][k], a["teacher"][k]) for k in a["student"]
               if torch.is_floating_point(a["student"][k]))


def test_step1_and_step3_updates_match_single_process(synthetic):
    torch.set_num_threads(1)
    feats, idx = _step2_batches()[0]
    single = _run_step1_step3(feats, idx, 0, 1)
    for r in range(2):
        _assert_close(synthetic[r]["step13"], single, f"step1/3 rank {r}")


def test_distributed_evaluation_matches_single_process(synthetic):
    single = _evaluate(crf_workers=0)
    # naive reference for the plain confusion: count (prediction, label) pairs image by image
    pred_conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    p = _ColourPredictor()
    for item in _eval_dataset():
        pred = p.scores(item["image"][None])[0].argmax(0)
        for pp, ll in zip(pred.flatten().tolist(), item["label"].flatten().tolist()):
            if ll >= 0:
                pred_conf[pp, ll] += 1
    assert single["no_crf"]["cluster_confusion"] == pred_conf.tolist()
    for r in range(2):
        res = synthetic[r]["eval"]
        assert res["num_images"] == 5
        for key in ("no_crf", "crf"):
            assert res[key]["cluster_confusion"] == single[key]["cluster_confusion"], (r, key)
            assert res[key]["matching"] == single[key]["matching"]
            assert res[key]["miou"] == pytest.approx(single[key]["miou"], nan_ok=True)
    assert synthetic[0]["eval"]["crf"]["cluster_confusion"] != synthetic[0]["eval"]["no_crf"]["cluster_confusion"]


# ---------------------------------------------------------------------------------------------
# tests: helpers (single process)
# ---------------------------------------------------------------------------------------------
def test_shard_indices_partition_global_batches():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    for world in (1, 2, 3):
        shards = [D.shard_indices(order, D.DistContext(r, world), 3) for r in range(world)]
        steps = 23 // (3 * world)
        assert all(len(s) == steps * 3 for s in shards)
        for g in range(steps):  # step g of all ranks, in rank order, is global batch g
            glob = torch.cat([s[g * 3:(g + 1) * 3] for s in shards])
            assert torch.equal(glob, order[g * 3 * world:(g + 1) * 3 * world])


class _FakeSource:
    """The iteration part of FeatureSource on a tensor of 'features' (their dataset index)."""

    def __init__(self, n: int) -> None:
        from causeseg.features import FeatureSource

        self.n = n
        self._cache = np.arange(n, dtype=np.float16).reshape(n, 1, 1, 1)
        self.device = torch.device("cpu")
        self.steps_per_epoch = FeatureSource.steps_per_epoch.__get__(self)
        self.batches = FeatureSource.batches.__get__(self)


def test_sample_offset_resume_visits_the_rest_of_the_epoch():
    from causeseg.features import epoch_order

    src = _FakeSource(13)
    order = epoch_order(13, 5, 2)
    # two ranks, batch 2: stop after one global batch -> offset 4; the rest at 1 process, batch 2
    seen = [src.batches(2, 2, 5, ctx=D.DistContext(r, 2)) for r in range(2)]
    first = torch.cat([next(s)[2] for s in seen])
    assert torch.equal(first, order[:4])
    rest = torch.cat([idx for _, feats, idx in src.batches(2, 2, 5, offset=4)])
    assert torch.equal(rest, order[4:12])  # 9 left -> 4 full batches, the incomplete one dropped
    assert src.steps_per_epoch(2, D.DistContext(0, 1), 4) == 4
    # features match their indices
    for _, feats, idx in src.batches(3, 0, 5, ctx=D.DistContext(1, 2)):
        assert torch.equal(feats.flatten().long(), idx)


def test_seeds_are_deterministic_and_distinct():
    from causeseg.sampling import per_sample_grid

    seeds = {D.rank_seed(0, s, st, r) for s in range(3) for st in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert D.rank_seed(1, 2, 3) == D.rank_seed(1, 2, 3)
    # anchors depend on the sample, not on the batch it is in
    a = per_sample_grid(torch.tensor([3, 9, 4]), 8, 8, 4, seed=0, stage="step2", epoch=1, device="cpu")
    b = per_sample_grid(torch.tensor([9]), 8, 8, 4, seed=0, stage="step2", epoch=1, device="cpu")
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1]) or not torch.equal(a[1], a[2])


def test_single_process_helpers_are_no_ops():
    t = torch.arange(4.0)
    assert D.all_gather_cat(t) is t
    assert D.global_mean_factor(7) == 1.0
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_object(3) == [3]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    D.average_gradients([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0))
    D.check_shared_dir("/nonexistent/never/created")  # single process: nothing to check


# ---------------------------------------------------------------------------------------------
# real run: 2 processes, resume with 1 (and back)
# ---------------------------------------------------------------------------------------------
N_IMAGES = 8


@pytest.fixture(scope="module")
def camvid8(tmp_path_factory) -> Path:
    from causeseg.data.root import data_root

    root = data_root()
    if root is None or not (root / "camvid" / "train" / "images").is_dir():
        pytest.skip("shared data not found (../shared/data or CAUSESEG_DATA_ROOT): camvid/train needed")
    src = root / "camvid" / "train"
    base = tmp_path_factory.mktemp("camvid8")
    (base / "images").mkdir()
    (base / "masks").mkdir()
    for p in sorted((src / "images").glob("*.png"))[:N_IMAGES]:
        shutil.copy(p, base / "images" / p.name)
        shutil.copy(src / "masks" / p.name, base / "masks" / p.name)
    return base


def _run_cfg(root: str):
    return load_config(None, [
        "backbone.name=efficientnet_lite0", "backbone.options={feature_stride: 16}",
        "data.dataset=paired", f"data.root={root}", "data.num_classes=11", "data.label_spec=camvid11",
        "step1.k=32", "step1.resolution=128", "step1.batch_size=4", "step1.epochs=1", "step1.lr=0.01",
        "step2.head=tr", "step2.resolution=128", "step2.batch_size=2", "step2.epochs=2",
        "step2.projection_dim=64", "step2.ffn_dim=64", "step2.reduced_dim=16", "step2.bank_size=8",
        "step2.phi_pos=0.2", "step3.resolution=128", "step3.batch_size=2", "step3.epochs=2",
        "eval.resolution=128", "run.progress=false", "run.checkpoint_every=1", "run.device=cpu",
        "run.feature_cache='on'", "run.lr_scaling=linear",
    ])


def _train_worker(rank: int, port: int, root: str, run: str, stop: dict) -> None:
    from causeseg.loop import TrainingInterrupted
    from causeseg.train import train_all

    _init(rank, 2, port)
    try:
        train_all(_run_cfg(root), run, stop_after=stop or None)
    except TrainingInterrupted:
        pass
    D.cleanup()


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_two_process_run_resumes_with_one_process_and_back(camvid8, tmp_path, monkeypatch):
    from causeseg.loop import TrainingInterrupted
    from causeseg.train import train_all

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    torch.set_num_threads(1)
    run = tmp_path / "run"
    # 1) two processes: Step 1 completes, Step 2 stops after one global batch (4 of 8 samples)
    _spawn(_train_worker, (_free_port(), str(camvid8), str(run), {"step2": 1}), timeout=120)
    assert (run / "artifacts" / "clusterbook.pt").exists()
    assert len(list((run / "cache").glob("features-*.npy"))) == 1  # written once, by rank 0
    assert not list((run / "cache").glob(".*"))  # no temporaries or shared-dir markers left
    ck = _ckpt(run / "checkpoints" / "step2.pt")
    assert (ck["world_size"], ck["epoch"], ck["offset"], ck["global_step"]) == (2, 0, 4, 1)
    assert set(ck["rng"]) == {0, 1} and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    lr2 = ck["state"]["step2"]["opt"]["param_groups"][0]["lr"]
    # 2) one process: Step 2 resumes at sample 4 (2 more steps of 2, then 4 in epoch 1) and
    #    Step 3 stops after one batch of 2 samples
    with pytest.raises(TrainingInterrupted):
        train_all(_run_cfg(str(camvid8)), run, stop_after={"step3": 1})
    ck = _ckpt(run / "checkpoints" / "step2.pt")
    assert (ck["world_size"], ck["epoch"], ck["offset"], ck["global_step"]) == (1, 2, 0, 1 + 2 + 4)
    assert ck["state"]["step2"]["opt"]["param_groups"][0]["lr"] == pytest.approx(lr2 / 2)  # linear lr rule
    ck3 = _ckpt(run / "checkpoints" / "step3.pt")
    assert (ck3["world_size"], ck3["epoch"], ck3["offset"], ck3["global_step"]) == (1, 0, 2, 1)
    # 3) two processes again: Step 3 resumes at sample 2 (one global batch of 4 left in epoch 0)
    _spawn(_train_worker, (_free_port(), str(camvid8), str(run), {}), timeout=120)
    ck3 = _ckpt(run / "checkpoints" / "step3.pt")
    assert (ck3["world_size"], ck3["epoch"], ck3["offset"], ck3["global_step"]) == (2, 2, 0, 1 + 1 + 2)
    assert (run / "model.pt").exists() and (run / "artifacts" / "centroids.pt").exists()
