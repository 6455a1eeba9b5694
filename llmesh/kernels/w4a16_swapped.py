"""W4A16 at decode sizes with the weight as the dot's left operand: y^T = W^T x^T.

The other INT4 kernels (w4a16_gemm.py, quant_gemv.py) put x on the left of tl.dot and the
dequantized weight on the right. At M <= 64 that is an MMA of M rows (mma.sync, tiles padded to
16 rows) whose right operand, the weight, is the one produced in registers. Hopper's warp-group
MMA (wgmma) takes its left operand from registers and its right one from shared memory, and
needs 64 rows on the left: so here the weight tile is the left operand, [BLOCK_N output
columns, BLOCK_K], dequantized in registers and fed to wgmma without a trip through shared
memory, and x^T [BLOCK_K, BLOCK_M] (a few rows, padded to 16) is the small operand Triton
stages. An sm90 compile (llmesh/kernels/compile_check.py) shows it: `warp_group_dot` with the codes'
operand in `dot_op` registers and the code tiles copied by cp.async (bench/ttgir_audit.py case
`w4a16_swapped`). This is the part of Marlin's design Triton can express: no hand-placed
fragment layout, but no shared-memory staging of the widened weight either.

Layout: the Int4Weight codes transposed, uint8 [N, Kp / 2] (``swap_codes``): byte (n, j) holds
q[k = j, n] in its low nibble and q[k = Kp / 2 + j, n] in its high one (the halves layout, K
contiguous), so a [BLOCK_N, BLOCK_K] byte tile is BLOCK_N coalesced rows; scales and mins stay
float16 [Kp / G, N]. A weight served by this kernel keeps that second copy beside its own
(services/engine/quant/swapped_int4.py, made at load where the measured table picks it).

Per K step (BLOCK_K byte columns inside one group of each half): codes widened to exact small
integers in x's dtype (Marlin's exponent trick, two codes a 32-bit op: fused_moe_int4._nibbles),
then (q @ x^T) * s + z * colsum(x^T) per half, the scale and min of each output column applied
to the product (no per-weight arithmetic after the widening); the step's scale and min rows are
loaded a step ahead (Triton does not pipeline rows that feed arithmetic: docs/moe.md). K splits
across programs finish in the kernel (split_k.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (check_last_dim_contiguous, check_out, check_size, check_tensor, dot_in_fp32,
                                   dot_precision, interpreting)
from llmesh.kernels.fused_moe_int4 import _nibbles
from llmesh.kernels.quant_gemm_config import GemmConfig, split_plan
from llmesh.kernels.split_k import finish, split_buffers

MAX_M = 64
"""Rows up to which the kernel runs (x^T's tile is at most 64 wide)."""


def config_str(config: GemmConfig) -> str:
    """A tile config as the dispatch table stores this kernel's: "m,n,k,split,warps,stages"
    (block_m: x rows a program, 16-64, the right operand's width; block_n: output columns, the
    wgmma's left operand of 64 or 128 rows; block_k: code bytes a K step, each covering two input
    rows, dividing the group; split_k: programs sharing a column tile's K range)."""
    return ",".join(str(v) for v in (config.block_m, config.block_n, config.block_k, config.split_k,
                                     config.num_warps, config.num_stages))


def parse_config(text: str) -> GemmConfig:
    """The inverse of ``config_str``."""
    fields = [int(v) for v in str(text).split(",")]
    if len(fields) != 6:
        raise ValueError(f"a swapped W4A16 config is six integers 'm,n,k,split,warps,stages', got {text!r}")
    return GemmConfig(*fields)


def default_config(m: int, n: int, half: int, group: int) -> GemmConfig:
    """A config for when no measured one is given: 16-row x tiles, 128 columns, a K step of 64
    bytes (or the group), K split until about two programs per SM of an H200."""
    block_m = max(16, min(MAX_M, triton.next_power_of_2(m)))
    block_k = min(64, group)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, 128)
    split = max(1, min(triton.cdiv(264, tiles), half // block_k // 2, 16))
    return GemmConfig(block_m, 128, block_k, split, 4, 4)


def swap_codes(qweight: torch.Tensor) -> torch.Tensor:
    """Int4Weight codes uint8 [Kp / 2, N] → the kernel's [N, Kp / 2] (same bytes, K contiguous)."""
    return qweight.t().contiguous()


@triton.jit
def _groups(s_cols, z_cols, n_mask, j0, HALF, stride_s, GROUP: tl.constexpr):
    """Scale and min rows of the two groups at byte column j0, as loaded (float16: converted where
    used, so the loads' values go straight to the next step); j0 past the end (the prefetch after
    the last step) reads the last groups again, unused."""
    g = tl.minimum(j0, HALF - 1) // GROUP
    lo = g * stride_s
    hi = (g + HALF // GROUP) * stride_s
    return (tl.load(s_cols + lo, mask=n_mask, other=0.0), tl.load(z_cols + lo, mask=n_mask, other=0.0),
            tl.load(s_cols + hi, mask=n_mask, other=0.0), tl.load(z_cols + hi, mask=n_mask, other=0.0))


@triton.jit
def _w4a16_swapped_kernel(
    x_ptr, q_ptr, s_ptr, mn_ptr, out_ptr, part_ptr, lock_ptr,
    M, N, K, HALF, ROWS_PER_SPLIT, SPLITS,
    stride_xm, stride_qn, stride_s, stride_om,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm  # x^T: [1, BLOCK_M]
    q_rows = q_ptr + rn.to(tl.int64)[:, None] * stride_qn  # [BLOCK_N, 1]
    s_cols = s_ptr + rn
    z_cols = mn_ptr + rn
    j_start = pid_k * ROWS_PER_SPLIT
    j_end = tl.minimum(j_start + ROWS_PER_SPLIT, HALF)
    w_dtype = x_ptr.dtype.element_ty
    if DOT_F32:
        w_dtype = tl.float32
    s_lo, z_lo, s_hi, z_hi = _groups(s_cols, z_cols, n_mask, j_start, HALF, stride_s, GROUP)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_K):
        j = j0 + rk
        codes = tl.load(q_rows + j[None, :], mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K]
        q_lo, q_hi = _nibbles(codes, w_dtype, DOT_F32, INTERPRET)
        x_lo = tl.load(x_cols + j[:, None], mask=(j < K)[:, None] & m_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_M]
        x_hi = tl.load(x_cols + (HALF + j)[:, None], mask=(HALF + j < K)[:, None] & m_mask[None, :], other=0.0)
        if DOT_F32:
            x_lo = x_lo.to(tl.float32)
            x_hi = x_hi.to(tl.float32)
        sum_lo = tl.sum(x_lo.to(tl.float32), axis=0)  # [BLOCK_M]
        sum_hi = tl.sum(x_hi.to(tl.float32), axis=0)
        d_lo = tl.dot(q_lo, x_lo, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        d_hi = tl.dot(q_hi, x_hi, input_precision=DOT_PRECISION)
        acc += d_lo * s_lo.to(tl.float32)[:, None] + z_lo.to(tl.float32)[:, None] * sum_lo[None, :]
        acc += d_hi * s_hi.to(tl.float32)[:, None] + z_hi.to(tl.float32)[:, None] * sum_hi[None, :]
        s_lo, z_lo, s_hi, z_hi = _groups(s_cols, z_cols, n_mask, j0 + BLOCK_K, HALF, stride_s, GROUP)
    finish(tl.trans(acc), part_ptr, lock_ptr, out_ptr, rm, rn, m_mask[:, None] & n_mask[None, :],
           pid_m * tl.num_programs(1) + pid_n, pid_k, M, N, stride_om, SPLITS, SPLIT, BLOCK_M, BLOCK_N, INTERPRET)


def w4a16_swapped(x: torch.Tensor, codes_t: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                  *, out: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W for W's codes in the swapped layout (``swap_codes``: uint8
    [N, Kp / 2]) with float16 scales and mins [Kp / G, N], w = q * s + m (Int4Weight's)."""
    check_tensor("x", x, "[M, K]", 2)
    check_tensor("codes_t", codes_t, "[N, Kp/2]", 2, (torch.uint8,), device=x.device)
    m, k = x.shape
    n, half = codes_t.shape
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 16:
        raise ValueError(f"group_size must be a positive multiple of 16 (tl.dot tiles), got {group_size!r}")
    if half % group_size or not 2 * half - 2 * group_size < k <= 2 * half:
        raise ValueError(f"codes_t holds Kp={2 * half} input rows; x has K={k}: expected Kp a multiple of "
                         f"2*group_size={2 * group_size} and {2 * half - 2 * group_size} < K <= {2 * half}")
    for name, t in (("scales", scales), ("mins", mins)):
        check_tensor(name, t, "[Kp/G, N]", 2, (torch.float16,), device=x.device)
        check_size(name, "shape", tuple(t.shape), (2 * half // group_size, n), f"[Kp/G, N] of Kp={2 * half}")
    for name, t in (("x", x), ("codes_t", codes_t), ("scales", scales), ("mins", mins)):
        check_last_dim_contiguous(name, t)
    if m > MAX_M:
        raise ValueError(f"w4a16_swapped serves up to {MAX_M} rows (decode sizes), got M={m}")
    config = config or default_config(m, n, half, group_size)
    if group_size % config.block_k or config.block_m > MAX_M or config.words:
        raise ValueError(f"config {config}: block_k must divide group_size={group_size}, block_m <= {MAX_M}, "
                         f"no int32 words")
    out = check_out("out", out, (m, n), x.dtype, x.device)
    if m == 0:
        return out
    splits, rows_per_split = split_plan(half, config.block_k, config.split_k)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
    part, locks = split_buffers("w4a16_swapped", x, m, n, splits, grid[0] * grid[1])
    _w4a16_swapped_kernel[grid](
        x, codes_t, scales, mins, out, part, locks, m, n, k, half, rows_per_split, splits,
        x.stride(0), codes_t.stride(0), scales.stride(0), out.stride(0),
        GROUP=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT=splits > 1, DOT_F32=dot_in_fp32(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
        INTERPRET=interpreting(), num_warps=config.num_warps, num_stages=config.num_stages)
    return out
