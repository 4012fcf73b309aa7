"""Steps 1-3 of CAUSE: clusterbook, head, centroids. Label-free, resumable, data-parallel ready.

Nothing in this module reads a label: every dataset is built with ``with_labels=False``.
Each step writes an artifact under ``<run>/artifacts`` and is skipped when that artifact exists
(delete it, or use ``--force``, to retrain); its in-progress state lives in
``<run>/checkpoints/<step>.pt`` and is resumed automatically.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as D
from .bank import ConceptBank
from .bank import storage_dtype as bank_storage_dtype
from .centroids import CentroidLearner
from .clusterbook import Clusterbook, Codebook, discretise
from .config import Config, save_config
from .contrastive import concept_distance, stats_as_numbers
from .features import FeatureSource, amp_dtype, autocast_context
from .heads import ProjectionHead, make_teacher
from .loop import LoopSpec, run_loop
from .model import CauseModel, build_head, run_head, tokens
from .modularity import gather_tokens, modularity_objective
from .sampling import per_sample_grid
from .step2 import ConceptCache, Step2State, phi_thresholds
from .step2 import step2_update as run_step2_update
from .utils import atomic_write_json, resolve_device, seed_everything

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# building blocks from the configuration
# ---------------------------------------------------------------------------------------------
def build_backbone_from_config(cfg: Config, device: torch.device):
    from .backbones import build_backbone

    from .config import ConfigError

    try:
        bb = build_backbone(cfg.backbone.name, weights=cfg.backbone.weights, download=cfg.backbone.download,
                            **cfg.backbone.options)
    except TypeError as exc:  # an option the backbone does not take
        raise ConfigError(f"backbone.options={cfg.backbone.options!r}: {exc}") from None
    return bb.to(device).eval()


def _data_root(cfg: Config) -> str:
    if cfg.data.root:
        return cfg.data.root
    from .data.root import data_root

    root = data_root(required=True)
    return str(root / "camvid") if cfg.data.dataset == "camvid" else str(root)


def build_split(cfg: Config, split: str, resolution: int, *, with_labels: bool, crop: str | None = None):
    """A dataset of the configured kind; training callers always pass ``with_labels=False``."""
    from .data.datasets import build_dataset

    return build_dataset(cfg.data.dataset, _data_root(cfg), split=split, resolution=resolution,
                         crop=crop if crop is not None else "none", mode=cfg.data.mode, with_labels=with_labels,
                         label_spec=cfg.data.label_spec, on_error=cfg.data.on_error)


def _source(cfg: Config, backbone, resolution: int, run_dir: Path, device, ctx: D.DistContext,
            weights_digest: str | None = None) -> FeatureSource:
    from .provenance import state_digest

    ds = build_split(cfg, cfg.data.train_split, resolution, with_labels=False, crop=cfg.data.crop)
    # the backbone and geometry; FeatureSource.fingerprint adds the file list and the AMP dtype itself
    sig = json.dumps([cfg.backbone.name, weights_digest or state_digest(backbone), cfg.backbone.options,
                      cfg.data.dataset, cfg.data.train_split, cfg.data.crop, cfg.data.mode, resolution],
                     sort_keys=True)
    return FeatureSource(backbone, ds, device=device, amp=cfg.run.amp,
                         cache_dir=run_dir / "cache",
                         cache=cfg.run.feature_cache, cache_limit_gb=cfg.run.cache_limit_gb,
                         num_workers=cfg.data.num_workers, progress=cfg.run.progress and ctx.is_main, signature=sig,
                         window=cfg.data.shuffle_window)


#: GPUs of the published CAUSE runs (the official ``run`` script, G = 4): each GPU trained its own copy with lr x 4
PUBLISHED_GPUS = 4


def _lr(base: float, cfg: Config, ctx: D.DistContext) -> float:
    """The learning rate under ``run.lr_scaling``: ``none``, ``linear`` (x world size) or ``published`` (x 4)."""
    if cfg.run.lr_scaling == "linear":
        return base * ctx.world_size
    return base * PUBLISHED_GPUS if cfg.run.lr_scaling == "published" else base


def _optimise(loss: torch.Tensor, opt: torch.optim.Optimizer, params) -> dict[str, float]:
    """One plain optimiser step with the gradients averaged over ranks (Steps 1 and 3)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    D.average_gradients(params)
    opt.step()
    return {"loss": loss.item()}


class _ModuleState:
    """Adapter giving a (module, optimiser, bank, generator) set a single state_dict."""

    def __init__(self, **objs):
        self.objs = objs

    def state_dict(self) -> dict:
        out = {}
        for k, v in self.objs.items():
            out[k] = v.get_state() if isinstance(v, torch.Generator) else v.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.objs) - set(state))
        if missing:
            raise KeyError(f"no state for {missing} (has {sorted(state)}): written by an older causeseg?")
        for k, v in self.objs.items():
            if isinstance(v, torch.Generator):
                v.set_state(state[k])
            else:
                v.load_state_dict(state[k])


# ---------------------------------------------------------------------------------------------
# Step 1
# ---------------------------------------------------------------------------------------------
def train_step1(cfg: Config, backbone, run_dir: Path, device, ctx: D.DistContext, stop_after: int | None = None,
                source: FeatureSource | None = None, fingerprint: dict | None = None) -> Clusterbook:
    """Step 1 into ``artifacts/clusterbook.pt`` (reused when it exists: :func:`train_all` has already removed
    an artifact built under another fingerprint)."""
    s = cfg.step1
    out = run_dir / "artifacts" / "clusterbook.pt"
    if out.exists():
        log.info("step 1: reusing %s (built under the same settings)", out)
        return Clusterbook.load(out)
    source = source or _source(cfg, backbone, s.resolution, run_dir, device, ctx)
    c = source.feature_shape[0]
    meta = {"backbone": cfg.backbone.name, "dataset": cfg.data.dataset, "k": s.k, "method": s.method,
            "variant": s.variant, "tau": s.tau, "dim": c, "fingerprint": fingerprint}
    if s.method != "modularity":
        toks = []
        n_per = max(1, s.max_samples // max(source.n, 1))
        g = torch.Generator().manual_seed(cfg.run.seed)
        for _, feats, _ in source.batches(s.batch_size, 0, cfg.run.seed, shuffle=False):
            t = tokens(feats).reshape(-1, c)
            toks.append(t[torch.randperm(len(t), generator=g)[: n_per * feats.shape[0]]].cpu())
        protos = discretise(torch.cat(toks), s.k, s.method, seed=cfg.run.seed)
        book = Clusterbook(protos, meta)
    else:
        gen = torch.Generator().manual_seed(cfg.run.seed)
        codebook = Codebook(s.k, c, generator=gen).to(device)
        opt = torch.optim.Adam(codebook.parameters(), lr=_lr(s.lr, cfg, ctx))
        h, w = source.feature_shape[1:]

        def step(feats, idx, epoch, _global_step):
            if s.lr_schedule == "official":  # StepLR(step_size=1 epoch, gamma=0.2), stateless: resume-safe
                opt.param_groups[0]["lr"] = _lr(s.lr, cfg, ctx) * 0.2 ** epoch
            x = gather_tokens(tokens(feats), per_sample_grid(idx, h, w, s.grid, seed=cfg.run.seed, stage="step1",
                                                             epoch=epoch, device=device))
            loss = -modularity_objective(x.float(), codebook.weight, tau=s.tau, variant=s.variant).mean()
            return _optimise(loss, opt, codebook.parameters())

        spec = LoopSpec("step1", source, s.epochs, s.batch_size, cfg.run.seed, run_dir / "checkpoints" / "step1.pt",
                        cfg.run.checkpoint_every, cfg.run.progress, ctx, fingerprint, iterations=s.iterations)
        summary = run_loop(spec, step, {"step1": _ModuleState(codebook=codebook, opt=opt)}, stop_after=stop_after)
        meta["summary"] = summary
        book = Clusterbook(codebook.weight.detach().cpu(), meta)
    if ctx.is_main:
        book.save(out)
    D.barrier()
    return book


# ---------------------------------------------------------------------------------------------
# Step 2
# ---------------------------------------------------------------------------------------------
class Student(nn.Module):
    """Head + projection head, the parameters trained in Step 2."""

    def __init__(self, head: nn.Module, projection: nn.Module | None):
        super().__init__()
        self.head = head
        self.projection = projection if projection is not None else nn.Identity()


def head_meta(cfg: Config, in_dim: int, num_queries: int | None) -> dict:
    s = cfg.step2
    return {"kind": s.head, "in_dim": in_dim, "out_dim": s.reduced_dim, "num_queries": num_queries,
            "ffn_dim": s.ffn_dim, "dropout": s.dropout, "extra_residual": s.extra_residual}


def build_student(cfg: Config, in_dim: int, num_queries: int | None) -> Student:
    s = cfg.step2
    m = head_meta(cfg, in_dim, num_queries)
    head = build_head(m["kind"], in_dim, s.reduced_dim, num_queries=num_queries if s.head == "tr" else None,
                      ffn_dim=s.ffn_dim, dropout=s.dropout, extra_residual=s.extra_residual)
    proj = ProjectionHead(s.reduced_dim, s.projection_dim) if s.feature_space == "projection" else None
    return Student(head, proj)


def step2_update(
    cfg: Config, student: Student, teacher: Student, bank: ConceptBank | None, codebook: torch.Tensor,
    d_m: torch.Tensor, feats: torch.Tensor, idx: torch.Tensor, epoch: int, opt: torch.optim.Optimizer,
    bank_gen: torch.Generator, device, scaler=None, ema_step: int = 0,
) -> dict[str, float]:
    """One Step-2 iteration with the former signature and Python-number statistics (for callers that drive
    single iterations, such as the distributed tests); training builds a :class:`causeseg.step2.Step2State`
    once and calls :func:`causeseg.step2.step2_update`, which does not synchronise with the device."""
    state = Step2State(cfg, student, teacher, codebook, d_m, opt, device, bank=bank, bank_gen=bank_gen, scaler=scaler)
    return stats_as_numbers(run_step2_update(state, feats, idx, epoch, ema_step))


def train_step2(cfg: Config, backbone, book: Clusterbook, run_dir: Path, device, ctx: D.DistContext,
                stop_after: int | None = None, source: FeatureSource | None = None,
                fingerprint: dict | None = None) -> tuple[Student, dict]:
    """Step 2 into ``artifacts/head.pt`` (reused when it exists, see :func:`train_step1`)."""
    s = cfg.step2
    out = run_dir / "artifacts" / "head.pt"
    source = source or _source(cfg, backbone, s.resolution, run_dir, device, ctx)
    c, h, w = source.feature_shape
    nq = h * w if s.head == "tr" else None
    if out.exists():
        obj = torch.load(out, map_location="cpu", weights_only=True)
        teacher = build_student(cfg, c, nq)
        from .backbones.checkpoint import load_state_dict_strict

        load_state_dict_strict(teacher, obj["teacher"], str(out))
        log.info("step 2: reusing %s (built under the same settings)", out)
        return teacher.to(device), obj["meta"]
    torch.manual_seed(cfg.run.seed)  # head init is identical on all ranks (same seed)...
    student = build_student(cfg, c, nq).to(device)
    teacher = make_teacher(student)
    torch.manual_seed(cfg.run.seed + 7919 * (ctx.rank + 1))  # ...dropout masks differ per rank
    codebook = book.prototypes.to(device)
    d_m = concept_distance(codebook)
    phi_pos, phi_neg, rule = phi_thresholds(cfg, d_m)
    log.info("step 2: phi+ %.2f, phi- %.2f (%s)", phi_pos, phi_neg, rule)
    dim = s.projection_dim if s.feature_space == "projection" else s.reduced_dim
    bank = (ConceptBank(book.k, s.bank_size, dim, policy=s.bank_policy,
                        dtype=bank_storage_dtype(amp_dtype(device, cfg.run.amp))).to(device)
            if s.use_bank else None)
    bank_gen = torch.Generator(device=device).manual_seed(cfg.run.seed + 12345)  # same on every rank
    opt = torch.optim.Adam(student.parameters(), lr=_lr(s.lr, cfg, ctx), weight_decay=s.weight_decay)
    # fp16 needs loss scaling; bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type) if amp_dtype(device, cfg.run.amp) == torch.float16 else None

    # with the feature cache on, an item's features (hence its concepts) are the same in every epoch
    concepts = ConceptCache(source.n, h * w, book.k, device) if source.cached else None
    state = Step2State(cfg, student, teacher, codebook, d_m, opt, device, bank=bank, bank_gen=bank_gen,
                       scaler=scaler, concepts=concepts, phi_pos=phi_pos, phi_neg=phi_neg)

    def step(feats, idx, epoch, global_step):  # one EMA update per step: global_step counts the ones done
        return run_step2_update(state, feats, idx, epoch, ema_step=global_step)

    objs: dict[str, Any] = state.checkpoint_objects()
    spec = LoopSpec("step2", source, s.epochs, s.batch_size, cfg.run.seed, run_dir / "checkpoints" / "step2.pt",
                    cfg.run.checkpoint_every, cfg.run.progress, ctx, fingerprint, iterations=s.iterations)
    summary = run_loop(spec, step, {"step2": _ModuleState(**objs)}, stop_after=stop_after)
    meta = head_meta(cfg, c, nq)
    meta["summary"] = summary
    meta["phi"] = {"rule": s.phi_rule, "phi_pos": phi_pos, "phi_neg": phi_neg}  # the thresholds it was trained with
    if ctx.is_main:
        from .utils import atomic_torch_save

        atomic_torch_save({"teacher": teacher.state_dict(), "meta": meta, "fingerprint": fingerprint}, out)
    D.barrier()
    return teacher, meta


# ---------------------------------------------------------------------------------------------
# Step 3
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _head_outputs(cfg: Config, teacher: Student, codebook: torch.Tensor, source: FeatureSource, h: int, w: int,
                  limit: int, device) -> torch.Tensor:
    """Up to ``limit`` EMA-head outputs at grid-sampled tokens of the training split (eval mode, label-free)."""
    teacher.eval()
    out, n = [], 0
    for _, feats, idx in source.batches(cfg.step3.batch_size, 0, cfg.run.seed, shuffle=False):
        with autocast_context(device, cfg.run.amp):
            y = run_head(teacher.head, tokens(feats), codebook, (h, w))
        grid = per_sample_grid(idx, h, w, cfg.step3.grid, seed=cfg.run.seed, stage="step3-init", epoch=0, device=device)
        out.append(gather_tokens(y.float(), grid).reshape(-1, y.shape[-1]).cpu())
        n += len(out[-1])
        if n >= limit:
            break
    return torch.cat(out)[:limit]


def train_step3(cfg: Config, backbone, book: Clusterbook, teacher: Student, run_dir: Path, device,
                ctx: D.DistContext, stop_after: int | None = None, source: FeatureSource | None = None,
                fingerprint: dict | None = None) -> torch.Tensor:
    """Step 3 into ``artifacts/centroids.pt`` (reused when it exists, see :func:`train_step1`)."""
    s = cfg.step3
    out = run_dir / "artifacts" / "centroids.pt"
    if out.exists():
        log.info("step 3: reusing %s (built under the same settings)", out)
        return torch.load(out, map_location="cpu", weights_only=True)["centroids"]
    source = source or _source(cfg, backbone, s.resolution, run_dir, device, ctx)
    h, w = source.feature_shape[1:]
    gen = torch.Generator().manual_seed(cfg.run.seed + 3)
    learner = CentroidLearner(cfg.data.num_classes, cfg.step2.reduced_dim, s.learner, s.tau, generator=gen,
                              gamma=s.gamma, eps=s.sinkhorn_eps, iters=s.sinkhorn_iters,
                              balance=s.sinkhorn_balance).to(device)
    lr = s.lr if s.learner in ("modularity", "sinkhorn") else 5e-3
    opt = torch.optim.Adam(learner.parameters(), lr=_lr(lr, cfg, ctx))
    codebook = book.prototypes.to(device)
    teacher.requires_grad_(False)
    if s.init == "kmeans++":  # same tokens on every rank (no shuffle, no sharding) -> same seeds
        learner.init_from(_head_outputs(cfg, teacher, codebook, source, h, w, s.init_tokens, device), cfg.run.seed)
    torch.manual_seed(cfg.run.seed + 31 + 7919 * ctx.rank)

    def step(feats, idx, epoch, _global_step):
        if s.lr_schedule == "official":  # StepLR(step_size=2 epochs, gamma=0.5), stateless: resume-safe
            opt.param_groups[0]["lr"] = _lr(lr, cfg, ctx) * 0.5 ** (epoch // 2)
        teacher.train(s.dropout_active)
        with torch.no_grad(), autocast_context(device, cfg.run.amp):
            y = run_head(teacher.head, tokens(feats), codebook, (h, w))
        grid = per_sample_grid(idx, h, w, s.grid, seed=cfg.run.seed, stage="step3", epoch=epoch, device=device)
        return _optimise(learner.loss(gather_tokens(y.float(), grid).detach()), opt, learner.parameters())

    spec = LoopSpec("step3", source, s.epochs, s.batch_size, cfg.run.seed, run_dir / "checkpoints" / "step3.pt",
                    cfg.run.checkpoint_every, cfg.run.progress, ctx, fingerprint, iterations=s.iterations)
    summary = run_loop(spec, step, {"step3": _ModuleState(learner=learner, opt=opt)}, stop_after=stop_after)
    centroids = learner.weight.detach().cpu()
    if ctx.is_main:
        from .utils import atomic_torch_save

        atomic_torch_save({"centroids": centroids, "summary": summary, "learner": s.learner,
                           "fingerprint": fingerprint}, out)
    D.barrier()
    return centroids


# ---------------------------------------------------------------------------------------------
# all steps
# ---------------------------------------------------------------------------------------------
ARTIFACTS = {"step1": "clusterbook.pt", "step2": "head.pt", "step3": "centroids.pt", "selftrain": "selftrain.pt"}


def _artifact_fingerprint(path: Path) -> dict | None:
    """The fingerprint stored in an artifact (``None`` for one written by an older causeseg)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged artifact is rebuilt, never trusted
        log.warning("%s: unreadable (%s); it will be rebuilt", path, exc)
        return {"unreadable": True}
    if not isinstance(obj, dict):
        return {"unreadable": True}
    fp = obj.get("fingerprint")
    if fp is None and isinstance(obj.get("meta"), dict):
        fp = obj["meta"].get("fingerprint")
    return fp


def plan_steps(run_dir: Path, fingerprints: dict[str, dict], force: bool = False) -> dict[str, list[str]]:
    """Decide, before any work, which artifacts and checkpoints of ``run_dir`` are kept.

    Walks Steps 1-3 (and self-training when ``fingerprints`` lists it) in order. A step's artifact is kept only when its stored fingerprint equals the
    current one and nothing upstream is rebuilt; otherwise it and its checkpoint are listed for
    removal with the reason, and every later step is rebuilt too. A step without artifact resumes
    from its checkpoint only when the checkpoint's fingerprint matches; a mismatch raises
    :class:`~causeseg.provenance.StaleCheckpointError` naming the differing keys (``force`` restarts).

    Returns ``{path: reasons}`` of the files to remove (nothing is removed here).
    """
    from .provenance import STEPS, check_checkpoint, differences

    remove: dict[str, list[str]] = {}
    upstream: str | None = "--force" if force else None
    for step in (s for s in STEPS if s in fingerprints):
        art = run_dir / "artifacts" / ARTIFACTS[step]
        ck = run_dir / "checkpoints" / f"{step}.pt"
        if upstream is not None:
            for p in (art, ck):
                if p.exists():
                    remove[str(p)] = [upstream]
            continue
        if art.exists():
            diff = differences(_artifact_fingerprint(art), fingerprints[step])
            if diff:
                for p in (art, ck):
                    if p.exists():
                        remove[str(p)] = diff
                upstream = f"{step} is rebuilt"
            continue
        check_checkpoint(ck, fingerprints[step])  # raises before any work when it was written under other settings
        upstream = f"{step} is (re)trained"
    return remove


def check_output_dir(path: Path, what: str = "run directory") -> None:
    """A clear error, before any work, when ``path`` cannot be created or written."""
    import os

    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{path}: cannot create the {what}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: the {what} is not writable ({probe} does not allow writing)")


def preflight(cfg: Config, backbone, device, n_items: int) -> None:
    """Checks that need the backbone's token grid, before any work: k against the tokens available, the
    Step-3 k-means++ seeds against the tokens it samples, and the Step-2 bank against the device's memory."""
    from .config import ConfigError

    with torch.no_grad():
        f = backbone(torch.zeros(1, 3, cfg.step1.resolution, cfg.step1.resolution, device=device))
    c, h, w = f.shape[1:]
    s1 = cfg.step1
    available = n_items * h * w
    if s1.method == "modularity" and s1.k > available:
        raise ConfigError(f"step1.k={s1.k} concepts but the training split has only {available} tokens "
                          f"({n_items} items x {h}x{w}); lower step1.k")
    if s1.method != "modularity" and s1.k > min(s1.max_samples, available):
        raise ConfigError(f"step1.k={s1.k} exceeds the tokens the {s1.method} discretiser samples "
                          f"(min(step1.max_samples={s1.max_samples}, {available} tokens)); lower step1.k")
    s3 = cfg.step3
    if s3.init == "kmeans++":  # the seeds are drawn from one grid-sampled head output per window and image
        h3 = w3 = s3.resolution // max(1, round(cfg.step1.resolution / h))
        per_item = (h3 // s3.grid) * (w3 // s3.grid)
        seeds = min(s3.init_tokens, n_items * per_item)
        if seeds < cfg.data.num_classes:
            raise ConfigError(f"step3.init=kmeans++ needs at least data.num_classes={cfg.data.num_classes} tokens to "
                              f"seed from, but the training split gives {seeds} ({n_items} items x {per_item} per "
                              f"item: one per step3.grid={s3.grid} window of the {h3}x{w3} token grid at "
                              f"step3.resolution={s3.resolution}); use step3.init=uniform, a smaller step3.grid or "
                              f"a larger resolution")
    s2 = cfg.step2
    if s2.use_bank:
        dim = s2.projection_dim if s2.feature_space == "projection" else s2.reduced_dim
        bank_bytes = s1.k * s2.bank_size * dim * 4
        total = _device_memory(device)
        if total and bank_bytes > 0.8 * total:
            raise ConfigError(f"the Step-2 concept bank needs {bank_bytes / 2**30:.1f} GiB (step1.k={s1.k} x "
                              f"step2.bank_size={s2.bank_size} x {dim}-d) but {device} has {total / 2**30:.1f} GiB; "
                              f"lower step1.k, step2.bank_size or use step2.feature_space=head")


def _device_memory(device) -> int | None:
    import os

    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return None


# ---------------------------------------------------------------------------------------------
# pseudo-label self-training (beyond the paper; selftrain.enabled)
# ---------------------------------------------------------------------------------------------
def _unlabelled_images(cfg: Config, progress: bool):
    """The training images at ``eval.resolution`` as (B, 3, H, W) batches in [0, 1], with a progress bar; the
    dataset is built without labels (nothing else is read)."""
    from tqdm import tqdm

    from .data.datasets import collate

    ds = build_split(cfg, cfg.data.train_split, cfg.eval.resolution, with_labels=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.selftrain.batch_size, collate_fn=collate)
    with tqdm(total=len(ds), desc="selftrain labels", unit="img", disable=not progress) as bar:
        for batch in loader:
            yield batch["image"]
            bar.update(len(batch["image"]))


def train_selftrain(cfg: Config, model: CauseModel, run_dir: Path, device, fingerprint: dict | None = None) -> dict:
    """Pseudo-label self-training of the Steps 1-3 ``model`` (:func:`causeseg.selftrain.self_train`) into
    ``artifacts/selftrain.pt`` (reused when it exists, see :func:`train_step1`); returns the artifact (the head's
    state, tensors and plain data). The pseudo labels come from the model's own predictor as evaluation builds it
    (``eval.flip``, ``eval.alpha``, the dense CRF with ``selftrain.crf``) on the training images without labels."""
    import time

    from .crf import CRFRunner
    from .predict import Predictor
    from .selftrain import self_train, settings
    from .utils import atomic_torch_save

    out = run_dir / "artifacts" / "selftrain.pt"
    if out.exists():
        log.info("selftrain: reusing %s (built under the same settings)", out)
        return torch.load(out, map_location="cpu", weights_only=True)
    st, e = settings(cfg), cfg.eval
    log.info("selftrain: pseudo-labelling the training images at %d px (flip %s, alpha %g, CRF %s), then %d epochs",
             e.resolution, e.flip, e.alpha, "on" if cfg.selftrain.crf else "off", st.epochs)
    t0 = time.perf_counter()
    runner = CRFRunner(workers=e.crf_workers, timeout=e.crf_timeout) if cfg.selftrain.crf else None
    try:
        predictor = Predictor(model.to(device).eval(), device=device, amp=cfg.run.amp, flip=e.flip, alpha=e.alpha,
                              crf_runner=runner)
        trained, summary = self_train(predictor, _unlabelled_images(cfg, cfg.run.progress), st,
                                      crf=cfg.selftrain.crf, log_every=1)
    finally:
        if runner is not None:
            runner.close()
    summary["seconds"] = time.perf_counter() - t0
    log.info("selftrain: %d images pseudo-labelled (and their mirrors), %d epochs, loss %.4f -> %.4f, %.1f s",
             summary["samples"] // 2, st.epochs, summary["loss"][0], summary["loss"][-1], summary["seconds"])
    obj = {**trained.state(st), "fingerprint": fingerprint}
    atomic_torch_save(obj, out)
    return obj


def train_all(cfg: Config, run_dir: str | Path, *, stop_after: dict[str, int] | None = None,
              force: bool = False) -> Path:
    """Run Steps 1-3 (and, with ``selftrain.enabled``, pseudo-label self-training on the main rank) into
    ``run_dir`` and write the self-contained ``model.pt``. Returns its path.

    Before any work: the run directory is checked for writing, the backbone and the training split are
    built (bad weights or data fail here), and every existing artifact and checkpoint is compared with
    the current settings (:func:`plan_steps`). Only then is ``config.yaml`` written and are stale
    artifacts removed, so a command that fails never touches a finished run's files.
    """
    from .provenance import dataset_digest, digest, state_digest, step_fingerprints

    run_dir = Path(run_dir)
    ctx = D.init_distributed(cfg.run.device)
    device = resolve_device(cfg.run.device)
    if device.type == "cuda" and ctx.enabled:
        device = torch.device("cuda", ctx.local_rank)
    check_output_dir(run_dir)
    seed_everything(cfg.run.seed)
    stop_after = stop_after or {}
    backbone = build_backbone_from_config(cfg, device)
    train_ds = build_split(cfg, cfg.data.train_split, cfg.step1.resolution, with_labels=False, crop=cfg.data.crop)
    preflight(cfg, backbone, device, len(train_ds))
    amp = amp_dtype(device, cfg.run.amp)
    fps = step_fingerprints(cfg, backbone_digest=state_digest(backbone), data_digest=dataset_digest(train_ds),
                            amp=str(amp).replace("torch.", "") if amp is not None else "off")
    remove = plan_steps(run_dir, fps, force)
    D.barrier()
    if ctx.is_main:
        (run_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        for path, reasons in remove.items():
            log.info("rebuilding %s: %s", path, "; ".join(reasons[:8]))
            Path(path).unlink(missing_ok=True)
    D.barrier()
    seed_everything(cfg.run.seed)
    sources: dict[int, FeatureSource] = {}

    def source(res: int) -> FeatureSource:
        if res not in sources:
            sources[res] = _source(cfg, backbone, res, run_dir, device, ctx, fps["step1"]["backbone"]["weights"])
        return sources[res]

    book = train_step1(cfg, backbone, run_dir, device, ctx, stop_after.get("step1"), source(cfg.step1.resolution),
                       fps["step1"])
    teacher, meta = train_step2(cfg, backbone, book, run_dir, device, ctx, stop_after.get("step2"),
                                source(cfg.step2.resolution), fps["step2"])
    centroids = train_step3(cfg, backbone, book, teacher, run_dir, device, ctx, stop_after.get("step3"),
                            source(cfg.step3.resolution), fps["step3"])
    model_path = run_dir / "model.pt"
    if ctx.is_main:
        bb_meta = {"name": cfg.backbone.name, "weights": cfg.backbone.weights, "options": cfg.backbone.options,
                   "pretrained": True, "digest": fps["step1"]["backbone"]["weights"]}
        model = CauseModel(backbone, teacher.head, book.prototypes, centroids,
                           {"backbone": bb_meta, "head": {k: v for k, v in meta.items() if k != "summary"},
                            "num_classes": cfg.data.num_classes, "train_resolution": cfg.step2.resolution,
                            "eval_resolution": cfg.eval.resolution, "fingerprint": digest(fps["step3"]),
                            "labelled": cfg.data.dataset != "images"})
        summary = {"step2": meta.get("summary"), "clusterbook": book.meta.get("summary"),
                   "fingerprint": digest(fps["step3"])}
        if "selftrain" in fps:
            model.selftrain = train_selftrain(cfg, model, run_dir, device, fps["selftrain"])
            model.meta["selftrain_fingerprint"] = summary["selftrain_fingerprint"] = digest(fps["selftrain"])
            summary["selftrain"] = model.selftrain.get("meta", {}).get("selftrain")
        model.save(model_path, cfg.to_dict())
        atomic_write_json(summary, run_dir / "train_summary.json")
    D.barrier()
    return model_path
