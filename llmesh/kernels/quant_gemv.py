"""Decode-size (M <= 16) W4A16 / W8A16 GEMV with split-K and an in-kernel reduction.

At decode sizes the weight-only GEMMs are pure weight streaming: y[M, N] = x[M, K] @ W[K, N]
reads W once for a handful of rows. The tl.dot kernels (w4a16_gemm.py, w8a16_gemm.py) pad
M to a 16-row tile and, when they split K, sum the float32 partials with two more kernels
(torch's sum and the cast), which at ~15 us per GEMM is a large share. This kernel:

- has no tl.dot: a program owns all M rows (BLOCK_M = M rounded up to a power of two, so
  nothing is padded to 16) and BLOCK_N output columns, and accumulates x * w products in a
  [BLOCK_M, BLOCK_K, BLOCK_N] float32 register tile that is reduced over K once at the end
  (no cross-thread reduction per step);
- splits K across SPLIT programs per column tile, and the last of them to finish sums the
  partials in split order and writes y (split_k.py: one launch, deterministic, CUDA-graph safe);
- reads the packed layouts as stored (packed.py): Int4Weight's byte rows hold k = j (low
  nibble) and k = Kp/2 + j (high nibble), N contiguous, so a [BLOCK_K, BLOCK_N] byte tile is
  BLOCK_K coalesced rows and each group's scale/min row is read once per tile; INT8 [K, N]
  likewise, a per-channel scale applied once after the reduction;
- with ``GemvConfig.words`` reads those bytes as int32 words instead (four adjacent columns
  a word, one accumulator per byte position) and turns codes into floats by moving them into
  a float's mantissa (int_words.py) rather than with int-to-float instructions, which on
  Hopper issue at an eighth of the FP32 rate. Which of the two runs is measured per shape
  (on the H200 at M = 1 the tl.dot kernels beat both GEMVs: docs/quantization.md).

Numerics: W is dequantized in float32 (q * s + m) and multiplied in float32 without rounding
W to x's dtype first, so in 16-bit it is slightly closer to the exact product than the torch
reference (which rounds W to x's dtype); tests allow an ulp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import check_out, interpreting, next_power_of_2
from llmesh.kernels.int_words import SIGN_FLIP_BYTES, as_words, unit_code
from llmesh.kernels.split_k import finish, finish_words, split_buffers

MAX_M = 16
"""Rows up to which the GEMV runs (the register tile grows with M)."""

@dataclass(frozen=True)
class GemvConfig:
    """block_n: output columns per program; block_k: stored weight rows per step (byte rows for
    INT4, dividing the group size); split_k: programs sharing one column tile's K range;
    words: read the codes as int32 words and convert them by bit moves (int_words.py) instead
    of byte loads and int-to-float conversions (needs N % 4 == 0; bytes otherwise)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    words: bool = False

    def short(self) -> str:
        return (f"gemv{'-words' if self.words else ''} n{self.block_n} k{self.block_k} s{self.split_k} "
                f"w{self.num_warps} st{self.num_stages}")


def default_gemv_config(kind: str, k_rows: int, group_size: int) -> GemvConfig:
    """A config that runs anywhere (tests, the interpreter); the engine uses measured ones."""
    if interpreting():
        return GemvConfig(16, min(32, group_size & -group_size), 1, 1, 1)
    return GemvConfig(64, min(64, group_size & -group_size), 4, 4, 3)


def check_gemv_config(config: GemvConfig, group_size: int, grouped: bool) -> None:
    if not isinstance(config, GemvConfig):
        raise ValueError(f"config must be a GemvConfig, got {type(config).__name__}")
    for name in ("block_n", "block_k", "num_warps"):
        v = getattr(config, name)
        if not isinstance(v, int) or v <= 0 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two, got {v!r}")
    if grouped and group_size % config.block_k:
        raise ValueError(f"config.block_k={config.block_k} must divide group_size={group_size}")
    if not isinstance(config.split_k, int) or config.split_k < 1 or config.num_stages < 1:
        raise ValueError(f"config.split_k and num_stages must be ints >= 1, got {config.short()}")
    if config.words and config.block_n < 4:
        raise ValueError(f"config.block_n must be >= 4 with words (four columns a word), got {config.block_n}")


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, mn_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, HALF, ROWS_PER_SPLIT,
    stride_xm, stride_q, stride_s, stride_mn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm              # [BLOCK_M, 1]
    j_start = pid_k * ROWS_PER_SPLIT
    j_end = tl.minimum(j_start + ROWS_PER_SPLIT, HALF)
    acc3 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_N], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        # [BLOCK_K, BLOCK_N] bytes; HALF is a multiple of BLOCK_K, so no row mask
        packed = tl.load(q_ptr + j.to(tl.int64)[:, None] * stride_q + rn[None, :], mask=n_mask[None, :], other=0)
        g_lo = j0 // GROUP
        g_hi = (HALF + j0) // GROUP
        s_lo = tl.load(s_ptr + g_lo * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
        m_lo = tl.load(mn_ptr + g_lo * stride_mn + rn, mask=n_mask, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + g_hi * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
        m_hi = tl.load(mn_ptr + g_hi * stride_mn + rn, mask=n_mask, other=0.0).to(tl.float32)
        # [BLOCK_M, BLOCK_K]; columns >= K (W's padding rows) read as 0
        x_lo = tl.load(x_rows + j[None, :], mask=m_mask[:, None] & (j < K)[None, :], other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows + (HALF + j)[None, :], mask=m_mask[:, None] & (HALF + j < K)[None, :],
                       other=0.0).to(tl.float32)
        w_lo = (packed & 0xF).to(tl.float32) * s_lo[None, :] + m_lo[None, :]  # rows k = j
        w_hi = (packed >> 4).to(tl.float32) * s_hi[None, :] + m_hi[None, :]   # rows k = HALF + j
        acc3 += x_lo[:, :, None] * w_lo[None, :, :] + x_hi[:, :, None] * w_hi[None, :, :]
    acc = tl.sum(acc3, axis=1)                                          # [BLOCK_M, BLOCK_N]
    finish(acc, part_ptr, lock_ptr, out_ptr, rm, rn, m_mask[:, None] & n_mask[None, :], pid_n, pid_k, M, N,
           stride_om, SPLIT, SPLIT > 1, BLOCK_M, BLOCK_N, INTERPRET)


@triton.jit
def _w8a16_gemv_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, ROWS_PER_SPLIT,
    stride_xm, stride_q, stride_s, stride_om,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, K)
    acc3 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        q = tl.load(q_ptr + k.to(tl.int64)[:, None] * stride_q + rn[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0).to(tl.float32)   # [BLOCK_K, BLOCK_N]
        if not PER_CHANNEL:
            s = tl.load(s_ptr + (k0 // GROUP) * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
            q = q * s[None, :]
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc3 += x[:, :, None] * q[None, :, :]
    acc = tl.sum(acc3, axis=1)
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    finish(acc, part_ptr, lock_ptr, out_ptr, rm, rn, m_mask[:, None] & n_mask[None, :], pid_n, pid_k, M, N,
           stride_om, SPLIT, SPLIT > 1, BLOCK_M, BLOCK_N, INTERPRET)


@triton.jit
def _w4_word_class(acc, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask,
                   B: tl.constexpr):
    """acc [BLOCK_M, BLOCK_K, BLOCK_C] += the products of byte B of each word (columns 4c + B):
    its low nibble holds k = j, its high nibble k = HALF + j (Int4Weight's layout)."""
    cols = 4 * rc + B
    s_lo = tl.load(s_ptr + g_lo * stride_s + cols, mask=c_mask, other=0.0).to(tl.float32) * 16.0
    c_lo = tl.load(mn_ptr + g_lo * stride_mn + cols, mask=c_mask, other=0.0).to(tl.float32) - s_lo
    s_hi = tl.load(s_ptr + g_hi * stride_s + cols, mask=c_mask, other=0.0).to(tl.float32) * 16.0
    c_hi = tl.load(mn_ptr + g_hi * stride_mn + cols, mask=c_mask, other=0.0).to(tl.float32) - s_hi
    w_lo = unit_code(words, 8 * B, 4) * s_lo[None, :] + c_lo[None, :]      # q * s + m, one FMA
    w_hi = unit_code(words, 8 * B + 4, 4) * s_hi[None, :] + c_hi[None, :]
    return acc + x_lo[:, :, None] * w_lo[None, :, :] + x_hi[:, :, None] * w_hi[None, :, :]


@triton.jit
def _w4a16_gemv_words_kernel(
    x_ptr, q_ptr, s_ptr, mn_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, HALF, NW, ROWS_PER_SPLIT,
    stride_xm, stride_q, stride_s, stride_mn, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The INT4 GEMV over int32 words (q_ptr: qweight viewed as int32 [Kp/2, N/4]); a program
    owns 4 * BLOCK_C columns, one accumulator per byte position of the word."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = rm < M
    c_mask = rc < NW
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    j_start = pid_k * ROWS_PER_SPLIT
    j_end = tl.minimum(j_start + ROWS_PER_SPLIT, HALF)
    acc0 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        words = tl.load(q_ptr + j.to(tl.int64)[:, None] * stride_q + rc[None, :], mask=c_mask[None, :], other=0)
        g_lo = j0 // GROUP
        g_hi = (HALF + j0) // GROUP
        x_lo = tl.load(x_rows + j[None, :], mask=m_mask[:, None] & (j < K)[None, :], other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows + (HALF + j)[None, :], mask=m_mask[:, None] & (HALF + j < K)[None, :],
                       other=0.0).to(tl.float32)
        acc0 = _w4_word_class(acc0, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask, 0)
        acc1 = _w4_word_class(acc1, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask, 1)
        acc2 = _w4_word_class(acc2, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask, 2)
        acc3 = _w4_word_class(acc3, words, x_lo, x_hi, s_ptr, mn_ptr, g_lo, g_hi, stride_s, stride_mn, rc, c_mask, 3)
    finish_words(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1),
                 part_ptr, lock_ptr, out_ptr, rm, rc, m_mask[:, None] & c_mask[None, :], pid_n, pid_k, M, N,
                 stride_om, SPLIT, SPLIT > 1, BLOCK_M, BLOCK_C, INTERPRET)


@triton.jit
def _w8_word_class(acc, words, x, s_ptr, g, stride_s, rc, c_mask, B: tl.constexpr):
    """acc += the products of byte B of each word (columns 4c + B); words are sign-flipped, so
    f = 1 + (q + 128) / 256 and q * s = f * 256 s - 384 s. Per channel (GROUP = K) the scale
    row is row 0 throughout."""
    f = unit_code(words, 8 * B, 8)
    s = tl.load(s_ptr + g * stride_s + 4 * rc + B, mask=c_mask, other=0.0).to(tl.float32)
    w = f * (256.0 * s)[None, :] - (384.0 * s)[None, :]
    return acc + x[:, :, None] * w[None, :, :]


@triton.jit
def _w8a16_gemv_words_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, NW, ROWS_PER_SPLIT,
    stride_xm, stride_q, stride_s, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The INT8 GEMV over int32 words (q_ptr: qweight viewed as int32 [K, N/4]); scales are
    applied per weight, per channel too (one FMA either way)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rc = pid_n * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = rm < M
    c_mask = rc < NW
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    k_start = pid_k * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, K)
    acc0 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_C], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        words = tl.load(q_ptr + k.to(tl.int64)[:, None] * stride_q + rc[None, :],
                        mask=k_mask[:, None] & c_mask[None, :], other=0) ^ SIGN_FLIP_BYTES
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        g = k0 // GROUP
        acc0 = _w8_word_class(acc0, words, x, s_ptr, g, stride_s, rc, c_mask, 0)
        acc1 = _w8_word_class(acc1, words, x, s_ptr, g, stride_s, rc, c_mask, 1)
        acc2 = _w8_word_class(acc2, words, x, s_ptr, g, stride_s, rc, c_mask, 2)
        acc3 = _w8_word_class(acc3, words, x, s_ptr, g, stride_s, rc, c_mask, 3)
    finish_words(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1),
                 part_ptr, lock_ptr, out_ptr, rm, rc, m_mask[:, None] & c_mask[None, :], pid_n, pid_k, M, N,
                 stride_om, SPLIT, SPLIT > 1, BLOCK_M, BLOCK_C, INTERPRET)


def _split(rows: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits, rows per split): whole tiles per split, none empty."""
    iters = max(1, -(-rows // block_k))
    per = -(-iters // max(1, split_k))
    return -(-iters // per), per * block_k


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
               *, out: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ the Int4Weight → [M, N] in x's dtype (arguments as w4a16_gemm's)."""
    from llmesh.kernels.w4a16_gemm import _check_args

    m, n, k = _check_args(x, qweight, scales, mins, group_size)
    if m > MAX_M:
        raise ValueError(f"w4a16_gemv takes at most {MAX_M} rows, got {m}: use w4a16_gemm")
    half = qweight.shape[0]
    config = config or default_gemv_config("w4a16", half, group_size)
    check_gemv_config(config, group_size, grouped=True)
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    splits, rows = _split(half, config.block_k, config.split_k)
    part, locks = split_buffers("quant_gemv", x, m, n, splits, triton.cdiv(n, config.block_n))
    words = as_words(qweight) if config.words else None
    if words is not None:
        _w4a16_gemv_words_kernel[(triton.cdiv(n, config.block_n), splits)](
            x, words, scales, mins, out, part, locks, m, n, k, half, n // 4, rows,
            x.stride(0), words.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
            GROUP=group_size, BLOCK_M=max(1, next_power_of_2(m)), BLOCK_C=config.block_n // 4,
            BLOCK_K=config.block_k, SPLIT=splits, INTERPRET=interpreting(), num_warps=config.num_warps,
            num_stages=config.num_stages)
        return out
    _w4a16_gemv_kernel[(triton.cdiv(n, config.block_n), splits)](
        x, qweight, scales, mins, out, part, locks, m, n, k, half, rows,
        x.stride(0), qweight.stride(0), scales.stride(0), mins.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=max(1, next_power_of_2(m)), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT=splits, INTERPRET=interpreting(), num_warps=config.num_warps, num_stages=config.num_stages)
    return out


def w8a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, *,
               out: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ the Int8Weight → [M, N] in x's dtype (arguments as w8a16_gemm's)."""
    from llmesh.kernels.w8a16_gemm import _check_args

    m, n, k = _check_args(x, qweight, scales, group_size)
    if m > MAX_M:
        raise ValueError(f"w8a16_gemv takes at most {MAX_M} rows, got {m}: use w8a16_gemm")
    per_channel = group_size == k
    config = config or default_gemv_config("w8a16", k, group_size if not per_channel else 1 << 20)
    check_gemv_config(config, group_size, grouped=not per_channel)
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    splits, rows = _split(k, config.block_k, config.split_k)
    part, locks = split_buffers("quant_gemv", x, m, n, splits, triton.cdiv(n, config.block_n))
    words = as_words(qweight) if config.words else None
    if words is not None:
        _w8a16_gemv_words_kernel[(triton.cdiv(n, config.block_n), splits)](
            x, words, scales, out, part, locks, m, n, k, n // 4, rows,
            x.stride(0), words.stride(0), scales.stride(0), out.stride(0),
            GROUP=group_size, BLOCK_M=max(1, next_power_of_2(m)),
            BLOCK_C=config.block_n // 4, BLOCK_K=config.block_k, SPLIT=splits, INTERPRET=interpreting(),
            num_warps=config.num_warps, num_stages=config.num_stages)
        return out
    _w8a16_gemv_kernel[(triton.cdiv(n, config.block_n), splits)](
        x, qweight, scales, out, part, locks, m, n, k, rows,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, PER_CHANNEL=per_channel, BLOCK_M=max(1, next_power_of_2(m)), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT=splits, INTERPRET=interpreting(), num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out
