#!/usr/bin/env python3
"""Speed benchmark: backbone, Steps 1-3 and evaluation of causeseg, against naive official-structure code.

Everything runs with RANDOM weights (no checkpoint needed) on random images; timings do not depend on
the weights. For every training step it reports

* ``step_ms``      -- one iteration of the step alone, on precomputed backbone features;
* ``combined_ms``  -- backbone forward (no grad, AMP) + the step: one real training iteration
  (measured, or with ``--combined sum`` the sum of the two);
* ``images_per_s`` -- batch / combined time;
* ``efficiency``   -- backbone_ms / combined_ms (1.0 = the step is free);
* ``x_backbone``   -- combined_ms / backbone_ms (the targets on one H100: <= 1.5 for Step-2 TR with the
  official 2048-d bank, <= 1.25 with the paper's 90-d bank);
* the Step-2 sections use the configuration's bank term (``step2.bank_impl``, default ``auto``: the fused
  ``causeseg.bank_lse`` kernel -- Triton on CUDA, torch elsewhere; ``--bank-impl`` overrides it), with the
  bank stored as training stores it (bf16 under bf16 AMP); ``step2_tr_ref`` times Step-2 TR with
  ``bank_impl=reference`` (the plain fp32 masked log-sum-exp over materialised logits) and ``step2_tr_torch``
  with ``bank_impl=torch`` (the fused path without Triton) for comparison;
* peak memory of the step alone (CUDA: ``max_memory_allocated``; CPU: peak RSS sampled from /proc).

"ours" runs causeseg's modules (``modularity_objective``, ``step2.step2_update`` with ``ConceptBank``
filled to capacity and ``concept_contrastive_loss``, ``CentroidLearner``, ``Predictor``); "naive" runs the
clean-room references of ``benchmarks/_naive.py`` that follow the official code's structure (materialised
(B, k, n, n) modularity, dict-of-tensors bank rebuilt by torch.cat over all k concepts, per-image loss loop).

    python benchmarks/speed.py --quick                        # tiny sizes, CPU, ~2 min
    python benchmarks/speed.py --device cuda                  # official sizes: ViT-S/8 + ViT-B/8, 320, B16, k2048
    python benchmarks/speed.py --device cpu --sections backbone,step1,step1_naive --combined sum --iters 2
    python benchmarks/speed.py --smoke                        # correctness smoke test only (AMP, compile, agreement)

Results: ``benchmarks/results/speed-<device>.json`` (``--out``). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
#: CAUSESEG_SPEED_SRC: time another checkout's package with this script (e.g. a git worktree of an older commit)
sys.path.insert(0, os.environ.get("CAUSESEG_SPEED_SRC") or str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _naive as naive  # noqa: E402

# ------------------------------------------------------------------------------------------------ constants
#: reference figures of the OFFICIAL code on one H100 with random weights (from the issue text)
REFERENCE_H100_OFFICIAL = {
    "source": "issue text: official CAUSE code, random weights, one H100",
    "backbone_forward_ms": {"dino_vitb8": 18.6, "dino_vits8": 8.6},
    "step2_tr_iteration_ms_vitb8_full_bank": 2024.0,
    "step2_tr_bank_rebuild_ms": 1688.0,
    "step1_iteration_ms": 6.5,
    "sizes": "320 px, batch 16, k 2048, bank 100 x 2048-d",
}
#: targets on one H100: (backbone + step) / backbone
TARGETS_H100 = {"step2_tr": 1.5, "step2_tr_bank90": 1.25}
#: CAUSE-TR ViT-B/8 COCO-Stuff-27 schedule (crops, epochs per step, batch)
SCHEDULE = {"crops": 248_000, "batch": 16, "epochs": {"step1": 1, "step2_tr": 2, "step3": 5}}

ALIASES = {
    "vits8": "dino_vits8", "vits16": "dino_vits16", "vitb8": "dino_vitb8", "vitb16": "dino_vitb16",
}
ALL_SECTIONS = (
    "backbone", "step1", "step1_naive", "step2_mlp", "step2_mlp_naive", "step2_tr", "step2_tr_ref", "step2_tr_torch",
    "step2_tr_naive", "step2_tr_bank90", "step3", "step3_naive", "eval", "crf", "agreement", "syncs",
)
#: which (section, implementation) a step row belongs to
STEP_ROWS = {
    "step1": ("step1", "ours"), "step1_naive": ("step1", "naive"),
    "step2_mlp": ("step2_mlp", "ours"), "step2_mlp_naive": ("step2_mlp", "naive"),
    "step2_tr": ("step2_tr", "ours"), "step2_tr_naive": ("step2_tr", "naive"),
    "step2_tr_ref": ("step2_tr_ref", "ours"),  # Step-2 TR with bank_impl=reference
    "step2_tr_torch": ("step2_tr_torch", "ours"),  # Step-2 TR with bank_impl=torch (the fused path without Triton)
    "step2_tr_bank90": ("step2_tr_bank90", "ours"),
    "step3": ("step3", "ours"), "step3_naive": ("step3", "naive"),
}
NUM_CLASSES = 27


# ------------------------------------------------------------------------------------------------ utilities
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - non-Linux: ru_maxrss (a high-water mark, KiB on Linux)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 8 * 2**30


class MemTracker:
    """Peak memory over a block: CUDA allocator peak, or peak RSS sampled every 2 ms on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            self._stop.wait(0.002)

    def __enter__(self) -> "MemTracker":
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            self.base = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, _rss_bytes())

    def result(self) -> dict[str, Any]:
        return {
            "peak_mb": round(self.peak / 2**20, 1),
            "peak_delta_mb": round(max(0, self.peak - self.base) / 2**20, 1),
            "memory_method": "cuda.max_memory_allocated" if self.device.type == "cuda" else "peak RSS (/proc, 2 ms)",
        }


def measure(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int, budget_s: float) -> dict[str, Any]:
    """Median time of ``fn`` after warm-up, with synchronisation, and its peak memory.

    At least one warm-up call is made. If the warm-up shows that ``iters`` calls would exceed ``budget_s``
    seconds, fewer iterations are timed (at least one) and ``adapted`` is set.
    """
    times: list[float] = []
    walls: list[float] = []
    first_ms = None
    with MemTracker(device) as mem:
        t0 = time.perf_counter()
        last = 0.0
        done_warm = 0
        for _ in range(max(1, warmup)):
            _sync(device)
            s = time.perf_counter()
            fn()
            _sync(device)
            last = time.perf_counter() - s
            done_warm += 1
            if first_ms is None:
                first_ms = last * 1e3
            if time.perf_counter() - t0 > budget_s / 3:
                break
        n = max(1, iters)
        adapted = False
        if last * n > budget_s:
            n, adapted = max(1, int(budget_s / max(last, 1e-9))), True
        for _ in range(n):
            if device.type == "cuda":
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                _sync(device)
                s = time.perf_counter()
                ev0.record()
                fn()
                ev1.record()
                ev1.synchronize()
                walls.append((time.perf_counter() - s) * 1e3)
                times.append(ev0.elapsed_time(ev1))
            else:
                s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - s) * 1e3)
                walls.append(times[-1])
    out = {
        "ms": round(float(np.median(times)), 3),
        "mean_ms": round(float(np.mean(times)), 3),
        "min_ms": round(float(np.min(times)), 3),
        "max_ms": round(float(np.max(times)), 3),
        "wall_ms": round(float(np.median(walls)), 3),
        "iters": n,
        "warmup": done_warm,
        "first_call_ms": round(first_ms or 0.0, 3),
        "adapted_iters": adapted,
        "timer": "cuda events (median)" if device.type == "cuda" else "perf_counter (median)",
    }
    out.update(mem.result())
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def _short_error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    return msg if len(msg) < 600 else msg[:600] + " ..."


class Skip(Exception):
    """A section that cannot run here (with the reason)."""


# ------------------------------------------------------------------------------------------------ context
class Bench:
    """Sizes, device, AMP and the shared state of one backbone's run."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
        self.batch = args.batch
        self.res = args.res
        self.k = args.k
        self.bank_size = args.bank_size
        self.proj_dim = args.proj_dim
        self.grid = 4
        self.seed = args.seed
        self.t_start = time.perf_counter()

    def autocast(self):
        from causeseg.features import autocast_context

        return autocast_context(self.device, self.amp)

    def time_left(self) -> float:
        return self.args.time_limit - (time.perf_counter() - self.t_start)

    def loss_chunk(self, n_anchor_rows: int, cands: int) -> int | None:
        """Anchors per chunk of the bank log-sum-exp: None (no chunking) when the full logits fit."""
        if self.args.loss_chunk is not None:
            return self.args.loss_chunk if self.args.loss_chunk > 0 else None
        full = n_anchor_rows * cands * 4 * 6  # logits, masked copy, exp, mask, grads
        if full < 0.25 * _available_bytes(self.device):
            return None
        return max(1, int(2**26 // max(1, cands)))


def build_bb(name: str, args: argparse.Namespace, device: torch.device):
    from causeseg.backbones import build_backbone

    overrides: dict[str, Any] = {}
    if args.vits_heads and "vits" in name:
        overrides["vit_small_heads"] = args.vits_heads
    torch.manual_seed(args.seed)
    return build_backbone(name, pretrained=False, **overrides).to(device).eval()


def make_codebook(feats: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """k concept vectors sampled from the batch's tokens plus noise: spreads the concept assignments like a
    trained clusterbook would (a U(-1/k, 1/k) codebook on random features collapses to a few concepts)."""
    g = torch.Generator().manual_seed(seed + 1)
    t = feats.flatten(2).transpose(1, 2).reshape(-1, feats.shape[1]).float().cpu()
    pick = torch.randint(0, t.shape[0], (k,), generator=g)
    cb = t[pick] + 0.5 * t.std() * torch.randn(k, t.shape[1], generator=g)
    return cb.to(feats.device)


def step2_cfg(b: Bench, head: str, feature_space: str, bank_impl: str | None = None):
    """Step-2 configuration at the benchmark's sizes; ``bank_impl`` None = ``--bank-impl`` or the config default."""
    from causeseg.config import Config

    cfg = Config()
    impl = bank_impl or b.args.bank_impl
    if impl is not None:
        cfg.step2.bank_impl = impl
    cfg.run.seed = b.seed
    cfg.run.amp = b.amp
    s = cfg.step2
    s.head = head
    s.feature_space = feature_space
    s.projection_dim = b.proj_dim
    s.bank_size = b.bank_size
    s.grid = b.grid
    return cfg


def fill_concept_bank(bank: Any, k: int, cap: int, dim: int, device: torch.device, seed: int) -> float:
    """Fill causeseg's ConceptBank to capacity through its own ``update``; returns the filled fraction."""
    g = torch.Generator(device=device).manual_seed(seed + 99)
    chunk = max(1, min(k, int(2**27 // max(1, 2 * cap * dim))))
    for _ in range(6):
        for m0 in range(0, k, chunk):
            ms = torch.arange(m0, min(k, m0 + chunk), device=device)
            q = ms.repeat_interleave(2 * cap)
            f = torch.randn(len(q), dim, device=device, generator=g)
            bank.update(q, f.to(bank.feats.dtype), generator=g)
        frac = float(bank.valid_mask().float().mean())
        if frac >= 1.0:
            break
    return frac


# ------------------------------------------------------------------------------------------------ step setups
# Each setup returns (step(feats) -> None, info dict). State (weights, bank) lives in the closure.
def setup_step1(b: Bench, feats: torch.Tensor, impl: str):
    from causeseg.clusterbook import Codebook
    from causeseg.model import tokens
    from causeseg.modularity import gather_tokens, modularity_objective
    from causeseg.sampling import per_sample_grid

    bsz, c, h, w = feats.shape
    n_s = (h // b.grid) * (w // b.grid)
    dev = b.device
    if impl == "naive":
        need = bsz * b.k * n_s * n_s * 4 * 4
        if need > 0.6 * _available_bytes(dev):
            raise Skip(f"naive (B,k,n,n) tensor needs ~{need / 2**30:.1f} GiB, more than 60% of the "
                       f"{_available_bytes(dev) / 2**30:.1f} GiB available")
    gen = torch.Generator().manual_seed(b.seed)
    codebook = Codebook(b.k, c, generator=gen).to(dev)
    opt = torch.optim.Adam(codebook.parameters(), lr=1e-3)
    counter = [0]

    def step(f: torch.Tensor) -> None:
        counter[0] += 1
        t = tokens(f)
        if impl == "ours":  # = causeseg.train.train_step1's step
            idx = torch.arange(bsz) + bsz * counter[0]
            x = gather_tokens(t, per_sample_grid(idx, h, w, b.grid, seed=b.seed, stage="step1", epoch=0, device=dev))
            loss = -modularity_objective(x.float(), codebook.weight, tau=0.1, variant="code").mean()
        else:
            x = naive._gather(t, naive.naive_sample_grid(bsz, h, w, b.grid, dev))
            loss = naive.naive_step1_loss(x.float(), codebook.weight, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()

    return step, {"tokens_per_image": n_s, "k": b.k, "dim": c, "precision": "fp32 (both)",
                  "materialised_elements": bsz * b.k * n_s * n_s if impl == "naive" else None}


def setup_step2(b: Bench, feats: torch.Tensor, impl: str, head: str, feature_space: str = "projection",
                bank_impl: str | None = None):
    from causeseg.bank import ConceptBank, storage_dtype
    from causeseg.bank_lse import resolve_impl
    from causeseg.contrastive import concept_distance
    from causeseg.features import amp_dtype
    from causeseg.heads import make_teacher
    from causeseg.model import run_head
    from causeseg.step2 import Step2State, step2_update
    from causeseg.train import build_student

    bsz, c, h, w = feats.shape
    dev = b.device
    cfg = step2_cfg(b, head, feature_space, bank_impl)
    s = cfg.step2
    dim = s.projection_dim if feature_space == "projection" else s.reduced_dim
    n_s = (h // b.grid) * (w // b.grid)
    bank_entries = b.k * b.bank_size
    if impl == "naive":
        cb_bytes = bank_entries * (dim + c) * 4
        need = 2 * cb_bytes + bsz * n_s * bank_entries * 4 * 6
        if need > 0.6 * _available_bytes(dev):
            raise Skip(f"naive Step 2 needs ~{need / 2**30:.1f} GiB (bank rebuilt by torch.cat + per-image logits), "
                       f"more than 60% of the {_available_bytes(dev) / 2**30:.1f} GiB available")
        copy_gb = b.k * cb_bytes / 2 / 1e9 * 2  # quadratic cat: sum over concepts of the prefix, read + write
        if dev.type == "cpu" and copy_gb > b.args.cpu_naive_copy_gb and not b.args.force_naive:
            raise Skip(f"naive bank rebuild copies ~{copy_gb:.0f} GB per iteration (torch.cat inside a {b.k}-step "
                       f"loop), over --cpu-naive-copy-gb {b.args.cpu_naive_copy_gb:g} on the CPU; run it on a GPU or "
                       f"pass --force-naive")
    # the reference bank term materialises (rows x k*b) logits: chunk it when they do not fit; the fused bank
    # term bounds its own chunks (an explicit --loss-chunk applies to both)
    if impl == "ours" and (s.bank_impl == "reference" or b.args.loss_chunk is not None):
        s.loss_chunk = b.loss_chunk(bsz * n_s, bank_entries + bsz * n_s)
    else:
        s.loss_chunk = None
    bank_dtype = storage_dtype(amp_dtype(dev, b.amp))
    torch.manual_seed(b.seed)
    nq = h * w if head == "tr" else None
    student = build_student(cfg, c, nq).to(dev)
    teacher = make_teacher(student)
    codebook = make_codebook(feats, b.k, b.seed)
    opt = torch.optim.Adam(student.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    info: dict[str, Any] = {"head": head, "bank": f"{b.k} x {b.bank_size} x {dim}", "anchors_per_image": n_s,
                            "bank_dim": dim, "loss_chunk": s.loss_chunk}
    if impl == "ours":
        low = amp_dtype(dev, b.amp)
        info["bank_impl"] = s.bank_impl
        info["bank_impl_resolved"] = (s.bank_impl if s.bank_impl == "reference"
                                      else resolve_impl(s.bank_impl, dev, low or torch.float32))
        info["bank_dtype"] = str(bank_dtype).replace("torch.", "")
    with torch.no_grad():
        from causeseg.contrastive import assign_concepts

        q = assign_concepts(feats.flatten(2).transpose(1, 2), codebook)
        info["distinct_concepts_in_batch"] = int(torch.unique(q).numel())
    if impl == "ours":
        d_m = concept_distance(codebook)
        bank = ConceptBank(b.k, b.bank_size, dim, policy=s.bank_policy, dtype=bank_dtype).to(dev)
        info["bank_filled_fraction"] = round(fill_concept_bank(bank, b.k, b.bank_size, dim, dev, b.seed), 4)
        state = Step2State(cfg, student, teacher, codebook, d_m, opt, dev, bank=bank,
                           bank_gen=torch.Generator(device=dev).manual_seed(b.seed + 12345))
        counter = [0]

        def step(f: torch.Tensor) -> None:  # = causeseg.train.train_step2's step; the loop reads the loss
            counter[0] += 1
            idx = torch.arange(bsz) + bsz * counter[0]
            float(step2_update(state, f, idx, 0, ema_step=counter[0])["loss"])
    else:
        nbank = naive.NaiveBank(b.k, b.bank_size)
        nbank.fill_random(dim, dev, torch.Generator(device=dev).manual_seed(b.seed + 99))
        info["bank_filled_fraction"] = round(nbank.size() / bank_entries, 4)
        cb_n = F.normalize(codebook, dim=-1)
        rebuild = measure(lambda: nbank.compute(cb_n), dev, 2, 1, b.args.section_budget / 2)
        info["bank_rebuild_ms"] = rebuild["ms"]  # the official bank_compute alone (torch.cat in a k-step loop)
        info["bank_rebuild_peak_delta_mb"] = rebuild["peak_delta_mb"]

        def step(f: torch.Tensor) -> None:
            naive.naive_step2_update(student, teacher, nbank, codebook, f, opt, head_kind=head, run_head=run_head,
                                     autocast=b.autocast, grid=b.grid, grad_clip=s.grad_clip, ema=s.ema)
    return step, info


def setup_step3(b: Bench, feats: torch.Tensor, impl: str):
    from causeseg.centroids import CentroidLearner
    from causeseg.heads import make_teacher
    from causeseg.model import run_head, tokens
    from causeseg.modularity import gather_tokens
    from causeseg.sampling import per_sample_grid
    from causeseg.train import build_student

    bsz, c, h, w = feats.shape
    dev = b.device
    cfg = step2_cfg(b, "tr", "projection")
    torch.manual_seed(b.seed)
    teacher = make_teacher(build_student(cfg, c, h * w).to(dev))
    teacher.requires_grad_(False)
    codebook = make_codebook(feats, b.k, b.seed)
    learner = CentroidLearner(NUM_CLASSES, cfg.step2.reduced_dim, "modularity", 0.1,
                              generator=torch.Generator().manual_seed(b.seed + 3)).to(dev)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)
    counter = [0]

    def step(f: torch.Tensor) -> None:
        counter[0] += 1
        if impl == "ours":  # = causeseg.train.train_step3's step
            teacher.train(True)
            with torch.no_grad(), b.autocast():
                y = run_head(teacher.head, tokens(f), codebook, (h, w))
            idx = torch.arange(bsz) + bsz * counter[0]
            grid = per_sample_grid(idx, h, w, b.grid, seed=b.seed, stage="step3", epoch=0, device=dev)
            loss = learner.loss(gather_tokens(y.float(), grid).detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        else:
            naive.naive_step3_update(teacher.head, learner.weight, codebook, f, opt, run_head=run_head,
                                     autocast=b.autocast, grid=b.grid)

    return step, {"head": "tr (EMA teacher, dropout on)", "classes": NUM_CLASSES}


# ------------------------------------------------------------------------------------------------ sections
def run_backbone(name: str, b: Bench, sections: list[str], out: dict[str, Any]) -> None:
    args, dev = b.args, b.device
    res: dict[str, Any] = {"name": name}
    out[name] = res
    try:
        bb = build_bb(name, args, dev)
    except Exception as exc:
        res["error"] = _short_error(exc)
        return
    g = torch.Generator().manual_seed(b.seed)
    images = torch.rand(b.batch, 3, b.res, b.res, generator=g).to(dev)

    def extract() -> torch.Tensor:  # = FeatureSource._extract
        with torch.no_grad(), b.autocast():
            f = bb(images)
        return f.float()

    feats = extract()
    _, c, h, w = feats.shape
    res.update({"embed_dim": c, "token_grid": [h, w], "patch_size": bb.patch_size,
                "num_heads": getattr(bb, "num_heads", None), "params_m": round(sum(p.numel() for p in bb.parameters()) / 1e6, 2)})
    budget = args.section_budget

    bb_ms = None
    if "backbone" in sections or any(s in sections for s in STEP_ROWS):
        try:
            m = measure(extract, dev, args.iters, args.warmup, budget)
            m["images_per_s"] = round(b.batch / (m["ms"] / 1e3), 2)
            res["backbone"] = m
            bb_ms = m["ms"]
        except Exception as exc:
            res["backbone"] = {"error": _short_error(exc)}
        _free(dev)

    steps: dict[str, Any] = {}
    res["steps"] = steps
    for sec in sections:
        if sec not in STEP_ROWS:
            continue
        row, impl = STEP_ROWS[sec]
        entry = steps.setdefault(row, {})
        if b.time_left() < 0:
            entry[impl] = {"skipped": f"--time-limit {args.time_limit:g} s reached"}
            continue
        is_naive = impl == "naive"
        iters = min(args.iters, args.naive_iters) if is_naive else args.iters
        warm = min(args.warmup, args.naive_warmup) if is_naive else args.warmup
        t0 = time.perf_counter()
        try:
            if row == "step1":
                step, info = setup_step1(b, feats, impl)
            elif row == "step2_mlp":
                step, info = setup_step2(b, feats, impl, "mlp")
            elif row == "step2_tr":
                step, info = setup_step2(b, feats, impl, "tr")
            elif row == "step2_tr_ref":
                step, info = setup_step2(b, feats, impl, "tr", bank_impl="reference")
            elif row == "step2_tr_torch":
                step, info = setup_step2(b, feats, impl, "tr", bank_impl="torch")
            elif row == "step2_tr_bank90":
                step, info = setup_step2(b, feats, impl, "tr", feature_space="head")
            else:
                step, info = setup_step3(b, feats, impl)
            r: dict[str, Any] = {"info": info}
            alone = measure(lambda: step(feats), dev, iters, warm, budget)
            r["step"] = alone
            r["step_ms"] = alone["ms"]
            if args.combined == "measure":
                comb = measure(lambda: step(extract()), dev, iters, warm, budget)
                r["combined"] = comb
                r["combined_ms"] = comb["ms"]
                r["combined_method"] = "measured (backbone forward + step, one loop)"
            elif bb_ms is not None:
                r["combined_ms"] = round(bb_ms + alone["ms"], 3)
                r["combined_method"] = "sum of backbone_ms and step_ms"
            if bb_ms is not None and r.get("combined_ms"):
                r["backbone_ms"] = bb_ms
                r["images_per_s"] = round(b.batch / (r["combined_ms"] / 1e3), 2)
                r["efficiency"] = round(bb_ms / r["combined_ms"], 4)
                r["x_backbone"] = round(r["combined_ms"] / bb_ms, 3)
            r["step_peak_mb"] = alone["peak_mb"]
            r["step_peak_delta_mb"] = alone["peak_delta_mb"]
            r["section_s"] = round(time.perf_counter() - t0, 1)
            entry[impl] = r
            del step
        except Skip as exc:
            entry[impl] = {"skipped": str(exc)}
        except Exception as exc:  # OOM or anything else: record and go on
            entry[impl] = {"error": _short_error(exc), "trace": traceback.format_exc(limit=3)[-1500:]}
        _free(dev)
        if "ours" in entry and "naive" in entry:
            o, n = entry["ours"], entry["naive"]
            if "step_ms" in o and "step_ms" in n:
                entry["naive_over_ours_step"] = round(n["step_ms"] / max(o["step_ms"], 1e-9), 2)
            if "combined_ms" in o and "combined_ms" in n:
                entry["naive_over_ours_combined"] = round(n["combined_ms"] / max(o["combined_ms"], 1e-9), 2)
            if "step_peak_delta_mb" in o and "step_peak_delta_mb" in n:
                entry["naive_over_ours_peak_delta"] = round(n["step_peak_delta_mb"] / max(o["step_peak_delta_mb"], 1e-3), 2)
    for row in [k for k, v in steps.items() if not v]:
        del steps[row]

    if "eval" in sections:
        if b.time_left() < 0:
            res["eval"] = {"skipped": f"--time-limit {args.time_limit:g} s reached"}
        else:
            try:
                res["eval"] = run_eval(b, bb, images, feats)
            except Exception as exc:
                res["eval"] = {"error": _short_error(exc)}
            _free(dev)

    # targets and projection
    if bb_ms is not None:
        tgt = {}
        for row, limit in TARGETS_H100.items():
            o = steps.get(row, {}).get("ours", {})
            if "x_backbone" in o:
                tgt[row] = {"x_backbone": o["x_backbone"], "target_on_h100": limit,
                            "met": (o["x_backbone"] <= limit) if _is_h100(dev) and not args.quick else None}
        if tgt:
            res["targets"] = tgt
        res["projection_coco27_tr"] = project(steps, b)
    del bb, images, feats
    _free(dev)


def _is_h100(dev: torch.device) -> bool:
    return dev.type == "cuda" and "H100" in torch.cuda.get_device_name(dev)


def run_eval(b: Bench, bb: Any, images: torch.Tensor, feats: torch.Tensor) -> dict[str, Any]:
    """Inference without CRF: backbone + TR head, flip TTA, bilinear upsampling, cosine to 27 centroids."""
    from causeseg.model import CauseModel
    from causeseg.predict import Predictor
    from causeseg.train import build_student

    dev = b.device
    _, c, h, w = feats.shape
    cfg = step2_cfg(b, "tr", "projection")
    torch.manual_seed(b.seed)
    head = build_student(cfg, c, h * w).head
    codebook = make_codebook(feats, b.k, b.seed)
    centroids = torch.randn(NUM_CLASSES, cfg.step2.reduced_dim)
    model = CauseModel(bb, head, codebook, centroids).to(dev).eval()
    out: dict[str, Any] = {}
    for flip in (True, False):
        pred = Predictor(model, device=dev, amp=b.amp, flip=flip)

        def run() -> None:
            p = pred(images, crf=False)
            p.labels.cpu()

        m = measure(run, dev, b.args.iters, b.args.warmup, b.args.section_budget)
        m["images_per_s"] = round(b.batch / (m["ms"] / 1e3), 2)
        out["no_crf_flip" if flip else "no_crf_noflip"] = m
    out["note"] = "Predictor(flip TTA) -> labels on the host; CRF excluded (see the 'crf' section, CPU only)"
    return out


def run_crf(b: Bench) -> dict[str, Any]:
    """Seconds per image of causeseg.crf.dense_crf at the protocol's constants (27 classes)."""
    try:
        from causeseg.crf import CRFRunner, CRFUnavailableError, dense_crf, default_workers
    except Exception as exc:
        return {"skipped": f"causeseg.crf not importable: {_short_error(exc)}"}
    size = b.res
    n_img = b.args.crf_images
    g = torch.Generator().manual_seed(b.seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs, probs = [], []
    for i in range(n_img):
        base = torch.stack([yy, xx, (yy + xx) / 2]) * 200 + 40 * torch.rand(3, size, size, generator=g)
        imgs.append(base.clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy())
        low = torch.rand(1, NUM_CLASSES, size // 8, size // 8, generator=g) * 2 - 1
        cos = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0]
        probs.append(torch.softmax(3.0 * cos, 0).numpy())
    try:
        dense_crf(imgs[0], probs[0])  # warm-up (and availability check)
    except CRFUnavailableError as exc:
        return {"skipped": f"pydensecrf unavailable: {_short_error(exc)}"}
    times = []
    for im, p in zip(imgs, probs):
        s = time.perf_counter()
        dense_crf(im, p)
        times.append(time.perf_counter() - s)
    out: dict[str, Any] = {
        "classes": NUM_CLASSES, "size": [size, size], "images": n_img,
        "s_per_image_serial": round(float(np.median(times)), 4),
        "images_per_s_serial": round(1.0 / float(np.median(times)), 3),
        "note": "one process; CRFRunner(workers=W) runs W images in parallel processes",
    }
    workers = min(8, default_workers())
    if workers >= 2 and b.args.crf_pool:
        try:
            with CRFRunner(workers=workers) as runner:
                runner.run(imgs[:1], probs[:1])  # start the pool
                batch_imgs = (imgs * (2 * workers // n_img + 1))[: 2 * workers]
                batch_probs = (probs * (2 * workers // n_img + 1))[: 2 * workers]
                s = time.perf_counter()
                runner.run(batch_imgs, batch_probs)
                dt = time.perf_counter() - s
            out["pool"] = {"workers": workers, "images": len(batch_imgs),
                           "images_per_s": round(len(batch_imgs) / dt, 3)}
        except Exception as exc:
            out["pool"] = {"error": _short_error(exc)}
    return out


def project(steps: dict[str, Any], b: Bench) -> dict[str, Any]:
    """Hours of the COCO-Stuff-27 CAUSE-TR schedule from the measured per-iteration rates (backbone recomputed
    every iteration, as in the official code; one device)."""
    crops = b.args.project_crops
    out: dict[str, Any] = {"crops": crops, "epochs": SCHEDULE["epochs"],
                           "batch_measured": b.batch, "note": "hours = crops x epochs x (combined_ms / batch); "
                           "excludes data loading, evaluation and the CRF"}
    for impl in ("ours", "naive"):
        parts, total, ok = {}, 0.0, True
        for row, epochs in SCHEDULE["epochs"].items():
            r = steps.get(row, {}).get(impl, {})
            if "combined_ms" not in r:
                ok = False
                continue
            hours = crops * epochs * (r["combined_ms"] / 1e3 / b.batch) / 3600
            parts[row] = round(hours, 3)
            total += hours
        out[impl] = {"hours_per_step": parts, "total_hours": round(total, 3) if ok else None}
    return out


# ------------------------------------------------------------------------------------------------ checks
def run_agreement(device: torch.device, seed: int) -> dict[str, Any]:
    """Small check that the naive references compute what causeseg computes (fp32), so the comparison is fair."""
    from causeseg.contrastive import concept_contrastive_loss, concept_distance
    from causeseg.modularity import modularity_objective

    out: dict[str, Any] = {}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 25, 32, generator=g).to(device)
    m = torch.randn(64, 32, generator=g).to(device)
    ours = -modularity_objective(x, m, tau=0.1, variant="code").mean()
    ref = naive.naive_step1_loss(x, m, 0.1)
    out["step1_loss"] = {"ours": float(ours), "naive": float(ref), "abs_diff": float((ours - ref).abs())}

    k, cap, d, c, bsz, n = 16, 5, 24, 12, 3, 10
    cb = torch.randn(k, c, generator=g)
    cb[1] = cb[0] + 0.1 * torch.randn(c, generator=g)  # some near concepts -> positives across concepts
    cb = cb.to(device)
    a = torch.randn(bsz, n, d, generator=g).to(device)
    z = torch.randn(bsz, n, d, generator=g).to(device)
    q = torch.randint(0, k, (bsz, n), generator=g).to(device)
    bank = torch.randn(k, cap, d, generator=g).to(device)
    valid = (torch.rand(k, cap, generator=g) < 0.7).to(device)
    d_m = concept_distance(cb)
    ours2, _ = concept_contrastive_loss(a, z, q, q, d_m, bank=bank, bank_valid=valid)
    nb = naive.NaiveBank(k, cap)
    for i in range(k):
        if bool(valid[i].any()):
            nb.store[i] = bank[i][valid[i]]
    cbn = F.normalize(cb, dim=-1)
    ref2 = naive.naive_contrastive_loss(a, z, q, q, cbn, nb.compute(cbn))
    out["step2_loss"] = {"ours": float(ours2), "naive": float(ref2), "abs_diff": float((ours2 - ref2).abs())}
    out["ok"] = bool(out["step1_loss"]["abs_diff"] < 1e-4 and out["step2_loss"]["abs_diff"] < 1e-3)
    return out


def run_bank_lse_check(device: torch.device, seed: int) -> dict[str, Any]:
    """``causeseg.bank_lse.bank_logsumexp`` (torch and, where it runs, Triton; fp32 and bf16) against an fp64
    brute-force masked log-sum-exp on the CPU: value and gradient, with empty rows and a partially valid bank."""
    from causeseg.bank_lse import bank_logsumexp, resolve_impl

    g = torch.Generator().manual_seed(seed + 5)
    n_rows, k, nb, d, tau = 300, 128, 20, 256, 0.07
    a = F.normalize(torch.randn(n_rows, d, generator=g), dim=-1)
    bank = 3 * torch.randn(k, nb, d, generator=g)
    valid = torch.rand(k, nb, generator=g) > 0.2
    valid[:3] = False
    umask = torch.rand(n_rows, k, generator=g) > 0.5
    umask[:4] = False
    umask[4:8, :3] = True
    umask[4:8, 3:] = False  # rows whose concepts hold no valid entry
    inv = 1.0 / bank.norm(dim=-1)
    weight = torch.randn(n_rows, generator=g, dtype=torch.float64)
    a64 = a.double().requires_grad_(True)
    s = (a64 @ bank.double().reshape(-1, d).t()) * (inv.double().reshape(-1) / tau)
    mask = (umask[:, :, None] & valid[None]).reshape(n_rows, -1)
    ref = torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1)
    nonempty = mask.any(-1)
    (torch.where(nonempty, ref, torch.zeros_like(ref)) * weight).sum().backward()
    gscale = float(a64.grad.abs().max())
    out: dict[str, Any] = {"sizes": {"rows": n_rows, "k": k, "b": nb, "d": d, "empty_rows": int((~nonempty).sum())}}
    ok = True
    for impl, bound in (("torch", None), ("triton", None), ("triton", 1.01 / tau)):  # the loss passes 1.01 / tau
        for dt in (torch.float32, torch.bfloat16):
            key = f"{impl}_{str(dt).replace('torch.', '')}" + ("_host_shift" if bound else "")
            try:
                resolve_impl(impl, device, dt)
            except Exception as exc:
                out[key] = {"skipped": _short_error(exc)}
                continue
            try:
                ai = a.to(device=device, dtype=dt).detach().clone().requires_grad_(True)  # a fresh leaf
                lse, ne = bank_logsumexp(ai, bank.to(device=device, dtype=dt), umask.to(device), valid.to(device),
                                         inv.to(device), tau, impl=impl, max_logit=bound)
                (lse * weight.to(device=device, dtype=lse.dtype)).sum().backward()
                lse, ne, grad = lse.detach().cpu().double(), ne.cpu(), ai.grad.cpu().double()
                lse_err = float((lse[nonempty] - ref[nonempty]).abs().max())
                grad_err = float((grad - a64.grad).abs().max()) / gscale
                tol = (1e-3, 1e-3) if dt == torch.float32 else (0.05, 0.03)
                good = (torch.equal(ne, nonempty) and bool(torch.isfinite(lse).all()) and lse_err <= tol[0]
                        and grad_err <= tol[1] and bool((grad[~nonempty] == 0).all()))
                out[key] = {"lse_max_abs_err": lse_err, "grad_max_rel_err": grad_err, "tolerance": tol, "ok": good}
                ok = ok and good
            except Exception as exc:
                out[key] = {"error": _short_error(exc), "trace": traceback.format_exc(limit=4)[-1500:]}
                ok = False
    out["ok"] = ok
    return out


#: tensor methods / functions that wait for the device or need a data-dependent output shape on CUDA
_SYNC_NAMES = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
               "unique", "unique_consecutive", "masked_select", "bincount", "argwhere"}


def run_sync_count(device: torch.device, seed: int) -> dict[str, Any]:
    """Host synchronisations of one Step-2 iteration (TR and MLP head, official bank policy, bank on), counted on
    any device by intercepting the calls that synchronise on CUDA (``.item()``, ``bool()``/``int()``/``float()``,
    ``nonzero``/``unique``/``bincount``, boolean-mask indexing; reads of the dataset indices and of the optimiser's
    host-side step counters excluded), plus ``torch.cuda.set_sync_debug_mode`` on CUDA. It drives
    ``causeseg.step2`` when present, else the former ``causeseg.train.step2_update`` (set CAUSESEG_SPEED_SRC to an
    older checkout's src), and counts the loop's one read of the loss separately (``loop_reads``)."""
    from torch.overrides import TorchFunctionMode

    from causeseg.bank import ConceptBank
    from causeseg.config import load_config
    from causeseg.contrastive import concept_distance
    from causeseg.heads import make_teacher
    from causeseg.train import build_student

    class Recorder(TorchFunctionMode):
        def __init__(self, host: list[torch.Tensor]):
            super().__init__()
            self.host, self.calls = host, []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            first = args[0] if args else None
            if name in _SYNC_NAMES and not (torch.is_tensor(first) and any(first is h for h in self.host)):
                self.calls.append(name)
            elif name in ("__getitem__", "__setitem__") and len(args) > 1:
                idx = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
                if any(torch.is_tensor(i) and i.dtype == torch.bool for i in idx):
                    self.calls.append(name + "[bool]")
            return func(*args, **(kwargs or {}))

    c, h, w, k = 32, 16, 16, 64
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(4, c, h, w, generator=g).to(device)
    codebook = torch.randn(k, c, generator=g).to(device)
    out: dict[str, Any] = {"sizes": f"B 4, c {c}, {h}x{w} tokens, k {k}, bank 8 x 64", "device": device.type}
    for head in ("tr", "mlp"):
        cfg = load_config(None, [f"step2.head={head}", "step2.reduced_dim=16", "step2.projection_dim=64",
                                 "step2.ffn_dim=64", "step2.bank_size=8", "run.amp='off'", f"run.seed={seed}"])
        torch.manual_seed(seed)
        student = build_student(cfg, c, h * w if head == "tr" else None).to(device)
        teacher = make_teacher(student)
        bank = ConceptBank(k, 8, 64).to(device)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        gen = torch.Generator(device=device).manual_seed(seed + 1)
        d_m = concept_distance(codebook)
        try:
            from causeseg.step2 import Step2State, step2_update

            state = Step2State(cfg, student, teacher, codebook, d_m, opt, device, bank=bank, bank_gen=gen)
            api = "causeseg.step2.step2_update"

            def one(i: int, idx: torch.Tensor) -> Any:
                return step2_update(state, feats, idx, 0, ema_step=i)
        except ImportError:
            from causeseg.train import step2_update as legacy

            api = "causeseg.train.step2_update"

            def one(i: int, idx: torch.Tensor) -> Any:
                return legacy(cfg, student, teacher, bank, codebook, d_m, feats, idx, 0, opt, gen, device, None,
                              ema_step=i)
        for i in range(2):  # optimiser state, bank entries, one-time self-tests
            one(i, torch.arange(4) + 4 * i)
        idx = torch.arange(4) + 8
        rec = Recorder([idx] + [st["step"] for st in opt.state.values() if torch.is_tensor(st.get("step"))])
        with rec:
            stats = one(2, idx)
        loop_reads = 0 if not torch.is_tensor(stats["loss"]) else 1  # run_loop reads float(stats["loss"])
        counts: dict[str, int] = {}
        for name in rec.calls:
            counts[name] = counts.get(name, 0) + 1
        out[head] = {"api": api, "host_syncs_in_step": len(rec.calls), "by_call": counts, "loop_reads": loop_reads,
                     "total_per_iteration": len(rec.calls) + loop_reads,
                     "cuda_sync_debug_count": count_cuda_syncs(lambda: one(3, torch.arange(4) + 12), device)}
    return out


def count_cuda_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host synchronisations ``fn`` makes on CUDA (``torch.cuda.set_sync_debug_mode``); None elsewhere."""
    if device.type != "cuda":
        return None
    import warnings

    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def run_smoke(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Correctness smoke test: AMP Step-2 update (forward + backward), agreement, torch.compile of the head."""
    out: dict[str, Any] = {"device": str(device)}
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off")
    out["amp"] = amp
    try:
        out["agreement"] = run_agreement(device, args.seed)
    except Exception as exc:
        out["agreement"] = {"error": _short_error(exc), "trace": traceback.format_exc(limit=4)[-1500:]}
    # AMP Step-2 update at a small size with causeseg.step2.step2_update; on CUDA also its host synchronisations
    try:
        from causeseg.bank import ConceptBank, storage_dtype
        from causeseg.contrastive import concept_distance, stats_as_numbers
        from causeseg.features import amp_dtype
        from causeseg.heads import make_teacher
        from causeseg.step2 import Step2State, step2_update
        from causeseg.train import build_student

        ns = argparse.Namespace(**vars(args))
        ns.amp = amp
        b = Bench(ns, device)
        b.k, b.bank_size, b.proj_dim = 128, 8, 256
        bsz, c, h, w = 4, 64, 16, 16
        feats = torch.randn(bsz, c, h, w, generator=torch.Generator().manual_seed(1)).to(device)
        rep: dict[str, Any] = {}
        for head in ("tr", "mlp"):
            cfg = step2_cfg(b, head, "projection")
            torch.manual_seed(0)
            student = build_student(cfg, c, h * w if head == "tr" else None).to(device)
            teacher = make_teacher(student)
            codebook = make_codebook(feats, b.k, 0)
            bank = ConceptBank(b.k, b.bank_size, b.proj_dim, policy=cfg.step2.bank_policy,
                               dtype=storage_dtype(amp_dtype(device, amp))).to(device)
            fill = fill_concept_bank(bank, b.k, b.bank_size, b.proj_dim, device, 0)
            opt = torch.optim.Adam(student.parameters(), lr=1e-3)
            before_s = [p.detach().clone() for p in student.parameters()]
            before_t = [p.detach().clone() for p in teacher.parameters()]
            state = Step2State(cfg, student, teacher, codebook, concept_distance(codebook), opt, device, bank=bank,
                               bank_gen=torch.Generator(device=device).manual_seed(5))
            stats = [stats_as_numbers(step2_update(state, feats, torch.arange(bsz) + bsz * i, 0, ema_step=i))
                     for i in range(2)]
            syncs = count_cuda_syncs(lambda: step2_update(state, feats, torch.arange(bsz) + 8 * bsz, 0, ema_step=2),
                                     device)
            moved_s = max(float((p - q).abs().max()) for p, q in zip(student.parameters(), before_s))
            moved_t = max(float((p - q).abs().max()) for p, q in zip(teacher.parameters(), before_t))
            finite = all(math.isfinite(s_["loss"]) for s_ in stats)
            grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in student.parameters())
            rep[head] = {"losses": [round(s_["loss"], 5) for s_ in stats], "loss_finite": finite,
                         "grads_finite": grads_finite, "student_changed": moved_s > 0, "teacher_changed": moved_t > 0,
                         "bank_filled_fraction": fill, "cuda_syncs_per_iteration": syncs,
                         "ok": finite and grads_finite and moved_s > 0 and moved_t > 0 and syncs in (None, 0)}
        out["step2_amp"] = rep
    except Exception as exc:
        out["step2_amp"] = {"error": _short_error(exc), "trace": traceback.format_exc(limit=4)[-1500:]}
    try:
        out["bank_lse"] = run_bank_lse_check(device, args.seed)
    except Exception as exc:
        out["bank_lse"] = {"ok": False, "error": _short_error(exc), "trace": traceback.format_exc(limit=4)[-1500:]}
    print("[smoke] bank_lse:", json.dumps(out["bank_lse"]), flush=True)
    # torch.compile of the TR head (inference mode): output must match eager
    print("[smoke] agreement:", json.dumps(out["agreement"]), flush=True)
    print("[smoke] step2_amp:", json.dumps(out["step2_amp"]), flush=True)
    print("[smoke] torch.compile of the TR head ...", flush=True)
    out["compile"] = run_compile_check(device, amp, args.seed, grid=16 if args.quick else 40)
    print("[smoke] compile:", json.dumps(out["compile"]), flush=True)
    return out


def run_compile_check(device: torch.device, amp: str, seed: int, grid: int = 40) -> dict[str, Any]:
    """``torch.compile`` of the TR head in eval mode: the output must match eager; reports both timings."""
    try:
        from causeseg.model import build_head

        c, h, w, bsz = 384, grid, grid, 4
        torch.manual_seed(seed)
        head = build_head("tr", c, 90, num_queries=h * w).to(device).eval()
        t = torch.randn(bsz, h * w, c, device=device)
        cb = torch.randn(256, c, device=device)
        from causeseg.features import autocast_context

        # called directly: the compiled wrapper is not a TRHead instance, so model.run_head would not dispatch
        with torch.no_grad(), autocast_context(device, amp):
            ref = head(t, cb, grid=(h, w)).float()
        if not hasattr(torch, "compile"):
            return {"ok": False, "skipped": "torch.compile not available"}
        s = time.perf_counter()
        chead = torch.compile(head)
        with torch.no_grad(), autocast_context(device, amp):
            got = chead(t, cb, grid=(h, w)).float()
        compile_s = time.perf_counter() - s
        diff = float((got - ref).abs().max())
        tol = 5e-2 if amp != "off" else 1e-3
        res: dict[str, Any] = {"compile_and_first_call_s": round(compile_s, 2), "max_abs_diff": diff,
                               "tolerance": tol, "ok": diff <= tol}

        def eager() -> None:
            with torch.no_grad(), autocast_context(device, amp):
                head(t, cb, grid=(h, w))

        def compiled() -> None:
            with torch.no_grad(), autocast_context(device, amp):
                chead(t, cb, grid=(h, w))

        res["eager_ms"] = measure(eager, device, 5, 2, 20)["ms"]
        res["compiled_ms"] = measure(compiled, device, 5, 2, 20)["ms"]
        res["note"] = f"TR head alone (eval mode), 4 x {h}x{w} tokens, c 384, k 256"
        return res
    except Exception as exc:
        return {"ok": False, "error": _short_error(exc), "trace": traceback.format_exc(limit=4)[-1500:]}


# ------------------------------------------------------------------------------------------------ report
def print_table(result: dict[str, Any]) -> None:
    meta = result["meta"]
    print(f"\n== causeseg speed benchmark on {meta['device_name']} ({meta['device']}), amp={meta['amp']}, "
          f"batch {meta['sizes']['batch']}, res {meta['sizes']['res']}, k {meta['sizes']['k']}, "
          f"bank {meta['sizes']['bank_size']}x{meta['sizes']['proj_dim']}"
          + ("  [REDUCED SIZES: --quick]" if meta["quick"] else ""))
    hdr = f"{'section':<17}{'impl':<7}{'step ms':>11}{'bb+step ms':>12}{'img/s':>9}{'effic.':>8}{'x bb':>7}{'peak MB':>10}"
    for name, r in result["backbones"].items():
        print(f"\n-- {name}: C={r.get('embed_dim')}, grid={r.get('token_grid')}")
        if "error" in r:
            print(f"   error: {r['error']}")
            continue
        bbm = r.get("backbone", {})
        if "ms" in bbm:
            print(f"   backbone forward: {bbm['ms']:.2f} ms/batch = {bbm['images_per_s']:.1f} img/s "
                  f"(peak {bbm['peak_mb']:.0f} MB)")
        print("   " + hdr)
        for row, entry in r.get("steps", {}).items():
            for impl in ("ours", "naive"):
                e = entry.get(impl)
                if e is None:
                    continue
                if "step_ms" not in e:
                    why = e.get("skipped") or e.get("error")
                    print(f"   {row:<17}{impl:<7}  -- {why}")
                    continue

                def f(key: str, fmt: str) -> str:
                    v = e.get(key)
                    return format(v, fmt) if isinstance(v, (int, float)) else "-"

                bank = e.get("info", {}).get("bank_impl_resolved")
                print(f"   {row:<17}{impl:<7}{f('step_ms', '11.2f')}{f('combined_ms', '12.2f')}"
                      f"{f('images_per_s', '9.2f')}{f('efficiency', '8.3f')}{f('x_backbone', '7.2f')}"
                      f"{f('step_peak_delta_mb', '10.0f')}" + (f"  [bank: {bank}]" if bank else ""))
            if "naive_over_ours_step" in entry:
                print(f"   {'':<17}{'':<7}naive/ours: step x{entry['naive_over_ours_step']}"
                      + (f", iteration x{entry['naive_over_ours_combined']}" if "naive_over_ours_combined" in entry else ""))
        ev = r.get("eval", {})
        if "no_crf_flip" in ev:
            print(f"   eval (no CRF): {ev['no_crf_flip']['images_per_s']:.1f} img/s with flip TTA, "
                  f"{ev['no_crf_noflip']['images_per_s']:.1f} img/s without")
        elif ev:
            print(f"   eval: {ev.get('skipped') or ev.get('error')}")
        for row, t in r.get("targets", {}).items():
            print(f"   target {row}: x{t['x_backbone']} vs <= {t['target_on_h100']} on H100 -> met={t['met']}")
        pj = r.get("projection_coco27_tr")
        if pj:
            print(f"   COCO-27 TR schedule ({pj['crops']} crops): ours {pj['ours']['total_hours']} h, "
                  f"naive {pj['naive']['total_hours']} h")
    crf = result.get("crf")
    if crf:
        if "s_per_image_serial" in crf:
            print(f"\n-- CRF: {crf['s_per_image_serial']:.3f} s/image (27 classes, {crf['size']}, one process)"
                  + (f"; pool {crf['pool']}" if "pool" in crf else ""))
        else:
            print(f"\n-- CRF: {crf.get('skipped') or crf.get('error')}")
    ag = result.get("agreement")
    if ag:
        print(f"-- agreement naive vs ours: {ag}")


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backbones", default=None, help="comma list: vits8,vitb8 (default) or registry names")
    p.add_argument("--batch", type=int, default=None, help="default 16 (quick: 2)")
    p.add_argument("--res", type=int, default=None, help="default 320 (quick: 160)")
    p.add_argument("--k", type=int, default=None, help="clusterbook size, default 2048 (quick: 256)")
    p.add_argument("--bank-size", type=int, default=None, help="bank entries per concept, default 100 (quick: 10)")
    p.add_argument("--proj-dim", type=int, default=2048, help="projection (bank) dim of the official setting")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 cuda / 3 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 5 cuda / 1 cpu)")
    p.add_argument("--naive-iters", type=int, default=3, help="timed iterations of the naive references")
    p.add_argument("--naive-warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes (ViT-S/16, batch 2, res 160, k 256, bank 10)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="auto: bf16 on CUDA, off on CPU")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (off = library default)")
    p.add_argument("--vits-heads", type=int, default=None, help="12 = the official CAUSE ViT-S (defect D1); default 6")
    p.add_argument("--combined", default="measure", choices=["measure", "sum"],
                   help="backbone+step: measured in one loop, or the sum of the two (saves time on CPU)")
    p.add_argument("--sections", default="all", help=f"comma list of {','.join(ALL_SECTIONS)}; or all, ours, naive")
    p.add_argument("--bank-impl", default=None, choices=["auto", "torch", "triton", "reference"],
                   help="step2.bank_impl of the Step-2 sections (default: the config's, auto); step2_tr_ref always "
                        "uses reference")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="anchors per chunk of the bank term (default: none when the logits fit, else bounded); 0 = none")
    p.add_argument("--section-budget", type=float, default=None, help="seconds per measurement (fewer iters beyond)")
    p.add_argument("--time-limit", type=float, default=1e9, help="skip remaining sections after this many seconds")
    p.add_argument("--cpu-naive-copy-gb", type=float, default=50.0,
                   help="on the CPU, skip the naive bank when its per-iteration cat copies exceed this")
    p.add_argument("--force-naive", action="store_true")
    p.add_argument("--crf-images", type=int, default=None, help="images for the CRF timing (default 4, quick 1)")
    p.add_argument("--no-crf-pool", dest="crf_pool", action="store_false", help="skip the CRFRunner pool timing")
    p.add_argument("--project-crops", type=int, default=SCHEDULE["crops"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 with --quick on CPU)")
    p.add_argument("--smoke", action="store_true", help="only the correctness smoke test")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/speed-<device>.json)")
    return p.parse_args(argv)


def resolve_args(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    q = args.quick
    cuda = device.type == "cuda"
    defaults = dict(backbones="vits16" if q else "vits8,vitb8", batch=2 if q else 16, res=160 if q else 320,
                    k=256 if q else 2048, bank_size=10 if q else 100, iters=3 if q else (20 if cuda else 3),
                    warmup=1 if q else (5 if cuda else 1), crf_images=1 if q else 4,
                    section_budget=30.0 if q else (60.0 if cuda else 240.0))
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    return args


def parse_sections(spec: str) -> list[str]:
    if spec == "all":
        return list(ALL_SECTIONS)
    if spec == "ours":
        return [s for s in ALL_SECTIONS if not s.endswith("_naive")]
    if spec == "naive":
        return ["backbone"] + [s for s in ALL_SECTIONS if s.endswith("_naive")]
    out = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in out if s not in ALL_SECTIONS and s != "data"]  # data: benchmarks/speed_data.py, on request
    if bad:
        raise SystemExit(f"speed.py: unknown section(s) {bad}; known: {', '.join(ALL_SECTIONS)}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("speed.py: --device cuda but torch.cuda.is_available() is False")
    if args.threads is None and args.quick and device.type == "cpu":
        args.threads = 1  # tiny ops: one thread is faster and far steadier on a shared machine
    if args.threads:
        torch.set_num_threads(args.threads)
    args = resolve_args(args, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    tag = ("smoke-" if args.smoke else "") + device.type + ("-quick" if args.quick else "")
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"speed-{tag}.json"

    result: dict[str, Any] = {"meta": {
        "device": device.type, "device_name": dev_name, "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "git_commit": _git_commit(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": bool(args.quick),
        "reduced_sizes": bool(args.quick or args.batch != 16 or args.res != 320 or args.k != 2048
                              or args.bank_size != 100),
        "weights": "random (timings do not depend on the weights)",
        "amp": args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "off"),
        "tf32": bool(args.tf32) if device.type == "cuda" else None,
        "sizes": {"batch": args.batch, "res": args.res, "k": args.k, "bank_size": args.bank_size,
                  "proj_dim": args.proj_dim, "reduced_dim": 90, "grid_window": 4, "classes": NUM_CLASSES},
        "iters": args.iters, "warmup": args.warmup, "naive_iters": args.naive_iters, "combined": args.combined,
        "vits_heads": args.vits_heads or 6,
        "argv": sys.argv[1:] if argv is None else argv,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }}

    def save(final: bool = False) -> None:
        """Write the JSON (also after every backbone, so a run killed by a timeout leaves its results)."""
        result["meta"]["complete"] = final
        result["meta"]["total_s"] = round(time.perf_counter() - t0, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, out_path)

    if args.quick:
        result["meta"]["note"] = ("REDUCED SIZES (--quick): exercises every code path; the numbers are not "
                                  "comparable with the official sizes")
    t0 = time.perf_counter()
    if args.smoke:
        result["smoke"] = run_smoke(device, args)
    else:
        sections = parse_sections(args.sections)
        b = Bench(args, device)
        result["reference_h100_official"] = REFERENCE_H100_OFFICIAL
        result["targets_h100"] = TARGETS_H100
        result["schedule_coco27_tr"] = SCHEDULE
        if "agreement" in sections:
            try:
                result["agreement"] = run_agreement(device, args.seed)
            except Exception as exc:
                result["agreement"] = {"error": _short_error(exc)}
        if "syncs" in sections:
            try:
                result["syncs"] = run_sync_count(device, args.seed)
            except Exception as exc:
                result["syncs"] = {"error": _short_error(exc), "trace": traceback.format_exc(limit=4)[-1500:]}
            print("[speed] syncs:", json.dumps(result["syncs"]), file=sys.stderr, flush=True)
        result["backbones"] = {}
        names = [ALIASES.get(n.strip(), n.strip()) for n in args.backbones.split(",") if n.strip()]
        if any(s in sections for s in ("backbone", "eval", *STEP_ROWS)):
            for name in names:
                print(f"[speed] {name} ...", file=sys.stderr, flush=True)
                run_backbone(name, b, sections, result["backbones"])
                save()
        if "data" in sections:  # the input pipeline (CPU only; only when asked for: --sections data)
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from speed_data import run_data_section

            result["data"] = run_data_section(quick=bool(args.quick))
        if "crf" in sections:
            print("[speed] crf ...", file=sys.stderr, flush=True)
            result["crf"] = run_crf(b) if b.time_left() > 0 else {"skipped": "--time-limit reached"}
        print_table(result)
    result["meta"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    save(final=True)
    print(f"\nwrote {out_path}", file=sys.stderr)
    print(json.dumps(result, sort_keys=False, separators=(",", ":")))
    return result


if __name__ == "__main__":
    main()
