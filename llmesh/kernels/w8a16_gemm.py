"""W8A16 GEMM: y[M, N] = x[M, K] @ W[K, N] with W stored as int8 codes (Int8Weight's layout).

Layout (services/engine/quant/packed.py): qweight int8 [K, N], scales float16 / float32
[K/G, N] with w = q * scale. G = K is per-channel INT8 (one scale row); G = 32 is GGUF Q8_0.

A program owns a [BLOCK_M, BLOCK_N] output tile and a contiguous range of K (split-K), and
loads [BLOCK_K, BLOCK_N] int8 tiles. Per-channel weights feed the codes to tl.dot as they
are (int8 values are exact in 16-bit floats) and multiply the float32 accumulator by the
scale row once at the end: one multiply per output instead of one per weight. Grouped
weights are dequantized per tile in float32 (BLOCK_K divides G, so a tile uses one scale
row) and rounded to x's dtype, as the torch reference does. Split-K partials are float32,
summed in split order by the last split of a tile to finish (split_k.py: deterministic, one
launch); no host synchronisation, so the wrapper is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    check_last_dim_contiguous, check_out, check_size, check_tensor, dot_in_fp32, dot_precision, interpreting)
from llmesh.kernels.quant_gemm_config import (FACTORED_MAX_BLOCK_M, GemmConfig, check_config, pick_config,
                                              split_plan)
from llmesh.kernels.quant_ref import dequantize_int8_ref, w8a16_gemm_ref  # noqa: F401 (the kernel's references)
from llmesh.kernels.split_k import finish, split_buffers
from llmesh.kernels.triton_helpers import cast_rtne


@triton.jit
def _w8a16_kernel(
    x_ptr, q_ptr, s_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, ROWS_PER_SPLIT, SPLITS,
    stride_xm, stride_q, stride_s, stride_om,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    FACTORED: tl.constexpr,
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
    k_start = pid_k * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, K)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K  # per-channel K need not be a multiple of BLOCK_K
        # q: [BLOCK_K, BLOCK_N]; x: [BLOCK_M, BLOCK_K]
        q = tl.load(q_ptr + k.to(tl.int64)[:, None] * stride_q + rn[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0)
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
        if PER_CHANNEL or FACTORED:
            # Codes -127..127 are exact in any float type: multiply them as they are and apply
            # the scale to the product (per channel: once at the end; per group: per tile),
            # not to every weight, which at decode sizes costs more ALU time than the loads.
            t = tl.dot(x, q.to(tl.float32) if DOT_F32 else q.to(x_dtype), input_precision=DOT_PRECISION)
            if PER_CHANNEL:
                acc += t
            else:
                s = tl.load(s_ptr + (k0 // GROUP) * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
                acc += t * s[None, :]
        else:
            s = tl.load(s_ptr + (k0 // GROUP) * stride_s + rn, mask=n_mask, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * s[None, :]
            if DOT_F32:
                w = cast_rtne(w, x_dtype, INTERPRET).to(tl.float32)
            else:
                w = w.to(x_dtype)
            acc += tl.dot(x, w, input_precision=DOT_PRECISION)

    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    finish(acc, part_ptr, lock_ptr, out_ptr, rm, rn, m_mask[:, None] & n_mask[None, :],
           pid_m * tl.num_programs(1) + pid_n, pid_k, M, N, stride_om, SPLITS, SPLIT, BLOCK_M, BLOCK_N, INTERPRET)


def _check_args(x, qweight, scales, group_size) -> tuple[int, int, int]:
    """Returns (M, N, K) after checking the Int8Weight layout against x."""
    check_tensor("x", x, "[M, K]", 2)
    device = x.device
    check_tensor("qweight", qweight, "[K, N]", 2, (torch.int8,), device=device)
    m, k = x.shape
    n = qweight.shape[1]
    check_size("qweight", "rows", qweight.shape[0], k, "x's columns (K)")
    if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
        raise ValueError(f"group_size must be a positive divisor of K={k} (K for per-channel scales), "
                         f"got {group_size!r}")
    if group_size != k and group_size % 16:
        raise ValueError(f"a grouped group_size must be a multiple of 16 (tl.dot tiles), got {group_size}")
    check_tensor("scales", scales, "[K/G, N]", 2, (torch.float16, torch.float32), device=device)
    check_size("scales", "rows", scales.shape[0], k // group_size, f"K={k} / group_size={group_size}")
    check_size("scales", "N", scales.shape[1], n, "qweight's columns")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales)):
        check_last_dim_contiguous(name, t)
    return m, n, k


def w8a16_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """x: [M, K] (float16 / bfloat16 / float32) @ the INT8 weight → [M, N] in x's dtype.

    qweight int8 [K, N], scales float16 / float32 [K/G, N] (Int8Weight's tensors; G = K for
    per-channel). `config` overrides `pick_config("w8a16", ...)` (tests force split-K).
    """
    m, n, k = _check_args(x, qweight, scales, group_size)
    per_channel = group_size == k
    if config is None:
        config = pick_config("w8a16", m, n, k, group_size)
    check_config(config, group_size, grouped=not per_channel)
    if config.words:
        raise ValueError("config.words is for w4a16_gemm; the INT8 word path is quant_gemv's (M <= 16)")
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return out
    splits, rows_per_split = split_plan(k, config.block_k, config.split_k)
    split = splits > 1
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
    part, locks = split_buffers("w8a16_gemm", x, m, n, splits, grid[0] * grid[1])
    _w8a16_kernel[grid](
        x, qweight, scales, out, part, locks,
        m, n, k, rows_per_split, splits,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP=1 if per_channel else group_size, PER_CHANNEL=per_channel,  # no recompile per K
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT=split, DOT_F32=dot_in_fp32(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
        INTERPRET=interpreting(), FACTORED=config.block_m <= FACTORED_MAX_BLOCK_M,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
