"""Memory-efficient masked log-sum-exp over the concept bank (the bank term of CAUSE Step 2, official form).

For every anchor row ``i`` (student projection ``a_i``, already L2-normalised) the official-form bank term
needs

    lse_i = log sum_{m, slot : U[i, m] and valid[m, slot]} exp( a_i . z_{m,slot} * inv_norm_{m,slot} / tau )

over the ``(k, b, d)`` concept bank ``z`` (teacher projections, no gradient), where ``U (A, k)`` is the
anchor's concept mask (``Pos_i u Neg_i`` at concept level, :func:`causeseg.contrastive.concept_masks`) and
``valid (k, b)`` marks the filled slots. With the official sizes (``A = 1600`` anchors, ``k*b = 204,800``
entries, ``d = 2048``) the logits are 1.3 GB in fp32; :func:`bank_logsumexp` never materialises them
for all rows, never builds an ``(A, k*b)`` mask, runs the matmuls in the dtype it is given (bf16 under AMP,
with fp32 accumulation) and does the log-sum-exp in fp32 (fp64 for fp64 inputs).

The gradient needs no second look at the logits: ``d lse_i / d a_i = mean_i = sum_j p_ij z_j inv_norm_j / tau``
with ``p_ij = exp(s_ij - lse_i)`` on the mask. When ``a`` requires a gradient the forward computes ``mean``
(``(A, d)``, as small as ``a``) from the same pass that produces ``lse``, and the backward is
``grad_a_i = g_i * mean_i`` -- two matmul-sized passes in all (``a z^T`` and ``p z``) instead of three
with a recomputing backward, and neither the logits nor ``p`` are kept (only ``mean`` and a bool ``(A,)``).

Shift (Triton). A tile of the Triton weights kernel cannot see its row's maximum, so it uses a fixed shift:
``c = max_i ||a_i|| * max_j ||z_j|| inv_norm_j / tau`` bounds every ``|s_ij|`` (``c = 1 / tau`` for normalised
inputs), so ``e_ij = exp(s_ij - c)`` lies in ``[exp(-2c), 1]`` and one pass gives ``lse_i = c + log sum_j e_ij``
and ``mean_i = (sum_j e_ij z_j inv_norm_j / tau) / sum_j e_ij``. When ``2c`` exceeds what the accumulation
dtype represents (fp32: ``2c > 80``, i.e. ``tau < ~0.025`` for normalised inputs; fp64: 1400), and always for
fp16 weights, the streaming kernel's online maximum gives ``lse`` first and the weights use ``exp(s_ij - lse_i)``.
The torch implementation needs no shift: each chunk holds whole rows, so it takes the exact row maximum.

Two implementations behind one :class:`torch.autograd.Function` (gradient w.r.t. ``a`` only):

* ``impl="torch"`` -- chunks of ``block_rows`` anchor rows: ``raw = a_rows @ z^T`` (one matmul; fp32 output
  on CUDA where ``torch.mm(out_dtype=)`` exists), ``s = raw * inv_norm / tau`` with ``valid`` as a
  ``0 / -inf`` column bias fused in one ``addcmul``, the row mask ``U[i, m]`` broadcast over the ``(R, k, b)``
  view, ``e = exp(s - row max)``, the fp32 row sums, and (with a gradient) ``w = e * inv_norm / tau`` cast to
  the compute dtype for ``w @ z``. (On the CPU, where
  fp16/bf16 matmuls are emulated and slow, the rounded operands are multiplied in fp32.)
* ``impl="triton"`` -- two Triton kernels (CUDA, or ``TRITON_INTERPRET=1`` on CPU tensors for testing):
  a flash-attention-style streaming kernel (tiles of ``BLOCK_M`` rows x ``BLOCK_N`` bank entries, a K-loop
  over ``d``, online max / sum-exp over the bank tiles of a split, the mask looked up as ``U[i, j // b]`` and
  ``valid[j]``; the splits' partial ``(max, sum)`` are merged in torch) used for ``lse`` without a
  gradient and on the exact path; and a weights kernel that computes each logit tile once, writes
  ``w = e * inv_norm / tau`` (compute dtype) for a chunk of rows and the tile's row sums of ``e``, followed by
  one ``w @ z`` matmul per chunk (cuBLAS, fp32 accumulation). ``d = 2048`` is too wide to keep an ``(A, d)``
  accumulator in registers, so that second matmul is left to cuBLAS.
* ``impl="auto"`` -- ``triton`` when the tensors are on CUDA, the compute dtype is fp16/bf16/fp32,
  ``triton`` imports and the kernels pass a one-time self-test against the torch implementation on that
  device and dtype (:func:`triton_selftest`; a failure warns and falls back); ``torch`` otherwise. Triton is
  an optional import (never needed by ``import causeseg``).

Rows whose mask holds no valid entry get a finite placeholder ``log(finfo(dtype).tiny)`` (as
:func:`causeseg.contrastive._masked_logsumexp`) and zero gradient; ``nonempty`` says which rows are real.
Invalid slots may hold any finite values (they are masked, never read into the result).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch.autograd.function import once_differentiable

__all__ = ["IMPLS", "bank_logsumexp", "triton_available", "triton_selftest", "resolve_impl"]

IMPLS = ("auto", "torch", "triton")

#: elements of one chunk's ``(rows x k*b)`` fp32 temporaries: 1 GiB on CUDA (1310 of the 1600 official rows: the
#: ``w @ z`` matmul needs enough rows to fill the GPU), 64 MB on the CPU
_BLOCK_ELEMENTS = {"cuda": 2**28, "cpu": 2**24}
#: CPU fp16/bf16 matmuls are emulated and very slow on most CPUs: the torch implementation multiplies the
#: rounded operands in fp32 there (same inputs, fp32 products); tests set this to exercise the low-precision code
_CPU_LOWP_MATMUL = False
#: the fixed-shift path needs exp(-2c) to stay a normal number of the accumulation dtype
_MAX_SPAN = {torch.float32: 80.0, torch.float64: 1400.0}


# ----------------------------------------------------------------------------------------------- helpers
def _acc_dtype(cdt: torch.dtype) -> torch.dtype:
    return torch.float64 if cdt == torch.float64 else torch.float32


def _block_rows(block_rows: int | None, n_cols: int, device: torch.device) -> int:
    if block_rows is not None:
        if block_rows < 1:
            raise ValueError(f"bank_logsumexp: block_rows must be >= 1, got {block_rows}")
        return int(block_rows)
    budget = _BLOCK_ELEMENTS.get(device.type, _BLOCK_ELEMENTS["cpu"])
    return max(1, budget // max(1, n_cols))


def triton_available() -> bool:
    """True when ``triton`` imports (it is not a dependency of causeseg; CUDA builds of torch bring it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"torch"`` or ``"triton"`` for ``impl`` in :data:`IMPLS` on ``device`` with compute ``dtype``.

    ``"auto"`` picks Triton only on CUDA, for fp16/bf16/fp32, when ``triton`` imports and the kernels pass a
    one-time self-test on that device and dtype (:func:`triton_selftest`); otherwise torch.
    """
    if impl not in IMPLS:
        raise ValueError(f"bank_logsumexp: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    supported = dtype in (torch.float16, torch.bfloat16, torch.float32)
    if impl == "auto":
        use = device.type == "cuda" and supported and triton_available() and triton_selftest(device, dtype)
        return "triton" if use else "torch"
    if not triton_available():
        raise RuntimeError("bank_logsumexp: impl='triton' but the 'triton' package does not import "
                           "(it comes with CUDA builds of torch; use impl='torch' or 'auto')")
    if not supported:
        raise ValueError(f"bank_logsumexp: impl='triton' supports fp16/bf16/fp32, got {dtype}")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"bank_logsumexp: impl='triton' needs CUDA tensors (got {device.type}); set "
                           f"TRITON_INTERPRET=1 before the first call to run the kernels in Triton's interpreter")
    return "triton"


# ----------------------------------------------------------------------------------------------- torch impl
_MM_OUT_DTYPE_OK: dict[str, bool] = {}


def _mm(x: torch.Tensor, y: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``x @ y``; fp16/bf16 inputs on CUDA give an fp32 result straight from the fp32 accumulator
    (``torch.mm(..., out_dtype=)``) where this torch has it, else the matmul's own dtype."""
    dev = x.device.type
    if x.dtype != acc and dev == "cuda" and _MM_OUT_DTYPE_OK.get(dev, True):
        try:
            return torch.mm(x, y, out_dtype=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK[dev] = False
    return x @ y


def _shift_bound(a_c: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, valid: torch.Tensor) -> float | None:
    """``c`` with ``|s_ij| <= c`` for every valid entry, or ``None`` when the fixed-shift path is unsafe."""
    acc = scale.dtype
    if a_c.shape[0] == 0 or not bool(valid.any()):
        return None
    a_max = float(torch.linalg.vector_norm(a_c, dim=-1, dtype=acc).max())
    z_eff = torch.linalg.vector_norm(z, dim=-1, dtype=acc) * scale
    c = a_max * float(z_eff[valid].max())
    if not math.isfinite(c) or 2 * c > _MAX_SPAN[acc]:
        return None
    return c


def _torch_lse_and_mean(a_c: torch.Tensor, z: torch.Tensor, umask: torch.Tensor, valid: torch.Tensor,
                        scale: torch.Tensor, nb: int, rows_per_block: int,
                        want_mean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw ``lse`` (``-inf`` for empty rows) and, if ``want_mean``, ``mean_i = sum_j p_ij z_j inv_norm_j / tau``
    (= ``d lse_i / d a_i``; zero for empty rows), both in the accumulation dtype.

    A chunk holds all bank columns of its rows, so the row maximum is exact: one pass over the logits per chunk
    gives ``e = exp(s - max)`` on the mask, ``lse = max + log sum e`` and ``mean = (e * scale) @ z / sum e``.
    """
    n_rows, n_cols = a_c.shape[0], z.shape[0]
    k = n_cols // nb
    acc, cdt = scale.dtype, z.dtype
    dev = a_c.device
    lse = torch.empty(n_rows, dtype=acc, device=dev)
    mean = torch.zeros(n_rows, z.shape[1], dtype=acc, device=dev) if want_mean else None
    zt = z.t()
    colbias = torch.zeros_like(scale).masked_fill_(~valid, float("-inf"))
    scale3 = scale.view(1, k, nb)
    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(n_rows, r0 + rows_per_block)
        raw = _mm(a_c[r0:r1], zt, acc)  # (R, N); fp32 accumulation inside the matmul
        s = torch.addcmul(colbias, raw, scale, out=raw) if raw.dtype == acc else torch.addcmul(colbias, raw, scale)
        del raw
        s3 = s.view(r1 - r0, k, nb).masked_fill_(~umask[r0:r1].unsqueeze(-1), float("-inf"))
        mx = s3.amax((1, 2))
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # empty rows: e = 0 everywhere
        e3 = s3.sub_(mx.view(-1, 1, 1)).exp_()
        total = e3.sum((1, 2))
        lse[r0:r1] = total.log() + mx  # empty rows: log(0) = -inf
        if want_mean:
            if cdt == acc:
                w = e3.mul_(scale3)
            else:
                w = torch.empty(e3.shape, dtype=cdt, device=dev)
                torch.mul(e3, scale3, out=w)
                if cdt == torch.float16:  # p * inv_norm / tau can exceed the fp16 range for near-zero entries
                    w.nan_to_num_(posinf=torch.finfo(cdt).max)
            num = _mm(w.view(r1 - r0, n_cols), z, acc).to(acc)
            mean[r0:r1] = torch.where(total.unsqueeze(1) > 0, num / total.unsqueeze(1), torch.zeros_like(num))
            del w
        del s, s3, e3
    return lse, mean


# ----------------------------------------------------------------------------------------------- triton impl
_KERNELS: dict[str, Any] | None = None


def _triton_kernels() -> dict[str, Any]:
    """Import the Triton kernels on first use (``triton.jit`` reads ``TRITON_INTERPRET`` at import)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    from . import bank_lse_triton as kernels

    _KERNELS = {"fwd": kernels.bank_lse_fwd, "weights": kernels.bank_lse_weights}
    return _KERNELS


def _triton_config(cdt: torch.dtype, device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":  # interpreter: the smallest tiles tl.dot accepts
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1,
                "PRECISION": "ieee" if cdt == torch.float32 else None, "UPCAST_DOT": cdt == torch.bfloat16}
    if cdt == torch.float32:
        prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2, "PRECISION": prec,
                "UPCAST_DOT": False}
    # fp16 / bf16: tensor-core dot, fp32 accumulation (input_precision only concerns fp32 inputs)
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3, "PRECISION": None,
            "UPCAST_DOT": False}


def _launch_opts(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    opts = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PRECISION", "UPCAST_DOT")}
    if device.type == "cuda":
        opts.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return opts


def _triton_lse(a_c: torch.Tensor, z: torch.Tensor, u8: torch.Tensor, v8: torch.Tensor,
                scale32: torch.Tensor, nb: int) -> torch.Tensor:
    """Raw ``lse`` in fp32 (``-inf`` for empty rows): the streaming kernel plus a merge of the splits."""
    kern = _triton_kernels()["fwd"]
    dev = a_c.device
    n_rows, dim = a_c.shape
    n_cols = z.shape[0]
    cfg = _triton_config(z.dtype, dev)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    row_blocks = -(-n_rows // bm)
    n_tiles = -(-n_cols // bn)
    if dev.type == "cuda":
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        want_splits = max(1, -(-4 * sms // row_blocks))
    else:  # interpreter: few splits, so a program streams several tiles (the online path is exercised)
        want_splits = 2
    tiles_per_prog = max(1, -(-n_tiles // want_splits))
    splits = -(-n_tiles // tiles_per_prog)
    m = torch.empty(splits, n_rows, dtype=torch.float32, device=dev)
    l_ = torch.empty(splits, n_rows, dtype=torch.float32, device=dev)
    kern[(row_blocks, splits)](a_c, z, u8, v8, scale32, m, l_, n_rows, n_cols, dim, nb, tiles_per_prog,
                               a_c.stride(0), z.stride(0), u8.stride(0), **_launch_opts(cfg, dev))
    mx = m.amax(0)
    mx_safe = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    total = (l_ * torch.exp(m - mx_safe)).sum(0)
    return total.log() + mx_safe  # empty rows: log(0) = -inf


def _triton_weighted(a_c: torch.Tensor, z: torch.Tensor, u8: torch.Tensor, v8: torch.Tensor,
                     scale32: torch.Tensor, shift: torch.Tensor, nb: int,
                     rows_per_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row ``total_i = sum_j e_ij`` and ``num_i = sum_j e_ij z_j inv_norm_j / tau`` with
    ``e_ij = exp(s_ij - shift_i)`` on the mask: the weights kernel writes ``e * inv_norm / tau`` for a chunk
    of rows (compute dtype), then one ``w @ z`` matmul (fp32 accumulation) per chunk."""
    kern = _triton_kernels()["weights"]
    dev = a_c.device
    n_rows, dim = a_c.shape
    n_cols = z.shape[0]
    cfg = _triton_config(z.dtype, dev)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_tiles = -(-n_cols // bn)
    num = torch.zeros(n_rows, dim, dtype=torch.float32, device=dev)
    total = torch.zeros(n_rows, dtype=torch.float32, device=dev)
    rows_per_block = min(rows_per_block, n_rows)
    w = torch.empty(rows_per_block, n_cols, dtype=z.dtype, device=dev)
    psum = torch.empty(rows_per_block, n_tiles, dtype=torch.float32, device=dev)
    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(n_rows, r0 + rows_per_block)
        wr, pr = w[: r1 - r0], psum[: r1 - r0]
        a_r, u_r = a_c[r0:r1], u8[r0:r1]
        kern[(-(-(r1 - r0) // bm), n_tiles)](
            a_r, z, u_r, v8, scale32, shift[r0:r1], wr, pr, r1 - r0, n_cols, dim, nb,
            a_r.stride(0), z.stride(0), u_r.stride(0), wr.stride(0), pr.stride(0), **_launch_opts(cfg, dev))
        total[r0:r1] = pr.sum(1)
        num[r0:r1] = _mm(wr, z, torch.float32).float()
    return total, num


def _triton_lse_and_mean(a_c: torch.Tensor, z: torch.Tensor, u8: torch.Tensor, v8: torch.Tensor,
                         scale32: torch.Tensor, nb: int, rows_per_block: int, shift: float | None,
                         want_mean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As :func:`_torch_lse_and_mean`, fp32. Without a gradient: the streaming kernel only. With one and a
    fixed shift: the weights kernel alone gives both (one pass over the logits); exact path: both kernels."""
    if not want_mean:
        return _triton_lse(a_c, z, u8, v8, scale32, nb), None
    dev = a_c.device
    if shift is not None:
        total, num = _triton_weighted(a_c, z, u8, v8, scale32, torch.full((a_c.shape[0],), shift,
                                                                          dtype=torch.float32, device=dev),
                                      nb, rows_per_block)
        lse = total.log() + shift
    else:
        lse = _triton_lse(a_c, z, u8, v8, scale32, nb)
        # empty rows: +inf makes every weight exp(s - inf) = 0
        row_shift = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
        total, num = _triton_weighted(a_c, z, u8, v8, scale32, row_shift, nb, rows_per_block)
    ok = total.unsqueeze(1) > 0
    mean = torch.where(ok, num / torch.where(ok, total.unsqueeze(1), torch.ones_like(num[:, :1])),
                       torch.zeros_like(num))
    return lse, mean


# ----------------------------------------------------------------------------------------------- self-test
_SELFTEST: dict[tuple[str, int | None, torch.dtype], bool] = {}


def triton_selftest(device: torch.device, dtype: torch.dtype) -> bool:
    """Run the Triton kernels once on a small problem on ``device`` in ``dtype`` and compare value and gradient
    with the torch implementation. Cached per (device, dtype). A failure (an old Triton, a compiler error,
    a disagreement) is reported as a warning and makes ``impl="auto"`` use torch instead of crashing training.
    """
    key = (device.type, device.index, dtype)
    if key in _SELFTEST:
        return _SELFTEST[key]
    ok = False
    try:
        g = torch.Generator().manual_seed(0)
        n_rows, k, nb, d = 40, 6, 30, 64  # 180 entries: more than one bank tile; rows without valid entries
        a = torch.nn.functional.normalize(torch.randn(n_rows, d, generator=g), dim=-1)
        bank = 2 * torch.randn(k, nb, d, generator=g)
        valid = torch.rand(k, nb, generator=g) > 0.3
        valid[0] = False
        umask = torch.rand(n_rows, k, generator=g) > 0.4
        umask[:3] = False
        umask[:3, 0] = True
        inv = 1.0 / bank.norm(dim=-1)
        w = torch.randn(n_rows, generator=g)
        out = {}
        for impl in ("triton", "torch"):  # its own small graph, whatever grad / autocast mode the caller is in
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                ai = a.to(device=device, dtype=dtype).detach().clone().requires_grad_(True)  # a fresh leaf
                lse, ne = bank_logsumexp(ai, bank.to(device=device, dtype=dtype), umask.to(device),
                                         valid.to(device), inv.to(device), 0.07, impl=impl)
                (lse * w.to(device=device, dtype=lse.dtype)).sum().backward()
            out[impl] = (lse.detach().float().cpu(), ne.cpu(), ai.grad.float().cpu())
        (l1, n1, g1), (l2, n2, g2) = out["triton"], out["torch"]
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        ok = (torch.equal(n1, n2) and bool(torch.isfinite(l1).all()) and bool(torch.isfinite(g1).all())
              and float((l1 - l2).abs().max()) <= tol
              and float((g1 - g2).abs().max()) <= tol * max(1.0, float(g2.abs().max())))
        if not ok:
            warnings.warn(f"bank_logsumexp: the Triton kernels disagree with the torch implementation on {device} "
                          f"({dtype}); impl='auto' uses torch", RuntimeWarning, stacklevel=2)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use Triton here
        warnings.warn(f"bank_logsumexp: the Triton kernels failed on {device} ({dtype}): {type(exc).__name__}: "
                      f"{str(exc)[:300]}; impl='auto' uses torch", RuntimeWarning, stacklevel=2)
        ok = False
    _SELFTEST[key] = ok
    return ok


# ----------------------------------------------------------------------------------------------- autograd
class _BankLSE(torch.autograd.Function):
    """``lse`` per row; when ``a`` needs a gradient the forward also computes ``mean_i = d lse_i / d a_i =
    sum_j p_ij z_j inv_norm_j / tau`` (``(A, d)``, from the same pass over the logits), so the backward is
    ``g_i * mean_i`` and never recomputes the logits. Neither the logits nor ``p`` are kept."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, z: torch.Tensor, umask: torch.Tensor, valid_flat: torch.Tensor,
                scale: torch.Tensor, nonempty: torch.Tensor, nb: int, impl: str, block_rows: int | None,
                max_logit: float | None):
        acc = scale.dtype
        a_c = a.detach().to(z.dtype).contiguous()
        want_mean = bool(ctx.needs_input_grad[0])
        rows = _block_rows(block_rows, z.shape[0], a.device)
        if impl == "triton":  # a tile cannot see its row's maximum: a fixed shift where it is safe
            shift = (_shift_bound(a_c, z, scale, valid_flat) if max_logit is None
                     else (max_logit if 2 * max_logit <= _MAX_SPAN[torch.float32] else None))
            if want_mean and z.dtype == torch.float16:
                # fp16 weights exp(s - c) * inv_norm / tau would underflow (min 6e-8 vs exp(-2c)): normalise by lse
                shift = None
            if block_rows is None:  # only w (compute dtype) is stored: more rows fit the budget
                rows = max(1, rows * 4 // z.element_size())
            raw, mean = _triton_lse_and_mean(a_c, z, umask.to(torch.uint8).contiguous(),
                                             valid_flat.to(torch.uint8).contiguous(),
                                             scale.to(torch.float32).contiguous(), nb, rows, shift, want_mean)
            raw = raw.to(acc)
        else:
            if z.device.type == "cpu" and z.dtype in (torch.float16, torch.bfloat16) and not _CPU_LOWP_MATMUL:
                a_c, z = a_c.to(acc), z.to(acc)  # the values stay fp16/bf16-rounded
            raw, mean = _torch_lse_and_mean(a_c, z, umask, valid_flat, scale, nb, rows, want_mean)
        placeholder = math.log(torch.finfo(acc).tiny)
        lse = torch.where(nonempty, raw, torch.full_like(raw, placeholder))
        if want_mean:
            mean = torch.where(nonempty.unsqueeze(1), mean, torch.zeros_like(mean))
            ctx.save_for_backward(mean, nonempty)
        ctx.a_dtype = a.dtype
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        mean, nonempty = ctx.saved_tensors
        g = torch.where(nonempty, g.to(mean.dtype), torch.zeros_like(g, dtype=mean.dtype))  # finite placeholder
        return ((g.unsqueeze(1) * mean).to(ctx.a_dtype),) + (None,) * 9


# ----------------------------------------------------------------------------------------------- public
def bank_logsumexp(
    a: torch.Tensor,
    bank: torch.Tensor,
    concept_mask: torch.Tensor,
    valid: torch.Tensor,
    inv_norm: torch.Tensor,
    tau: float,
    *,
    impl: str = "auto",
    block_rows: int | None = None,
    dtype: torch.dtype | None = None,
    max_logit: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked log-sum-exp of the bank logits per anchor row (module docstring), differentiable in ``a``.

    Args:
        a: ``(A, d)`` anchors (L2-normalised by the caller; any float dtype; receives the gradient).
        bank: ``(k, b, d)`` bank entries (detached; not normalised -- ``inv_norm`` does that).
        concept_mask: ``(A, k)`` bool ``U``: concept ``m`` is in anchor ``i``'s candidate set.
        valid: ``(k, b)`` bool, filled slots.
        inv_norm: ``(k, b)`` (or ``(k*b,)``) ``1 / ||z||`` (clamped by the caller).
        tau: temperature (> 0).
        impl: ``"auto"`` (Triton on CUDA when available, else torch), ``"torch"`` or ``"triton"``.
        block_rows: anchor rows per chunk (default: about 2**26 logits per chunk on CUDA, 2**24 on the CPU).
        dtype: matmul dtype (default ``a.dtype``); the bank and ``a`` are cast to it. The log-sum-exp and
            the gradient accumulate in fp32 (fp64 when ``dtype`` is fp64).
        max_logit: a bound on ``|s_ij|`` known on the host (``~1 / tau`` for unit-norm anchors, since
            ``inv_norm`` normalises the entries), used as the Triton path's fixed shift; None computes it
            from the data (two host synchronisations). It only has to keep ``exp(s - c)`` in range: a
            slightly low bound gives weights slightly above 1, not a wrong result.

    Returns:
        ``(lse, nonempty)``: ``lse (A,)`` in fp32 (fp64 for fp64), ``nonempty (A,)`` bool. Rows with
        ``nonempty == False`` hold ``log(finfo.tiny)`` and get zero gradient.
    """
    if a.dim() != 2 or bank.dim() != 3 or a.shape[1] != bank.shape[2]:
        raise ValueError(f"bank_logsumexp: expected a (A, d) and bank (k, b, d), got {tuple(a.shape)} and "
                         f"{tuple(bank.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"bank_logsumexp: a must be floating point, got {a.dtype}")
    n_rows, dim = a.shape
    k, nb, _ = bank.shape
    if tuple(concept_mask.shape) != (n_rows, k):
        raise ValueError(f"bank_logsumexp: concept_mask must be (A={n_rows}, k={k}), got {tuple(concept_mask.shape)}")
    if tuple(valid.shape) != (k, nb):
        raise ValueError(f"bank_logsumexp: valid must be (k={k}, b={nb}), got {tuple(valid.shape)}")
    if inv_norm.numel() != k * nb:
        raise ValueError(f"bank_logsumexp: inv_norm must hold k*b={k * nb} values, got {tuple(inv_norm.shape)}")
    if not tau > 0:
        raise ValueError(f"bank_logsumexp: tau must be > 0, got {tau}")
    cdt = dtype or a.dtype
    if not cdt.is_floating_point:
        raise ValueError(f"bank_logsumexp: dtype must be floating point, got {cdt}")
    acc = _acc_dtype(cdt)
    dev = a.device
    umask = concept_mask.to(device=dev, dtype=torch.bool)
    valid = valid.to(device=dev, dtype=torch.bool)
    nonempty = (umask & valid.any(1).unsqueeze(0)).any(1)
    if n_rows == 0 or k * nb == 0 or dim == 0:
        lse = torch.full((n_rows,), math.log(torch.finfo(acc).tiny), dtype=acc, device=dev)
        return lse + 0.0 * a.sum().to(acc), nonempty
    use = resolve_impl(impl, dev, cdt)
    z = bank.detach().to(device=dev, dtype=cdt).reshape(k * nb, dim)
    if z.stride(-1) != 1 or z.stride(0) != dim:
        z = z.contiguous()
    scale = inv_norm.detach().to(device=dev, dtype=acc).reshape(k * nb) / tau
    if max_logit is not None and not max_logit > 0:
        raise ValueError(f"bank_logsumexp: max_logit must be > 0, got {max_logit}")
    lse = _BankLSE.apply(a, z, umask, valid.reshape(-1), scale, nonempty, nb, use, block_rows, max_logit)
    return lse, nonempty
