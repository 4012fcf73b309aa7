"""Feature sources: the frozen backbone run on the fly, or once into an fp16 memory-mapped cache.

Training (Steps 1-3) applies no stochastic augmentation before the backbone, so caching its
features is exact (up to fp16 storage). ``FeatureSource.batches`` yields feature maps in a
seeded per-epoch order that is independent of the number of processes, which makes resuming
(also with another number of processes) exact: a position in an epoch is a *sample offset* into
that order, which means the same for any number of processes.

Input pipeline (crops on the fly): the order of a multi-crop dataset is *grouped*
(:func:`epoch_order` with ``group`` = crops per image): images are permuted, and the crops of
the images of each window of about ``window`` items are shuffled together. The loader hands a
worker one window at a time, and the worker decodes each source image once for all its crops
in it (``SegmentationDataset.load_items``), returning uint8 crops that are pinned, copied
non-blocking and converted to float on the device. ``window=0`` is a full shuffle of all
crops (every crop then decodes its image).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .distributed import DistContext, shard_indices

log = logging.getLogger(__name__)


def autocast_context(device: torch.device, amp: str):
    """Mixed precision: bf16 where supported, fp16 on older CUDA devices, off on the CPU by default."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if amp == "fp16":
        dtype = torch.float16
    elif amp == "bf16":
        dtype = torch.bfloat16
    else:  # auto on CUDA
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class _Windows(Dataset):
    """Item ``t`` of the loader is a whole window (a list of dataset indices): (images, indices).

    Images are uint8 (len, 3, S, S) when the dataset has ``load_items`` (one decode per source image
    for all its crops in the window), else the float items stacked.
    """

    def __init__(self, ds: Dataset, windows: list[torch.Tensor]):
        self.ds = ds
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, t: int):
        idx = self.windows[t]
        load = getattr(self.ds, "load_items", None)
        if load is not None:
            images = load(idx.tolist())
        else:
            images = torch.stack([self.ds[int(i)]["image"] for i in idx])
        return images, idx


#: items per loader window (and per shuffle window of a grouped order): 256 crops of 320x320 are 79 MB of uint8
DEFAULT_WINDOW = 256


def epoch_order(n: int, seed: int, epoch: int, group: int = 1, window: int = DEFAULT_WINDOW) -> torch.Tensor:
    """The sample order of an epoch, a pure function of (n, seed, epoch, group, window).

    ``group=1`` (one item per image): a permutation seeded by (seed, epoch). ``group > 1`` (``n`` items are
    ``n // group`` images x ``group`` crops, image-major): the images are permuted, then cut into windows of
    ``max(1, window // group)`` images, and the crops of each window are shuffled together, so each crop is in
    the same window as its image's other crops (decoded once) while a batch mixes many images.
    ``window=0``: a full permutation of all items (as ``group=1``).
    """
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + 17)
    if group <= 1 or window <= 0:
        return torch.randperm(n, generator=g)
    if n % group:
        raise ValueError(f"epoch_order: {n} items are not a whole number of images of {group} crops")
    images = torch.randperm(n // group, generator=g)
    per = max(1, int(window) // group)
    out = []
    for start in range(0, len(images), per):
        items = (images[start:start + per, None] * group + torch.arange(group)).reshape(-1)
        out.append(items[torch.randperm(len(items), generator=g)])
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_num_workers(cores: int | None = None, local_processes: int | None = None, cap: int = 16) -> int:
    """Loader workers per process: the cores of this node shared by its training processes, minus one for the
    process itself, at most ``cap`` (0 on a single core: the process decodes itself)."""
    cores = available_cores() if cores is None else int(cores)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_processes is None else int(local_processes)
    return max(0, min(int(cap), cores // max(local, 1) - 1))


def resolve_num_workers(num_workers: int | None) -> int:
    """``None`` = :func:`auto_num_workers` (logged with the cores it saw), else the number given."""
    if num_workers is not None:
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0 or None (auto), got {num_workers}")
        return int(num_workers)
    n = auto_num_workers()
    log.info("data loading: %d worker process(es) (auto: %d core(s) available, LOCAL_WORLD_SIZE=%s)", n,
             available_cores(), os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return n


def _cache_matches(path: Path, meta: Path, fingerprint: dict) -> bool:
    """The cache at ``path`` exists and its ``.json`` records exactly ``fingerprint`` (else it is rebuilt)."""
    if not (path.exists() and meta.exists()):
        return False
    try:
        recorded = json.loads(meta.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded != fingerprint:
        log.warning("%s: feature cache was made from other inputs (its %s differs); rebuilding it", path,
                    meta.name)
        return False
    return True


def _take(pending: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pop the first ``k`` items off a queue of (images, indices) chunks (a view when one chunk holds them)."""
    imgs, ids = [], []
    while k:
        a, b = pending[0]
        if len(b) <= k:
            pending.pop(0)
            imgs.append(a)
            ids.append(b)
            k -= len(b)
        else:
            imgs.append(a[:k])
            ids.append(b[:k])
            pending[0] = (a[k:], b[k:])
            k = 0
    if len(imgs) == 1:
        return imgs[0], ids[0]
    return torch.cat(imgs), torch.cat(ids)


class FeatureSource:
    """Backbone features of a dataset, cached or computed on the fly."""

    def __init__(
        self,
        backbone: torch.nn.Module,
        dataset: Dataset,
        *,
        device: torch.device,
        amp: str = "auto",
        cache_dir: str | os.PathLike | None = None,
        cache: str = "auto",
        cache_limit_gb: float = 8.0,
        num_workers: int | None = None,
        progress: bool = True,
        signature: str = "",
        window: int = DEFAULT_WINDOW,
    ):
        self.backbone = backbone
        self.dataset = dataset
        self.device = device
        self.amp = amp
        self.num_workers = resolve_num_workers(num_workers)
        self.progress = progress
        self.group = int(getattr(dataset, "crops_per_image", 1))
        self.window = int(window)
        self._cache: np.ndarray | None = None
        first = dataset[0]["image"]
        with torch.no_grad():
            probe = self._extract(first[None].to(device))
        self.feature_shape = tuple(probe.shape[1:])  # (C, h, w)
        self.n = len(dataset)
        want = cache == "on" or (cache == "auto" and self.estimate_bytes() <= cache_limit_gb * 1e9)
        if want and cache_dir is not None:
            self._build_cache(Path(cache_dir), signature)
        else:
            why = ("run.feature_cache=off" if cache == "off" else "no cache directory" if cache_dir is None
                   else f"estimate above run.cache_limit_gb={cache_limit_gb:g}")
            images = getattr(dataset, "num_images", self.n)
            log.info("feature cache off (%s; it would take %.2f GB): every epoch runs the backbone on all %d items "
                     "and decodes %d source images; set run.cache_limit_gb >= %.1f (or run.feature_cache=on) to "
                     "extract the features once", why, self.estimate_bytes() / 1e9, self.n, images,
                     self.estimate_bytes() / 1e9 + 0.05)

    def fingerprint(self, signature: str) -> dict:
        """What the cached features are a function of (issue: never reuse a cache for other inputs): the caller's
        ``signature`` (backbone name, weights, options, resolution, crop, ...), the dataset's file list (paths,
        sizes, mtimes, via ``dataset.fingerprint()``), the AMP dtype, the item count and the feature shape."""
        files = getattr(self.dataset, "fingerprint", None)
        dtype = amp_dtype(self.device, self.amp)
        return {"signature": signature, "files": files() if callable(files) else None,
                "amp_dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
                "n": self.n, "shape": list(self.feature_shape), "storage": "float16"}

    def _cache_paths(self, cache_dir: Path, fingerprint: dict) -> tuple[Path, Path]:
        key = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir / f"features-{key}.npy", cache_dir / f"features-{key}.json"

    # -- extraction -----------------------------------------------------------------
    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:  # crops arrive as bytes (4x less to copy); same values as ToTensor
            images = images.float().div_(255.0)
        with torch.no_grad(), autocast_context(self.device, self.amp):
            f = self.backbone(images)
        return f.float()

    def estimate_bytes(self) -> int:
        c, h, w = self.feature_shape
        return int(self.n * c * h * w * 2)

    def _loader(self, order: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, indices) batches of ``order`` on the device, cut from windows loaded by the workers.

        A window is ``self.window`` items (one batch for a one-crop dataset), aligned with the windows of
        :func:`epoch_order` when ``order`` starts at an epoch's beginning.
        """
        per = self.window if self.group > 1 and self.window > 0 else batch_size
        windows = [order[i : i + per] for i in range(0, len(order), per)]
        cuda = self.device.type == "cuda"
        loader = DataLoader(_Windows(self.dataset, windows), batch_size=None, shuffle=False,
                            num_workers=self.num_workers, pin_memory=cuda,
                            prefetch_factor=2 if self.num_workers > 0 else None)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        have = 0
        for images, idx in loader:
            pending.append((images, idx))
            have += len(idx)
            while have >= batch_size:
                take = min(batch_size, have)
                imgs, ids = _take(pending, take)
                have -= take
                yield imgs.to(self.device, non_blocking=cuda), ids
        if have:
            imgs, ids = _take(pending, have)
            yield imgs.to(self.device, non_blocking=cuda), ids

    def _build_cache(self, cache_dir: Path, signature: str) -> None:
        """Map the cache, extracting it first (data-parallel over all ranks) if it does not exist.

        Every rank extracts its share of each global chunk; the chunks are all-gathered and rank 0
        alone writes the file (atomically, through a temporary name). The other ranks map it
        after a barrier, which is why the cache directory must be shared by all ranks
        (:func:`~causeseg.distributed.check_shared_dir` raises a clear error otherwise).
        """
        from .distributed import barrier, broadcast_object, check_shared_dir, current

        ctx = current()
        fp = self.fingerprint(signature)
        path, meta = self._cache_paths(cache_dir, fp)
        check_shared_dir(cache_dir, "feature cache directory")
        have = broadcast_object(_cache_matches(path, meta, fp) if ctx.is_main else None)
        if have:
            log.info("using feature cache %s", path)
        else:
            self._write_cache(cache_dir, path, meta, fp, ctx)
        barrier()
        self._cache = np.load(path, mmap_mode="r")
        if tuple(self._cache.shape) != (self.n, *self.feature_shape):
            raise RuntimeError(f"{path}: feature cache has shape {tuple(self._cache.shape)}, expected "
                               f"{(self.n, *self.feature_shape)}; delete it to rebuild")

    def _write_cache(self, cache_dir: Path, path: Path, meta: Path, fingerprint: dict, ctx: DistContext,
                     chunk: int = 16) -> None:
        from tqdm import tqdm

        from .distributed import all_gather_cat

        key = path.stem.split("-", 1)[1]
        size_gb = self.estimate_bytes() / 1e9
        per_step = chunk * ctx.world_size
        steps = -(-self.n // per_step)
        # pad the order with the last index so every rank extracts full, equal chunks
        order = torch.arange(self.n)
        order = torch.cat([order, order[-1:].expand(steps * per_step - self.n)])
        mine = order.view(steps, ctx.world_size, chunk)[:, ctx.rank].reshape(-1)
        arr = None
        tmp = cache_dir / f".features-{key}.npy.tmp"
        if ctx.is_main:
            cache_dir.mkdir(parents=True, exist_ok=True)
            log.info("caching backbone features: %d items x %s fp16 = %.2f GB -> %s (%d process(es))",
                     self.n, self.feature_shape, size_gb, path, ctx.world_size)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(self.n, *self.feature_shape))
        bar = tqdm(total=self.n, desc=f"features ({size_gb:.2f} GB cache)", unit="img",
                   disable=not (self.progress and ctx.is_main))
        for images, idx in self._loader(mine, chunk):
            f = self._extract(images).to(torch.float16)
            f_all = all_gather_cat(f)
            idx_all = all_gather_cat(idx.to(f.device))
            if arr is not None:
                arr[idx_all.cpu().numpy()] = f_all.cpu().numpy()
            bar.update(min(len(idx_all), self.n - bar.n))
        bar.close()
        if arr is not None:
            arr.flush()
            del arr
            os.replace(tmp, path)
            meta.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))

    @property
    def cached(self) -> bool:
        return self._cache is not None

    # -- iteration --------------------------------------------------------------------
    def steps_per_epoch(self, batch_size: int, ctx: DistContext | None = None, offset: int = 0) -> int:
        """Number of global batches of ``batch_size x world size`` left after ``offset`` samples."""
        world = ctx.world_size if ctx else 1
        return max(self.n - int(offset), 0) // (batch_size * world)

    def batches(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        *,
        start: int = 0,
        offset: int = 0,
        ctx: DistContext | None = None,
        shuffle: bool = True,
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(step, features (B,C,h,w) float32 on device, dataset indices (B,))``.

        The global order depends only on (seed, epoch) (:func:`epoch_order`). The first
        ``offset + start * batch_size * world_size`` samples of it are skipped (resume; ``offset``
        counts samples, so it means the same thing for any number of processes); the rest is cut
        into global batches of ``batch_size x world_size`` and each rank takes its contiguous
        block of every global batch (:func:`~causeseg.distributed.shard_indices`). ``step``
        counts from ``start``.
        """
        ctx = ctx or DistContext()
        group, window = getattr(self, "group", 1), getattr(self, "window", DEFAULT_WINDOW)
        order = epoch_order(self.n, seed, epoch, group, window) if shuffle else torch.arange(self.n)
        skip = int(offset) + int(start) * batch_size * ctx.world_size
        mine = shard_indices(order[skip:], ctx, batch_size)
        step = start
        if self._cache is not None:
            for i in range(0, len(mine), batch_size):
                idx = mine[i : i + batch_size]
                arr = np.asarray(self._cache[idx.numpy()])
                yield step, torch.from_numpy(arr.astype(np.float32)).to(self.device), idx
                step += 1
        else:
            for images, idx in self._loader(mine, batch_size):
                yield step, self._extract(images), idx
                step += 1
