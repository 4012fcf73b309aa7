"""Fully connected CRF refinement (Krähenbühl & Koltun 2011) on ``pydensecrf`` (PyPI package ``pydensecrf2``).

Our own wrapper (the STEGO/HP/CAUSE ``crf.py`` is CC BY-NC and is not used). The protocol constants
(the official CAUSE `utils/utils.py` `dense_crf`; identical in STEGO, HP and CAUSE) are the defaults of
:class:`CRFParams`: 10 mean-field iterations, a Gaussian (smoothness) kernel with ``sxy = 1`` and weight 3,
and a bilateral (appearance) kernel with ``sxy = 67``, ``srgb = 3`` and weight 4. The unary is
``-log p`` of the per-pixel class probabilities (CAUSE: ``p = softmax(3·cos(y, centroids))``, see
:func:`causeseg.tta.cluster_probs`).

The image is handed to pydensecrf as the official evaluation does (:func:`protocol_image`): the ImageNet
normalise / un-normalise round trip in float32, ``×255`` truncated to uint8, channels reversed to BGR.
:meth:`CRFRunner.refine` takes the [0, 1] float images and does this; :meth:`CRFRunner.run` takes uint8 images
and hands them over unchanged.

This module imports neither torch nor pydensecrf at import time, so worker processes start quickly and a
missing ``pydensecrf`` only fails when a CRF is actually run (:class:`CRFUnavailableError`).

Process pools use the ``forkserver`` start method (``spawn`` where unavailable). Like every non-fork start
method this requires scripts that use :class:`CRFRunner` with ``workers > 0`` to guard their entry point
with ``if __name__ == "__main__":``. ``workers=0`` runs serially in the calling process (some environments
hang with process pools, STEGO issue #16).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["CRFParams", "CRFUnavailableError", "dense_crf", "to_uint8_image", "protocol_image", "CRFRunner",
           "default_workers", "CHANNEL_ORDERS"]

#: Channel orders of the uint8 image handed to pydensecrf: "bgr" is the official protocol's.
CHANNEL_ORDERS = ("bgr", "rgb")


class CRFUnavailableError(ImportError):
    """Raised when ``pydensecrf`` (PyPI: ``pydensecrf2``) cannot be imported."""


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF constants; the defaults are the evaluation protocol's (STEGO = HP = CAUSE)."""

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    eps: float = 1e-8  # probabilities are clipped to [eps, ∞) before -log

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"CRF iterations must be >= 0, got {self.iterations}")
        if not self.eps > 0:
            raise ValueError(f"CRF eps must be > 0, got {self.eps}")


def _import_dcrf() -> Any:
    try:
        import pydensecrf.densecrf as dcrf  # type: ignore[import-not-found]
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CRFUnavailableError(
            "dense CRF needs the 'pydensecrf' module, provided by the PyPI package 'pydensecrf2==1.1' "
            "(pip install pydensecrf2==1.1; needs a C++ compiler and Python headers). "
            "Evaluate without CRF to skip it."
        ) from e
    return dcrf


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _where(source: str | None) -> str:
    return f" ({source})" if source else ""


def _check_image(image_u8: Any, source: str | None = None) -> np.ndarray:
    img = _to_numpy(image_u8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"CRF image must be (H, W, 3) uint8, got shape {img.shape}{_where(source)}")
    if img.dtype != np.uint8:
        raise ValueError(
            f"CRF image must have dtype uint8, got {img.dtype}{_where(source)}; convert [0, 1] floats with "
            "causeseg.crf.to_uint8_image"
        )
    # pydensecrf needs a writable, C-contiguous buffer (np.asarray(PIL image) is read-only)
    return np.array(img, dtype=np.uint8, order="C", copy=True)


def _check_probs(probs: Any, hw: tuple[int, int], source: str | None = None) -> np.ndarray:
    p = _to_numpy(probs)
    if p.ndim != 3:
        raise ValueError(f"CRF probabilities must be (C, H, W), got shape {p.shape}{_where(source)}")
    if p.shape[0] < 1:
        raise ValueError(f"CRF probabilities have no classes, shape {p.shape}{_where(source)}")
    if tuple(p.shape[1:]) != tuple(hw):
        raise ValueError(
            f"CRF probabilities of shape {p.shape} do not match the image size (H, W) = {tuple(hw)}{_where(source)}"
        )
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"CRF probabilities must be floating point, got {p.dtype}{_where(source)}")
    p = p.astype(np.float32, copy=False)
    if not np.all(np.isfinite(p)) or p.min() < 0:
        raise ValueError(f"CRF probabilities must be finite and non-negative{_where(source)}")
    return p


def to_uint8_image(image01: Any, rounding: str = "truncate") -> np.ndarray:
    """Convert a (3, H, W) float image in [0, 1] (torch or numpy) to a writable C-contiguous (H, W, 3) uint8.

    ``rounding="truncate"`` reproduces ``torchvision.transforms.functional.to_pil_image`` (``(x·255).byte()``),
    which the official evaluation uses before the CRF (see :func:`protocol_image`); ``"round"`` rounds.
    """
    x = _to_numpy(image01).astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image in [0, 1], got shape {x.shape}")
    x = np.clip(x, 0.0, 1.0) * 255.0
    if rounding == "truncate":
        x = np.floor(x)
    elif rounding == "round":
        x = np.rint(x)
    else:
        raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
    return np.ascontiguousarray(x.transpose(1, 2, 0).astype(np.uint8))


def protocol_image(image01: Any, channels: str = "bgr") -> np.ndarray:
    """The uint8 image the official CAUSE evaluation hands pydensecrf, from a (3, H, W) float image in [0, 1].

    The official ``dense_crf`` receives the ImageNet-normalised tensor, un-normalises it (``x·std + mean``),
    converts it with ``to_pil_image`` (``×255``, truncated to uint8) and reverses the channels (``[:, :, ::-1]``,
    RGB -> BGR). The float32 round trip ``((x - mean) / std) · std + mean`` does not give every value back
    exactly: of the 768 channel values k/255 that ``ToTensor`` produces, 137 come back a little below and
    truncate to k - 1 (computed in float32 here exactly as torch does: each step rounded once).
    ``channels="rgb"`` keeps the same values in RGB order (the bilateral kernel is isotropic in colour, so the
    order changes only the lattice's rounding). Values outside [0, 1] are clipped first.
    Returns a writable C-contiguous (H, W, 3) uint8 array.
    """
    from .backbones.registry import IMAGENET_MEAN, IMAGENET_STD  # the official un-normalisation constants

    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"CRF image channels must be one of {CHANNEL_ORDERS}, got {channels!r}")
    x = _to_numpy(image01)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image in [0, 1], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {x.dtype}")
    x = np.clip(x.astype(np.float32), 0.0, 1.0)
    if not np.all(np.isfinite(x)):
        raise ValueError("CRF image has non-finite values")
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    back = ((x - mean) / std) * std + mean  # float32 throughout, like torchvision Normalize and STEGO's UnNormalize
    u8 = np.trunc(back * np.float32(255.0)).clip(0, 255).astype(np.uint8)  # to_pil_image: mul(255).byte()
    hwc = u8.transpose(1, 2, 0)
    return np.ascontiguousarray(hwc[:, :, ::-1] if channels == "bgr" else hwc)


def dense_crf(
    image_u8: Any, probs: Any, params: CRFParams | None = None, *, source: str | None = None
) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF.

    Args:
        image_u8: (H, W, 3) uint8 image (numpy or torch), handed to pydensecrf as given (see
            :func:`protocol_image` for the official BGR input).
        probs: (C, H, W) class probabilities (need not be normalised: a per-pixel scale only shifts the unary
            by a per-pixel constant, which mean-field inference ignores).
        params: CRF constants (default: the protocol's).
        source: optional image name for error messages.

    Returns:
        (C, H, W) float32 marginals after ``params.iterations`` mean-field steps (rows sum to 1).
    """
    params = params or CRFParams()
    img = _check_image(image_u8, source)
    h, w = img.shape[:2]
    p = _check_probs(probs, (h, w), source)
    dcrf = _import_dcrf()
    c = p.shape[0]
    unary = np.ascontiguousarray(-np.log(np.maximum(p, params.eps)).reshape(c, h * w), dtype=np.float32)
    model = dcrf.DenseCRF2D(w, h, c)
    model.setUnaryEnergy(unary)
    model.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    model.addPairwiseBilateral(
        sxy=params.bilateral_sxy, srgb=params.bilateral_srgb, rgbim=img, compat=params.bilateral_compat
    )
    q = model.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def _crf_task(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    return dense_crf(image, probs, params)


def default_workers() -> int:
    """Number of CPUs usable by this process (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class CRFRunner:
    """Run :func:`dense_crf` over many images, in worker processes or serially.

    Args:
        workers: number of worker processes; ``None`` = one per usable CPU; ``0`` = serial in this process.
        timeout: per-image limit in seconds (pool only). An image whose CRF does not finish in time keeps its
            un-refined probabilities; a warning is issued and :attr:`num_timeouts` is incremented, and the
            pool is restarted (the stuck worker is terminated). Ignored when ``workers=0`` (a running C call
            cannot be interrupted in-process).
        params: CRF constants (default: the protocol's).
        start_method: ``"forkserver"`` (default where available) or ``"spawn"``.
        channels: channel order of the image :meth:`refine` hands pydensecrf: ``"bgr"`` (the official protocol,
            default) or ``"rgb"``.

    Use as a context manager (``with CRFRunner(2) as crf: ...``) or call :meth:`close`.
    """

    def __init__(
        self,
        workers: int | None = None,
        timeout: float | None = None,
        params: CRFParams | None = None,
        start_method: str | None = None,
        channels: str = "bgr",
    ) -> None:
        if workers is None:
            workers = default_workers()
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = serial), got {workers}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {start_method!r}")
        if channels not in CHANNEL_ORDERS:
            raise ValueError(f"CRF image channels must be one of {CHANNEL_ORDERS}, got {channels!r}")
        self.workers = int(workers)
        self.timeout = timeout
        self.params = params or CRFParams()
        self.start_method = start_method
        self.channels = channels
        self.num_timeouts = 0
        self.timed_out: list[int] = []  # indices (within the last run) that fell back
        self._pool: Any = None
        self._task = _crf_task  # what a pool worker runs (module-level, so it pickles by reference)

    # -- pool management -------------------------------------------------------------------------------------
    def _get_pool(self) -> Any:
        if self._pool is None:
            ctx = mp.get_context(self.start_method)
            self._pool = ctx.Pool(self.workers)
        return self._pool

    def _kill_pool(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        """Shut the worker pool down (idempotent)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> "CRFRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc and exc[0] is not None:
            self._kill_pool()
        else:
            self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._kill_pool()
        except Exception:
            pass

    # -- running ---------------------------------------------------------------------------------------------
    def refine(self, images01: Sequence[Any] | Any, probs: Sequence[Any] | Any) -> list[np.ndarray]:
        """:meth:`run` on float images in [0, 1] ((B, 3, H, W) or a sequence of (3, H, W)), each converted by
        :func:`protocol_image` with this runner's ``channels`` (the official CRF input by default)."""
        return self.run([protocol_image(im, self.channels) for im in images01], probs)

    def run(self, images: Sequence[Any] | Any, probs: Sequence[Any] | Any) -> list[np.ndarray]:
        """Refine each ``probs[i]`` (C, H, W) with its ``images[i]`` (H, W, 3) uint8.

        ``images`` / ``probs`` may be sequences or batched arrays/tensors ((B, H, W, 3) and (B, C, H, W)).
        All inputs are validated in this process before any work is dispatched. Returns a list of (C, H, W)
        float32 arrays in input order.
        """
        imgs = [_check_image(im, f"image {i}") for i, im in enumerate(images)]
        prbs = [_check_probs(p, im.shape[:2], f"image {i}") for i, (p, im) in enumerate(zip(probs, imgs))]
        if len(imgs) != len(prbs):
            raise ValueError(f"got {len(imgs)} images but {len(prbs)} probability maps")
        self.timed_out = []
        if not imgs:
            return []
        if self.workers == 0:
            _import_dcrf()
            return [dense_crf(im, p, self.params, source=f"image {i}") for i, (im, p) in enumerate(zip(imgs, prbs))]
        _import_dcrf()  # fail early and clearly in the parent
        if self.timeout is None:
            pool = self._get_pool()
            jobs = [pool.apply_async(self._task, (im, p, self.params)) for im, p in zip(imgs, prbs)]
            return [self._get(job, i, None) for i, job in enumerate(jobs)]
        return self._run_with_timeout(imgs, prbs)

    def _get(self, job: Any, index: int, timeout: float | None) -> np.ndarray:
        try:
            return job.get(timeout)
        except mp.TimeoutError:
            raise
        except Exception as e:
            raise RuntimeError(f"dense CRF failed on image {index}: {e}") from e

    def _run_with_timeout(self, imgs: list[np.ndarray], prbs: list[np.ndarray]) -> list[np.ndarray]:
        # Dispatch at most `workers` images at a time so that every dispatched image starts immediately and the
        # deadline measures its own run time; on a timeout the pool is terminated (killing the stuck worker).
        assert self.timeout is not None
        out: list[np.ndarray | None] = [None] * len(imgs)
        for start in range(0, len(imgs), self.workers):
            idx = list(range(start, min(start + self.workers, len(imgs))))
            pool = self._get_pool()
            jobs = {i: pool.apply_async(self._task, (imgs[i], prbs[i], self.params)) for i in idx}
            deadline = time.monotonic() + self.timeout
            stuck = False
            for i, job in jobs.items():
                try:
                    out[i] = self._get(job, i, max(0.0, deadline - time.monotonic()))
                except mp.TimeoutError:
                    stuck = True
                    self.num_timeouts += 1
                    self.timed_out.append(i)
                    warnings.warn(
                        f"dense CRF on image {i} exceeded {self.timeout:g} s; keeping its un-refined probabilities",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    out[i] = prbs[i].copy()
            if stuck:
                self._kill_pool()
        return [o for o in out if o is not None]
