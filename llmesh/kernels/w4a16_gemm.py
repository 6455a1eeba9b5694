"""W4A16 GEMM: y[M, N] = x[M, K] @ W[K, N] with W stored as 4-bit codes (Int4Weight's layout).

Layout (services/engine/quant/packed.py): qweight uint8 [Kp/2, N], byte (j, n) holding
q[j, n] in its low nibble and q[j + Kp/2, n] in its high nibble; scales and mins float16
[Kp/G, N] with w = q * scale + min. Kp is K rounded up to a multiple of 2G, so Kp/2 is a
multiple of G and both halves start on a group boundary.

A program owns a [BLOCK_M, BLOCK_N] output tile and a contiguous range of byte rows
(split-K). For each [BLOCK_K, BLOCK_N] byte tile it loads the bytes once, dequantizes both
nibbles in registers in float32 (BLOCK_K divides G, so each half of the tile uses one scale
row and one min row), rounds them to x's dtype as the torch reference does, and issues two
tl.dot: x[:, j] @ W_lo and x[:, Kp/2 + j] @ W_hi, both activation tiles contiguous and
masked to zero past K. Factoring the scales out of the dot (s * (x @ q) + m * sum(x), as
the INT8 kernel does) measured slower here on an H100 (0.79x vs 1.17x bf16 at M = 1): the
per-tile row sums of x for the mins cost more than the dequantization they save. Accumulation
is float32. With split_k > 1 every split writes a float32 partial and the last split of a tile
to finish sums them in split order (split_k.py): deterministic (greedy decoding must
reproduce), unlike atomic adds, and one launch. No host synchronisation: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    check_last_dim_contiguous, check_out, check_size, check_tensor, dot_in_fp32, dot_precision, interpreting)
from llmesh.kernels.quant_gemm_config import GemmConfig, check_config, pick_config, split_plan
from llmesh.kernels.int_words import as_words, unit_code
from llmesh.kernels.quant_ref import dequantize_int4_ref, w4a16_gemm_ref  # noqa: F401 (the kernel's references)
from llmesh.kernels.split_k import finish, finish_words, split_buffers
from llmesh.kernels.triton_helpers import cast_rtne


@triton.jit
def _w4a16_kernel(
    x_ptr, q_ptr, s_ptr, mn_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, HALF, ROWS_PER_SPLIT, SPLITS,
    stride_xm, stride_q, stride_s, stride_mn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    j_start = pid_k * ROWS_PER_SPLIT
    j_end = tl.minimum(j_start + ROWS_PER_SPLIT, HALF)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        # packed: [BLOCK_K, BLOCK_N] bytes; HALF is a multiple of BLOCK_K, so no row mask
        packed = tl.load(q_ptr + j.to(tl.int64)[:, None] * stride_q + rn[None, :], mask=n_mask[None, :], other=0)
        g_lo = j0 // GROUP
        g_hi = (HALF + j0) // GROUP
        s_lo = tl.load(s_ptr + g_lo * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
        m_lo = tl.load(mn_ptr + g_lo * stride_mn + rn, mask=n_mask, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + g_hi * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
        m_hi = tl.load(mn_ptr + g_hi * stride_mn + rn, mask=n_mask, other=0.0).to(tl.float32)
        # x_lo, x_hi: [BLOCK_M, BLOCK_K]; columns >= K (the padding rows of W) read as 0
        x_lo = tl.load(x_rows + j[None, :], mask=m_mask[:, None] & (j < K)[None, :], other=0.0)
        x_hi = tl.load(x_rows + (HALF + j)[None, :], mask=m_mask[:, None] & (HALF + j < K)[None, :], other=0.0)
        w_lo = (packed & 0xF).to(tl.float32) * s_lo[None, :] + m_lo[None, :]  # rows k = j
        w_hi = (packed >> 4).to(tl.float32) * s_hi[None, :] + m_hi[None, :]   # rows k = HALF + j
        if DOT_F32:
            w_lo = cast_rtne(w_lo, x_dtype, INTERPRET).to(tl.float32)
            w_hi = cast_rtne(w_hi, x_dtype, INTERPRET).to(tl.float32)
            x_lo = x_lo.to(tl.float32)
            x_hi = x_hi.to(tl.float32)
        else:
            w_lo = w_lo.to(x_dtype)
            w_hi = w_hi.to(x_dtype)
        acc += tl.dot(x_lo, w_lo, input_precision=DOT_PRECISION)
        acc += tl.dot(x_hi, w_hi, input_precision=DOT_PRECISION)

    finish(acc, part_ptr, lock_ptr, out_ptr, rm, rn, m_mask[:, None] & n_mask[None, :],
           pid_m * tl.num_programs(1) + pid_n, pid_k, M, N, stride_om, SPLITS, SPLIT, BLOCK_M, BLOCK_N, INTERPRET)


@triton.jit
def _w4_dot_class(acc, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask,
                  B: tl.constexpr, X_DTYPE: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """acc [BLOCK_M, BLOCK_C] += x @ W for columns 4c + B (byte B of each word; the low nibble
    holds k = j, the high one k = HALF + j), W dequantized by one FMA a weight (int_words.py)."""
    cols = 4 * rc + B
    s_lo = tl.load(s_ptr + g_lo * stride_s + cols, mask=c_mask, other=0.0).to(tl.float32) * 16.0
    c_lo = tl.load(mn_ptr + g_lo * stride_mn + cols, mask=c_mask, other=0.0).to(tl.float32) - s_lo
    s_hi = tl.load(s_ptr + g_hi * stride_s + cols, mask=c_mask, other=0.0).to(tl.float32) * 16.0
    c_hi = tl.load(mn_ptr + g_hi * stride_mn + cols, mask=c_mask, other=0.0).to(tl.float32) - s_hi
    w_lo = unit_code(words, 8 * B, 4) * s_lo[None, :] + c_lo[None, :]
    w_hi = unit_code(words, 8 * B + 4, 4) * s_hi[None, :] + c_hi[None, :]
    if DOT_F32:
        w_lo = cast_rtne(w_lo, X_DTYPE, INTERPRET).to(tl.float32)
        w_hi = cast_rtne(w_hi, X_DTYPE, INTERPRET).to(tl.float32)
    else:
        w_lo = w_lo.to(X_DTYPE)
        w_hi = w_hi.to(X_DTYPE)
    acc += tl.dot(x_lo, w_lo, input_precision=DOT_PRECISION)
    return acc + tl.dot(x_hi, w_hi, input_precision=DOT_PRECISION)


@triton.jit
def _w4a16_words_kernel(
    x_ptr, q_ptr, s_ptr, mn_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, HALF, NW, ROWS_PER_SPLIT, SPLITS,
    stride_xm, stride_q, stride_s, stride_mn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    """_w4a16_kernel over int32 words (q_ptr: qweight viewed as int32 [Kp/2, N/4]): a program
    owns 4 * BLOCK_C columns as four dots of BLOCK_C columns, one per byte position."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = rm < M
    c_mask = rc < NW
    x_dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    j_start = pid_k * ROWS_PER_SPLIT
    j_end = tl.minimum(j_start + ROWS_PER_SPLIT, HALF)
    acc0 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        words = tl.load(q_ptr + j.to(tl.int64)[:, None] * stride_q + rc[None, :], mask=c_mask[None, :], other=0)
        g_lo = j0 // GROUP
        g_hi = (HALF + j0) // GROUP
        x_lo = tl.load(x_rows + j[None, :], mask=m_mask[:, None] & (j < K)[None, :], other=0.0)
        x_hi = tl.load(x_rows + (HALF + j)[None, :], mask=m_mask[:, None] & (HALF + j < K)[None, :], other=0.0)
        if DOT_F32:
            x_lo = x_lo.to(tl.float32)
            x_hi = x_hi.to(tl.float32)
        acc0 = _w4_dot_class(acc0, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask,
                             0, x_dtype, DOT_F32, DOT_PRECISION, INTERPRET)
        acc1 = _w4_dot_class(acc1, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask,
                             1, x_dtype, DOT_F32, DOT_PRECISION, INTERPRET)
        acc2 = _w4_dot_class(acc2, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask,
                             2, x_dtype, DOT_F32, DOT_PRECISION, INTERPRET)
        acc3 = _w4_dot_class(acc3, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask,
                             3, x_dtype, DOT_F32, DOT_PRECISION, INTERPRET)
    finish_words(acc0, acc1, acc2, acc3, part_ptr, lock_ptr, out_ptr, rm, rc, m_mask[:, None] & c_mask[None, :],
                 pid_m * tl.num_programs(1) + pid_n, pid_k, M, N, stride_om, SPLITS, SPLIT, BLOCK_M, BLOCK_C,
                 INTERPRET)


def _check_args(x, qweight, scales, mins, group_size) -> tuple[int, int, int]:
    """Returns (M, N, K) after checking the Int4Weight layout against x."""
    check_tensor("x", x, "[M, K]", 2)
    device = x.device
    check_tensor("qweight", qweight, "[Kp/2, N]", 2, (torch.uint8,), device=device)
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
        raise ValueError(f"group_size must be a positive multiple of 16 (tl.dot tiles), got {group_size!r}")
    m, k = x.shape
    half, n = qweight.shape
    kp = 2 * half
    if kp % (2 * group_size):
        raise ValueError(f"qweight has {half} rows, so Kp={kp}, which is not a multiple of 2*group_size="
                         f"{2 * group_size}: not the Int4Weight layout for this group_size")
    if not kp - 2 * group_size < k <= kp:
        raise ValueError(f"x has K={k} columns, but qweight's {half} byte rows hold Kp={kp} (K rounded up to a "
                         f"multiple of 2*group_size={2 * group_size}): expected {kp - 2 * group_size} < K <= {kp}")
    for name, t in (("scales", scales), ("mins", mins)):
        check_tensor(name, t, "[Kp/G, N]", 2, (torch.float16,), device=device)
        check_size(name, "rows", t.shape[0], kp // group_size, f"Kp={kp} / group_size={group_size}")
        check_size(name, "N", t.shape[1], n, "qweight's columns")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("mins", mins)):
        check_last_dim_contiguous(name, t)
    return m, n, k


def w4a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """x: [M, K] (float16 / bfloat16 / float32) @ the INT4 weight → [M, N] in x's dtype.

    qweight uint8 [Kp/2, N], scales / mins float16 [Kp/G, N] (Int4Weight's tensors); K may
    be less than Kp. `config` overrides `pick_config("w4a16", ...)` (tests force split-K).
    """
    m, n, k = _check_args(x, qweight, scales, mins, group_size)
    half = qweight.shape[0]
    if config is None:
        config = pick_config("w4a16", m, n, k, group_size)
    check_config(config, group_size, grouped=True)
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    splits, rows_per_split = split_plan(half, config.block_k, config.split_k)
    split = splits > 1
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
    part, locks = split_buffers("w4a16_gemm", x, m, n, splits, grid[0] * grid[1])
    words = as_words(qweight) if config.words else None
    if words is not None:
        _w4a16_words_kernel[grid](
            x, words, scales, mins, out, part, locks, m, n, k, half, n // 4, rows_per_split, splits,
            x.stride(0), words.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
            GROUP=group_size, BLOCK_M=config.block_m, BLOCK_C=config.block_n // 4, BLOCK_K=config.block_k,
            SPLIT=split, DOT_F32=dot_in_fp32(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
            INTERPRET=interpreting(), num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        _w4a16_kernel[grid](
            x, qweight, scales, mins, out, part, locks,
            m, n, k, half, rows_per_split, splits,
            x.stride(0), qweight.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
            GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT=split, DOT_F32=dot_in_fp32(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
            INTERPRET=interpreting(), num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out
