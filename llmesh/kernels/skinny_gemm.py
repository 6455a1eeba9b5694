"""Skinny dense GEMM: y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for decode-sized M.

W is in nn.Linear's layout ([N, K], K contiguous) and x, W, y share one 16-bit dtype; the
products accumulate in float32 and round once, like F.linear. At M <= 16 the GEMM only
streams W, so the kernel is shaped around reading W at full memory bandwidth:

- A program owns BLOCK_N rows of W (outputs) for BLOCK_M rows of x and walks its K range in
  [BLOCK_N, BLOCK_K] tiles. Rows are K-contiguous, so each thread's loads are 16-byte vectors
  and a warp's are coalesced; W is loaded with evict_first (read once), x with evict_last
  (every program reads it). Rows past N / M are read from a valid row (index modulo N / M)
  and never stored, so loads need no row predicate.
- Two inner products, chosen per config: `dot` feeds 16-row tiles to tl.dot (the tensor
  cores; Triton's pipeliner keeps num_stages tiles in flight), the FMA form multiplies
  element-wise into a float32 [BLOCK_M, BLOCK_N, BLOCK_K] accumulator and sums over K once
  at the end (no per-step cross-thread reduction), which suits M = 1 where a 16-row dot
  wastes 15/16 of its work and registers.
- Split-K: when N / BLOCK_N programs cannot fill the GPU, `split_k` programs share an output
  tile, each writing a float32 partial to a [SPLIT, M, N] workspace; the last of a tile's
  splits to arrive (split_k.py's arrival counters) sums the partials in split order, adds the
  bias and rounds, in the same launch (a second reduce kernel did, until session 44: a launch
  per split GEMM, Qwen3-30B-A3B's q/k/v projection at batch 1 each layer). The sum's order is
  the split order whichever split finished last, so results are identical run to run (greedy
  decoding reproduces), and nothing syncs with the host: the workspace comes from the caching
  allocator, which hands out graph-private memory during CUDA-graph capture, and the counters
  are one fixed buffer the last arrival resets.

Which config, and whether to use this kernel at all rather than cuBLAS, is decided per
device and shape by measurement (skinny_gemm_config.TUNED, filled by bench/gemm_sweep.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (check_last_dim_contiguous, check_out, check_size, check_tensor, interpreting,
                                   pdl_late, pdl_launch)
from llmesh.kernels.skinny_gemm_config import SkinnyConfig, check_config, default_config, split_plan
from llmesh.kernels.split_k import finish, split_buffers
from llmesh.kernels.triton_helpers import pdl_release, pdl_wait

DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _tile_sum(acc, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
    """A program's accumulator reduced to its [BM, BN] tile of y (float32)."""
    if DOT:
        return acc
    elif BLOCK_M == 1:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return tl.sum(acc, axis=2)


@triton.jit
def _store_tile(acc, rm, rn, m_mask, n_mask, pid_k, M, N, bias_ptr, out_ptr, part_ptr, lock_ptr, stride_om,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, SPLIT: tl.constexpr,
                HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """A program's tile of y: the accumulator reduced, then split_k.finish (the output with the
    bias added and rounded once, or with SPLIT this split's partial, the tile's last split summing
    them all in split order). Shared with the fused kernels so their epilogue, and with it every
    bit of y, is this one. The tile is program_id(0), the splits the grid's second axis."""
    finish(_tile_sum(acc, BLOCK_M, DOT), part_ptr, lock_ptr, out_ptr, rm, rn, m_mask[:, None] & n_mask[None, :],
           tl.program_id(0), pid_k, M, N, stride_om, tl.num_programs(1), SPLIT, BLOCK_M, BLOCK_N, INTERPRET,
           bias_ptr, HAS_BIAS)


@triton.jit
def _program_tile(M, N, K, K_PER_SPLIT, NUM_M_BLOCKS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows of x and of W and its K range: (pid_m, pid_n, pid_k, rm, rn, m_mask,
    n_mask, k_lo, k_hi). The M blocks of one N tile are neighbours in the launch order, so when
    x has more rows than BLOCK_M the programs re-reading that W tile run together and find it
    in L2."""
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_BLOCKS
    pid_n = pid // NUM_M_BLOCKS
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * K_PER_SPLIT
    return pid_m, pid_n, pid_k, rm, rn, rm < M, rn < N, k_lo, tl.minimum(k_lo + K_PER_SPLIT, K)


@triton.jit
def _skinny_acc(x_ptr, w_ptr, rm, rn, pid_m, M, N, K, k_lo, k_hi, stride_xm, stride_wn,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                EVEN_K: tl.constexpr, DOT_F32: tl.constexpr):
    """The GEMV loop: rows rn of W (any N rows, in any order) times rows rm of x over
    K[k_lo:k_hi], as the float32 accumulator _tile_sum reduces. Each row's products and their
    order depend only on the config, not on which rows share the program, so a kernel that
    groups W's rows differently gets the same bits per row."""
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :]  # [BN, BK]
    if BLOCK_M == 1:
        x_ptrs = x_ptr + pid_m.to(tl.int64) * stride_xm + k_lo + rk  # [BK]
    else:
        x_ptrs = x_ptr + (rm % M).to(tl.int64)[:, None] * stride_xm + (k_lo + rk)[None, :]  # [BM, BK]

    if DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    elif BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, eviction_policy="evict_last")
        else:
            k_ok = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
            if BLOCK_M == 1:
                x = tl.load(x_ptrs, mask=k_ok, other=0.0, eviction_policy="evict_last")
            else:
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0, eviction_policy="evict_last")
        if DOT:
            if DOT_F32:  # the interpreter multiplies bfloat16 bit patterns (common.dot_in_fp32)
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(x, tl.trans(w))
        elif BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    return acc


# M is not specialized (Triton would compile apart M = 1 and M % 16 == 0): one binary serves
# every batch size of a bucket, so capturing decode graphs per batch size compiles nothing new.
@triton.jit(do_not_specialize=["M", "NUM_M_BLOCKS"])
def _skinny_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, K_PER_SPLIT, NUM_M_BLOCKS,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    DOT_F32: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr, LATE: tl.constexpr,
):
    pdl_wait(PDL, LATE)
    pid_m, pid_n, pid_k, rm, rn, m_mask, n_mask, k_lo, k_hi = _program_tile(M, N, K, K_PER_SPLIT, NUM_M_BLOCKS,
                                                                             BLOCK_M, BLOCK_N)
    acc = _skinny_acc(x_ptr, w_ptr, rm, rn, pid_m, M, N, K, k_lo, k_hi, stride_xm, stride_wn,
                      BLOCK_M, BLOCK_N, BLOCK_K, DOT, EVEN_K, DOT_F32)
    pdl_release(PDL, LATE)
    _store_tile(acc, rm, rn, m_mask, n_mask, pid_k, M, N, bias_ptr, out_ptr, part_ptr, lock_ptr, stride_om,
                BLOCK_M, BLOCK_N, DOT, SPLIT, HAS_BIAS, INTERPRET)


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(M, N, K) after checking x [M, K], weight [N, K] and bias [N]."""
    check_tensor("x", x, "[M, K]", 2, DTYPES)
    check_tensor("weight", weight, "[N, K]", 2, (x.dtype,), device=x.device)
    m, k = x.shape
    n = weight.shape[0]
    check_size("weight", "K", weight.shape[1], k, "x's columns")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    if bias is not None:
        check_tensor("bias", bias, "[N]", 1, (torch.float16, torch.bfloat16, torch.float32), device=x.device)
        check_size("bias", "N", bias.shape[0], n, "weight's rows")
        check_last_dim_contiguous("bias", bias)
    return m, n, k


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """x: [M, K] @ weight [N, K]^T (+ bias [N]) → [M, N] in x's dtype (float16 / bfloat16).

    Rows of x and out may be strided; their last dimension must be contiguous, as must the
    weight's rows. `config` overrides `default_config` (the engine passes the tuned one).
    """
    m, n, k = _check_args(x, weight, bias)
    config = config or default_config(m, n, k)
    check_config(config)
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.expand(m, n)) if bias is not None else out.zero_()
    splits, k_per_split = split_plan(k, config.block_k, config.split_k)
    num_m_blocks = triton.cdiv(m, config.block_m)
    tiles = num_m_blocks * triton.cdiv(n, config.block_n)
    part, lock = split_buffers("skinny_gemm", x, m, n, splits, tiles)
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    interpret = interpreting()
    pdl = pdl_launch(x.device)
    _skinny_kernel[(tiles, splits)](
        x, weight, bias_arg, out, part, lock,
        m, n, k, k_per_split, num_m_blocks,
        x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT=config.dot, SPLIT=splits > 1, HAS_BIAS=bias is not None, EVEN_K=k % config.block_k == 0,
        DOT_F32=interpret, INTERPRET=interpret,
        LATE=pdl_late(), num_warps=config.num_warps, num_stages=config.num_stages, **pdl,
    )
    return out



def skinny_gemm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with float32 accumulation, the bias added in float32, rounded once to x's dtype."""
    y = x.float() @ weight.float().t()  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
