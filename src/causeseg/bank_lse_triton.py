"""Triton kernels of :mod:`causeseg.bank_lse` (optional: imported only when the Triton path runs).

``triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported, so importing it lazily lets
tests run the kernels in Triton's CPU interpreter.
"""

import triton
import triton.language as tl


@triton.jit
def tile_logits(a_ptr, z_ptr, u_ptr, v_ptr, sc_ptr, rows, cols, n_rows, n_cols, dim, nb,
                stride_am, stride_zn, stride_um,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # the (BLOCK_M x BLOCK_N) tile of raw logits a . z (fp32 accumulation, K-loop over d), the column
    # scale inv_norm / tau and the mask U[i, j // b] & valid[j]
    cols64 = cols.to(tl.int64)  # k*b*d may exceed 2**31
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < dim
        a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        z = tl.load(z_ptr + cols64[:, None] * stride_zn + kk[None, :],
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST_DOT:  # Triton's interpreter multiplies bf16 as raw uint16: feed it fp32 (same values)
            a = a.to(tl.float32)
            z = z.to(tl.float32)
        acc = tl.dot(a, tl.trans(z), acc, input_precision=PRECISION)
    sc = tl.load(sc_ptr + cols, mask=col_ok, other=0.0)
    v = tl.load(v_ptr + cols, mask=col_ok, other=0)
    u = tl.load(u_ptr + rows[:, None] * stride_um + (cols // nb)[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0)
    keep = (u != 0) & (v != 0)[None, :]
    return acc, sc, keep


@triton.jit
def bank_lse_fwd(a_ptr, z_ptr, u_ptr, v_ptr, sc_ptr, m_ptr, l_ptr,
                 n_rows, n_cols, dim, nb, tiles_per_prog,
                 stride_am, stride_zn, stride_um,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # one program: BLOCK_M rows x a run of tiles_per_prog bank tiles, online max / sum-exp over them
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for t in range(0, tiles_per_prog):
        cols = (pid_s * tiles_per_prog + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc, sc, keep = tile_logits(a_ptr, z_ptr, u_ptr, v_ptr, sc_ptr, rows, cols, n_rows, n_cols, dim, nb,
                                     stride_am, stride_zn, stride_um, BLOCK_M, BLOCK_N, BLOCK_K,
                                     PRECISION, UPCAST_DOT)
        s = tl.where(keep, acc * sc[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(keep, tl.exp(s - m_safe[:, None]), 0.0)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(p, 1)
        m_i = m_new
    out = pid_s * n_rows + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def bank_lse_weights(a_ptr, z_ptr, u_ptr, v_ptr, sc_ptr, shift_ptr, w_ptr, psum_ptr,
                     n_rows, n_cols, dim, nb,
                     stride_am, stride_zn, stride_um, stride_wm, stride_pm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # one program: one (BLOCK_M x BLOCK_N) tile; e = exp(s - shift_i) on the mask,
    # w = e * inv_norm / tau stored in w's dtype, and the tile's row sums of e in psum[:, pid_n]
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    acc, sc, keep = tile_logits(a_ptr, z_ptr, u_ptr, v_ptr, sc_ptr, rows, cols, n_rows, n_cols, dim, nb,
                                 stride_am, stride_zn, stride_um, BLOCK_M, BLOCK_N, BLOCK_K,
                                 PRECISION, UPCAST_DOT)
    shift = tl.load(shift_ptr + rows, mask=row_ok, other=0.0)
    # exp(s - shift) <= ~1 on the mask; off the mask the where() discards whatever exp gives
    e = tl.where(keep, tl.exp(acc * sc[None, :] - shift[:, None]), 0.0)
    tl.store(psum_ptr + rows * stride_pm + pid_n, tl.sum(e, 1), mask=row_ok)
    w = e * sc[None, :]
    tl.store(w_ptr + rows.to(tl.int64)[:, None] * stride_wm + cols64[None, :], w.to(w_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
