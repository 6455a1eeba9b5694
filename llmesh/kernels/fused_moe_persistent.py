"""The fused MoE layer's down GEMM as a persistent kernel (``MoEConfig.persistent``).

fused_moe.py's grouped GEMM launches one program per (sorted block, column tile): at a 4k-token
prefill the down GEMM is ~4,800 programs of 12 K steps each (K = I = 768 at BLOCK_K 64), so every
program's pipeline fill and epilogue is a large share of its life. CUTLASS's grouped GEMMs run
a fixed grid of programs that walk the tiles instead, and with warp specialization the producer
warps load the next tile's operands while the consumers finish this one's epilogue. This kernel
is that form for the sorted hidden layout (``MoEConfig.a_tma``): ``persistent`` programs per SM,
each taking every PROGRAMS-th live tile in grouped order, the activation and weight tiles through
TMA descriptors, the tile loop warp-specialized with ``warp_spec`` (Triton 3.6 partitions such a
loop on sm90 at 4 warps: tests/kernels/test_hopper_compile.py).

Each tile is fused_moe.py's down tile, the same K loop (``_dense_mainloop``) and epilogue
(``_epilogue_rows``), so the output is the grouped kernel's bit for bit. Other ranks' blocks
(expert -1) run no K step and store zero rows, as the grouped kernel does. The top-k sum is the
separate ``moe_sum`` launch (an arrival per row inside a warp-specialized tile loop is untried).
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmesh.kernels.fused_moe_dense import _dense_mainloop
from llmesh.kernels.fused_moe_epilogue import _epilogue_rows
from llmesh.kernels.triton_helpers import grouped_tile, pdl_enter


# The pair count changes with every eager step's tokens: not specialised (fused_moe.py).
@triton.jit(do_not_specialize=["num_pairs"])
def _moe_down_persistent_kernel(
    a_desc, b_desc, scale_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    N, K, num_pairs, stride_se, stride_sg, stride_om,
    SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr, WARP_SPEC: tl.constexpr,
    SCALE_BN: tl.constexpr = 0, SCALE_BK: tl.constexpr = 0,
):
    """out[pair] = (hidden[sorted row] @ w2[expert]^T) * routing weight for every live tile:
    a_desc over the sorted hidden rows (block [BLOCK_M, BLOCK_K]), b_desc over the experts' rows
    stacked [E * N, K] (block [BLOCK_N, BLOCK_K]); scales as in fused_moe._moe_gemm_kernel."""
    pdl_enter(PDL)
    num_n = tl.cdiv(N, BLOCK_N)
    num_m = tl.cdiv(tl.load(num_post_ptr), BLOCK_M)  # live blocks only: the padded tail is never visited
    for tile in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, warp_specialize=WARP_SPEC):
        if GROUP_M > 0:
            pid_m, pid_n = grouped_tile(tile, num_m * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
        else:  # the grouped kernel's 2-D grid order: the sorted blocks fastest
            pid_m = tile % num_m
            pid_n = tile // num_m
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs)
        m_mask = pair < num_pairs
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        k_hi = tl.where(expert >= 0, K, 0)  # other ranks' pairs: zero sums, zero rows
        expert = tl.maximum(expert, 0)
        b_row = (expert * N).to(tl.int32) + pid_n * BLOCK_N
        s_base = scale_ptr + expert * stride_se
        # a_rows and b_base are the pointer loads' (unused: both operands come through TMA); the
        # loop reads the activation dtype from a_rows, which out's pointer has
        acc, _ = _dense_mainloop(out_ptr, m_mask, a_desc, pid_m * BLOCK_M, out_ptr, b_desc, b_row, rn, n_mask, N, K,
                                 0, k_hi, 0, s_base, stride_sg, False, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32,
                                 DOT_PRECISION, True, SCALE_BN, SCALE_BK, True, False)
        rows = _epilogue_rows(acc, acc, s_base, topk_w_ptr, out_ptr, pair, m_mask, rn, n_mask, N, False, True,
                              SCALED, INTERPRET)
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + rn[None, :], rows,
                 mask=m_mask[:, None] & n_mask[None, :])
