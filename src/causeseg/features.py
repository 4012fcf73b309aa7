"""Feature sources: the frozen backbone run on the fly, or once into an fp16 memory-mapped cache.

Training (Steps 1-3) applies no stochastic augmentation before the backbone, so caching its
features is exact (up to fp16 storage). ``FeatureSource.batches`` yields feature maps in a
seeded per-epoch order that is independent of the number of processes, which makes resuming
(also with another number of processes) exact: a position in an epoch is a *sample offset* into
that order, which means the same for any number of processes.
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


class _ImagesOnly(Dataset):
    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        return item["image"], i


def _collate(batch):
    images = torch.stack([b[0] for b in batch])
    idx = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return images, idx


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of an epoch: a permutation seeded by (seed, epoch) only."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + 17)
    return torch.randperm(n, generator=g)


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
        num_workers: int = 0,
        progress: bool = True,
        signature: str = "",
    ):
        self.backbone = backbone
        self.dataset = dataset
        self.device = device
        self.amp = amp
        self.num_workers = num_workers
        self.progress = progress
        self._cache: np.ndarray | None = None
        first = dataset[0]["image"]
        with torch.no_grad():
            probe = self._extract(first[None].to(device))
        self.feature_shape = tuple(probe.shape[1:])  # (C, h, w)
        self.n = len(dataset)
        want = cache == "on" or (cache == "auto" and self.estimate_bytes() <= cache_limit_gb * 1e9)
        if want and cache_dir is not None:
            self._build_cache(Path(cache_dir), signature)

    def _cache_paths(self, cache_dir: Path, signature: str) -> tuple[Path, Path]:
        key = hashlib.sha1(f"{signature}|{self.n}|{self.feature_shape}".encode()).hexdigest()[:16]
        return cache_dir / f"features-{key}.npy", cache_dir / f"features-{key}.json"

    # -- extraction -----------------------------------------------------------------
    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_context(self.device, self.amp):
            f = self.backbone(images)
        return f.float()

    def estimate_bytes(self) -> int:
        c, h, w = self.feature_shape
        return int(self.n * c * h * w * 2)

    def _loader(self, order: torch.Tensor, batch_size: int) -> DataLoader:
        batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        return DataLoader(
            _ImagesOnly(self.dataset),
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=_collate,
        )

    def _build_cache(self, cache_dir: Path, signature: str) -> None:
        """Map the cache, extracting it first (data-parallel over all ranks) if it does not exist.

        Every rank extracts its share of each global chunk; the chunks are all-gathered and rank 0
        alone writes the file (atomically, through a temporary name). The other ranks map it
        after a barrier, which is why the cache directory must be shared by all ranks
        (:func:`~causeseg.distributed.check_shared_dir` raises a clear error otherwise).
        """
        from .distributed import barrier, broadcast_object, check_shared_dir, current

        ctx = current()
        path, meta = self._cache_paths(cache_dir, signature)
        check_shared_dir(cache_dir, "feature cache directory")
        have = broadcast_object(bool(path.exists() and meta.exists()) if ctx.is_main else None)
        if have:
            log.info("using feature cache %s", path)
        else:
            self._write_cache(cache_dir, path, meta, signature, ctx)
        barrier()
        self._cache = np.load(path, mmap_mode="r")
        if tuple(self._cache.shape) != (self.n, *self.feature_shape):
            raise RuntimeError(f"{path}: feature cache has shape {tuple(self._cache.shape)}, expected "
                               f"{(self.n, *self.feature_shape)}; delete it to rebuild")

    def _write_cache(self, cache_dir: Path, path: Path, meta: Path, signature: str, ctx: DistContext,
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
            f = self._extract(images.to(self.device)).to(torch.float16)
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
            meta.write_text(json.dumps({"signature": signature, "n": self.n, "shape": list(self.feature_shape)}))

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
        order = epoch_order(self.n, seed, epoch) if shuffle else torch.arange(self.n)
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
                yield step, self._extract(images.to(self.device)), idx
                step += 1
