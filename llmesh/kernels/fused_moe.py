"""Fused mixture-of-experts layer: y[t] = sum_j w[t, j] * SwiGLU_{e[t, j]}(x[t]), in Triton.

The design of vLLM's / SGLang's Triton fused_moe:

1. ``moe_align_block_size`` (moe_align.py) sorts the T * k (token, slot) pairs by expert and
   pads each expert's run to a multiple of BLOCK_M, so every BLOCK_M block of the sorted list
   belongs to one expert (``expert_ids[block]``): one Triton program for decode-sized batches,
   torch ops for large ones, on the device without a host read. The grid is sized by an upper
   bound of the padded length, and blocks past the real end (``num_tokens_post_padded``)
   return at once, so the wrapper is CUDA-graph safe. A one-token step skips this launch: its
   k experts are distinct, so each pair gets a block of its own (``PAIR_BLOCKS_MAX_TOKENS``).
2. One grouped GEMM launch for all experts computes gate and up together: each program
   loads the gate tile and the up tile of the same columns of its block's expert, keeps two
   accumulators, and writes silu(gate) * up in its epilogue. The [T*k, 2I] gate/up
   activation never reaches memory, and no separate silu-mul launch runs; the price is two
   accumulators per program (register pressure), which the tile table sizes for. Blocks of
   one pair (a one-token step) may instead run the GEMV form (fused_moe_dense.py), where the
   table measured it faster.
3. A second grouped GEMM runs the down projection, multiplies each row by its routing
   weight in the epilogue, and writes one row per (token, slot) pair. Its input rows are the
   gate/up GEMM's, gathered by pair; in the sorted hidden layout (``MoEConfig.a_tma``) the
   gate/up GEMM writes them at their sorted positions instead (padding rows as zeros), so each
   down block reads one contiguous tile through a TMA descriptor, and with both operands through
   TMA its K loop can be warp-specialized (``MoEConfig.warp_spec``), as CUTLASS's grouped GEMMs
   are; the gate/up GEMM's own rows stay a gather (Hopper's TMA has no row gather).
4. The k copies of each token are summed (moe_topk_sum.py) by ``_moe_sum_kernel`` over [T, k, H] in slot order
   (fixed, so the result does not depend on scheduling; atomics would not be deterministic).
   One launch of T x H / BLOCK_H programs: torch's ``sum`` over the middle dimension was a
   4.5 us reduction a layer at batch 1 on the H200 (kernel_profile_h200.json). A one-token
   step sums inside the down GEMM instead, in the same order (``_slot_sum``), and any step can
   (``_token_sum``: the last of a token's pairs to arrive sums them; ``TOKEN_SUM_ON_CUDA``).

A one-token bf16 layer may skip all of this for moe_gemv.py's two CUDA C++ kernels (``moe_gemv.chosen``:
where a device measured them faster, or LLMESH_MOE_CUDA_GEMV=1).

Expert parallelism: an id of -1 in ``topk_ids`` is a pair whose expert another rank holds
(vLLM's ``expert_map`` convention). The align step sorts those pairs into one trailing run
whose blocks carry expert -1: the gate/up GEMM skips them, the down GEMM writes zeros to
their rows (no weight is read), so they add nothing to the top-k sum. No host read decides
anything, so the layer stays CUDA-graph safe with a rank's partial expert set.

INT8 and FP8 (E4M3) weight-only experts (per-output-channel scales, w = q * scale) go through
the same kernels: int8 codes -127..127 and every E4M3 value are exact in 16-bit floats, so
the codes are cast to the activation dtype in the K loop and feed tl.dot, and the accumulator
is multiplied by the scale row once after the loop — the dequantization of every weight with
its multiply factored out (one multiply per output, not per weight). Activations stay 16-bit
(W8A16; no FP8 tensor-core GEMM). E4M3 experts of a block-scaled FP8 checkpoint (one scale per
``weight_block`` of rows and columns, 128 x 128 in Qwen3-*-FP8) cannot factor the scale out of
the K loop: each K step lies in one column block, and its product is scaled per column before it
joins the float32 sum (the block scales carried a step ahead, as Triton does not pipeline them).

INT4 experts (group-wise with zero points, quant/quantize.py's ``quantize_int4`` per expert)
store each expert as an Int4Weight does: codes uint8 [E, Kp / 2, N] whose byte (j, n) holds
the codes of rows j and j + Kp / 2 (so both halves' activations load as contiguous tiles),
float16 scales and mins [E, Kp / G, N], w = q * scale + min. The K loop walks the two halves
together (one group of each per step); fused_moe_int4.py holds that loop: how the codes are
widened and where each group's scale goes in decode and prefill tiles. INT4 has a tile table of
its own (fused_moe_config.py). A W4A16 grouped GEMM reading a quarter of bf16's bytes.

Rounding follows the torch reference (llmesh/kernels/fused_moe_ref.py, HF's order): gate and up are
rounded to the activation dtype, then silu(gate), then the product; the down output is
rounded before the routing weight multiplies it. One place differs: the k weighted expert
outputs of a token are summed in float32 and rounded once, where HF and the reference round
after adding each expert (in expert order); in 16-bit that is about one ulp of the output
(float32 is exact either way, which is what the fidelity tests compare).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import torch
import triton
import triton.language as tl

from llmesh.kernels import moe_gemv
from llmesh.kernels.attention_config import sm_count
from llmesh.kernels.common import (arrival_counters, dot_in_fp32, dot_precision, interpreting, pdl_launch,
                                   tma_descriptor)
from llmesh.kernels.fused_moe_checks import QUANTIZED_DTYPES, check_layouts
from llmesh.kernels.fused_moe_config import MoEConfig, fit_shared_memory, pick_config, shared_memory_limit
from llmesh.kernels.fused_moe_dense import _dense_gemv_loop, _dense_mainloop
from llmesh.kernels.fused_moe_epilogue import _epilogue_rows
from llmesh.kernels.fused_moe_persistent import _moe_down_persistent_kernel
from llmesh.kernels.fused_moe_int4 import _int4_gemv_loop, _int4_mainloop
from llmesh.kernels.fused_moe_ref import fused_moe_ref  # noqa: F401 (the kernel's reference)
from llmesh.kernels.moe_align import moe_align_block_size, padded_length_bound  # noqa: F401 (re-exported)
from llmesh.kernels.moe_topk_sum import TOKEN_SUM_SLOTS, _slot_sum, _token_sum, moe_sum
from llmesh.kernels.split_k import arrive, load_sum, split_buffers, store_part
from llmesh.kernels.triton_helpers import grouped_tile, pdl_enter


log = logging.getLogger("llmesh.kernels.fused_moe")

PAIR_BLOCKS_MAX_TOKENS = 1
"""Steps of at most this many tokens give each (token, slot) pair a block of its own instead of
sorting pairs by expert: one token's k experts are distinct, so no expert is read twice, and the
blocks are known without the align launch (expert_ids is topk_ids itself). With more tokens two
pairs can share an expert, whose weights the sorted blocks read once."""

TOKEN_SUM_ON_CUDA = False
"""Whether the down GEMM sums each token's k rows itself at every batch (``_token_sum``) rather
than ``_moe_sum_kernel`` after it. At a 4k-token prefill that launch reads 134 MB of rows (~35 us
on the H200); the fused form reads a token's rows once its last pair is written, during the GEMM,
and spends an atomic per row. Off: on the H100 (moe_h100_sorted.json, 78a1272) it took 0.448 against
0.447 ms at batch 64 and 1.105 against 1.072 ms at a 4k prefill (``moe_<tag>_token_sum_ms``)."""

_pair_block_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

_warp_spec_refused: set[tuple] = set()
"""Down GEMM tiles (MoEConfig.warp_spec) whose warp-specialized loop this Triton failed to compile
(3.9's pass failed at BLOCK_M 128 with 4 warps, tiles MoEConfig now refuses; another version may
fail another tile). They run the plain loop, so a table stays usable across Triton versions."""


# The pair count changes with every eager step's tokens: not specialised (no compile per
# value class mid-serving, llmesh/kernels/README.md).
@triton.jit(do_not_specialize=["num_pairs"])
def _moe_gemm_kernel(
    a_ptr, a_desc, b_ptr, b_desc, scale_ptr, min_ptr, out_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_ptr, part_ptr, lock_ptr,
    N, K, KH, num_pairs, a_row_div, k_split,
    stride_am, stride_be, stride_bn, stride_se, stride_sg, stride_om,
    GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr, SCALED: tl.constexpr, INT4: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
    SUM_SLOTS: tl.constexpr = 0, GROUP_M: tl.constexpr = 0, WEIGHT_TMA: tl.constexpr = False,
    SCALE_BN: tl.constexpr = 0, SCALE_BK: tl.constexpr = 0, TOKEN_SUM: tl.constexpr = 0,
    OUT_SORTED: tl.constexpr = False, A_SORTED: tl.constexpr = False, A_TMA: tl.constexpr = False,
    WARP_SPEC: tl.constexpr = False, GEMV_PREFETCH: tl.constexpr = False,
):
    """One [BLOCK_M, BLOCK_N] tile of out[pair] = a[pair // a_row_div] @ b[expert]^T.

    GATED: b holds 2N rows (gate, then up); the tile is silu(a @ gate^T) * (a @ up^T).
    MUL_WEIGHT: rows are scaled by their pair's routing weight.
    INT4: b is codes [Kp / 2, N (2N gated)] per expert (stride_bn steps along Kp / 2), scales and
    mins [Kp / GROUP, N] per expert (stride_se an expert, stride_sg a group); KH = Kp / 2.
    SPLIT_K > 1: program_id(2) takes k_split rows of K (INT4: of KH) and stores its float32
    partials (part: [SPLIT_K, grid rows * BLOCK_M, 2N gated / N]); the tile's last split to
    arrive sums them in split order and runs the epilogue (split_k.py's scheme).
    SUM_SLOTS = k (one token, one pair a block, no split; MUL_WEIGHT): the k weighted rows are
    summed here instead of by _moe_sum_kernel (_slot_sum) into out [1, N]; part is [k, N] float32.
    TOKEN_SUM = k (any tokens, no split; MUL_WEIGHT): rows still go to out [T * k, N], and the
    last of a token's k pairs to arrive at a column tile sums them into part [T, N] (_token_sum).
    GROUP_M > 0 (MoEConfig.group_m): a 1-D grid over (sorted block, column tile) in grouped
    order, GROUP_M blocks taking every column tile before the next GROUP_M start.
    WEIGHT_TMA (MoEConfig.weight_tma; float / INT8 / FP8 experts): the weight tiles through
    b_desc, a TMA descriptor over b's rows stacked [E * (2N gated / N), K] with block
    [BLOCK_N, BLOCK_K]; otherwise b_desc is unused.
    BLOCK_M == 1 (MoEConfig.gemv): one pair a block, its products by FMAs
    (fused_moe_dense._dense_gemv_loop, fused_moe_int4._int4_gemv_loop) instead of a 16-row tl.dot
    tile mostly padding.
    SCALE_BN > 0 (SCALED False): block-scaled E4M3 experts, scales [E, rows / SCALE_BN, K / SCALE_BK]
    (stride_se an expert, stride_sg a row of blocks) applied in the K loop (_dense_mainloop).
    OUT_SORTED (the gate/up GEMM of the sorted hidden layout, MoEConfig.a_tma): out rows are the
    sorted positions, every row of a block written (padding rows as zeros), not the pairs' rows.
    A_SORTED (the down GEMM of that layout): a's rows are the sorted positions; A_TMA: they come
    through a_desc (block [BLOCK_M, BLOCK_K]); WARP_SPEC: the K loop warp-specialized.
    GEMV_PREFETCH (the GEMV form at MoEConfig.num_stages >= 2): the next K step's weight tiles
    loaded a step ahead (fused_moe_dense._dense_gemv_loop, fused_moe_int4._int4_gemv_loop).
    """
    pdl_enter(PDL)
    pid_k = tl.program_id(2)
    if GROUP_M > 0:
        num_n = tl.cdiv(N, BLOCK_N)
        num_m = tl.num_programs(0) // num_n
        pid_m, pid_n = grouped_tile(tl.program_id(0), num_m * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    else:
        num_m = tl.num_programs(0)
        num_n = tl.num_programs(1)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    block_live = pid_m * BLOCK_M < tl.load(num_post_ptr)
    # A warp-specialized loop under an early return fails Triton 3.6's pass (an assertion in its
    # task-id propagation), so WARP_SPEC runs every program through the loop, see below.
    if not WARP_SPEC:
        if not block_live:
            return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs)  # [BLOCK_M] flat (token, slot) index; num_pairs: padding
    m_mask = pair < num_pairs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    if WARP_SPEC:
        # A block past the padded end or of other ranks' pairs runs no K step: its zero sums make
        # the zero rows the latter need (the routing weight times 0), the former store nothing.
        m_mask = pair < tl.where(block_live, num_pairs, 0)  # (the interpreter's int1 & a scalar int1 is no mask)
        k_hi = tl.where(block_live & (expert >= 0), k_hi, k_lo)
        expert = tl.maximum(expert, 0)  # its scale row is read for nothing, but inside the tensor
    elif expert < 0:
        # Pairs whose expert another rank holds: the top-k sum reads their down rows, so they
        # must be zero (cheaper than zeroing the whole output first).
        if MUL_WEIGHT:
            if SUM_SLOTS > 0:
                _slot_sum(tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), part_ptr, lock_ptr, out_ptr, pair, m_mask,
                          rn, n_mask, N, pid_n, SUM_SLOTS, INTERPRET)
            elif TOKEN_SUM > 0:
                _token_sum(tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty), out_ptr, part_ptr, lock_ptr,
                           pair, m_mask, rn, n_mask, N, stride_om, pid_n, num_n, TOKEN_SUM, BLOCK_M, BLOCK_N,
                           INTERPRET)
            else:
                zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty)
                tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + rn[None, :], zeros,
                         mask=m_mask[:, None] & n_mask[None, :])
        return
    if A_SORTED:
        a_at = offs
    else:
        a_at = pair // a_row_div
    a_rows = a_ptr + a_at.to(tl.int64)[:, None] * stride_am  # [BLOCK_M, 1]
    b_base = b_ptr + expert * stride_be
    if BLOCK_M == 1:  # the GEMV forms take the pair's row as a scalar pointer (a vector in their tile's layout)
        a_row = a_ptr + tl.max(a_at, axis=0).to(tl.int64) * stride_am
        live = tl.max(m_mask.to(tl.int32), axis=0) > 0
    if INT4 and BLOCK_M == 1:
        acc, acc_up = _int4_gemv_loop(a_row, live, b_base, scale_ptr + expert * stride_se,
                                      min_ptr + expert * stride_se, rn, n_mask, N, K, KH, k_lo,
                                      tl.minimum(k_lo + k_split, KH), stride_bn, stride_sg, GATED, GROUP, BLOCK_N,
                                      BLOCK_K, INTERPRET, GEMV_PREFETCH)
    elif INT4:
        acc, acc_up = _int4_mainloop(a_rows, m_mask, b_base, scale_ptr + expert * stride_se,
                                     min_ptr + expert * stride_se, rn, n_mask, N, K, KH, k_lo,
                                     tl.minimum(k_lo + k_split, KH), stride_bn, stride_sg, GATED, GROUP, BLOCK_M,
                                     BLOCK_N, BLOCK_K, DOT_F32, DOT_PRECISION, INTERPRET)
    else:
        rows_per_expert = N
        if GATED:
            rows_per_expert = 2 * N
        b_row = (expert * rows_per_expert).to(tl.int32) + pid_n * BLOCK_N
        if BLOCK_M == 1:
            acc, acc_up = _dense_gemv_loop(a_row, live, b_base, b_desc, b_row, rn, N, K, k_lo,
                                           k_hi, stride_bn, scale_ptr + expert * stride_se,
                                           stride_sg, GATED, BLOCK_N, BLOCK_K, WEIGHT_TMA, SCALE_BN, SCALE_BK,
                                           GEMV_PREFETCH)
        else:
            acc, acc_up = _dense_mainloop(a_rows, m_mask, a_desc, pid_m * BLOCK_M, b_base, b_desc, b_row, rn, n_mask,
                                          N, K, k_lo, k_hi, stride_bn,
                                          scale_ptr + expert * stride_se, stride_sg, GATED, BLOCK_M, BLOCK_N, BLOCK_K,
                                          DOT_F32, DOT_PRECISION, WEIGHT_TMA, SCALE_BN, SCALE_BK, A_TMA, WARP_SPEC)
    if OUT_SORTED:  # every row of the block, its padding rows' zeros included: the down GEMM reads whole tiles
        out_at = offs
        out_mask = (offs >= 0)[:, None] & n_mask[None, :]
    else:
        out_at = pair
        out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        rows = num_m * BLOCK_M  # the partials' rows: every sorted position
        width = N
        if GATED:
            width = 2 * N
        cols_mask = (offs >= 0)[:, None] & n_mask[None, :]
        store_part(acc, part_ptr, pid_k, offs, rn, cols_mask, rows, width)
        if GATED:
            store_part(acc_up, part_ptr, pid_k, offs, rn + N, cols_mask, rows, width)
        tile = pid_m * num_n + pid_n
        if arrive(lock_ptr, tile) == SPLIT_K - 1:
            acc = load_sum(part_ptr, offs, rn, cols_mask, rows, width, SPLIT_K, BLOCK_M, BLOCK_N)
            if GATED:
                acc_up = load_sum(part_ptr, offs, rn + N, cols_mask, rows, width, SPLIT_K, BLOCK_M, BLOCK_N)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch on this stream
            out_rows = _epilogue_rows(acc, acc_up, scale_ptr + expert * stride_se, topk_w_ptr, out_ptr, pair, m_mask,
                                      rn, n_mask, N, GATED, MUL_WEIGHT, SCALED, INTERPRET)
            tl.store(out_ptr + out_at.to(tl.int64)[:, None] * stride_om + rn[None, :], out_rows, mask=out_mask)
    else:
        out_rows = _epilogue_rows(acc, acc_up, scale_ptr + expert * stride_se, topk_w_ptr, out_ptr, pair, m_mask, rn,
                                  n_mask, N, GATED, MUL_WEIGHT, SCALED, INTERPRET)
        if SUM_SLOTS > 0:
            _slot_sum(out_rows, part_ptr, lock_ptr, out_ptr, pair, m_mask, rn, n_mask, N, pid_n, SUM_SLOTS, INTERPRET)
        elif TOKEN_SUM > 0:
            _token_sum(out_rows, out_ptr, part_ptr, lock_ptr, pair, m_mask, rn, n_mask, N, stride_om, pid_n, num_n,
                       TOKEN_SUM, BLOCK_M, BLOCK_N, INTERPRET)
        else:
            tl.store(out_ptr + out_at.to(tl.int64)[:, None] * stride_om + rn[None, :], out_rows, mask=out_mask)


def _within_group(config: MoEConfig, codes: torch.Tensor, scale: torch.Tensor) -> MoEConfig:
    group = 2 * codes.shape[1] // scale.shape[1]
    block_k = math.gcd(config.block_k, group)  # >= 16: check_int4 takes groups of multiples of 16
    return config if block_k == config.block_k else dataclasses.replace(config, block_k=block_k)


def _int4_args(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> dict:
    """The INT4 launch's layout arguments for one GEMM's experts."""
    kp = 2 * codes.shape[1]
    return dict(KH=kp // 2, GROUP=kp // scale.shape[1], min_ptr=low, stride_se=scale.stride(0),
                stride_sg=scale.stride(1))


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              w13_min: torch.Tensor | None = None, w2_min: torch.Tensor | None = None,
              config: MoEConfig | None = None, down_config: MoEConfig | None = None,
              align_path: str | None = None, weight_block: tuple[int, int] | None = None,
              token_sum: bool | None = None) -> torch.Tensor:
    """x [T, H] routed by topk_ids / topk_weights [T, k] through experts w13 [E, 2I, H] and
    w2 [E, H, I] (float in x's dtype, or int8 / float8_e4m3fn with w13_scale [E, 2I], w2_scale
    [E, H]; float8_e4m3fn scaled per ``weight_block`` = (BN, BK) block of rows and columns,
    w13_scale [E, 2I / BN, H / BK] and w2_scale [E, H / BN, I / BK], as FP8 checkpoints store
    them; or INT4 codes with group scales and mins, the module docstring's layout) → [T, H] in
    x's dtype. ``config`` / ``down_config`` override the tile table per GEMM (tests and the autotune
    sweep); the down GEMM shares the gate/up GEMM's sorted blocks, so
    its BLOCK_M is the gate/up config's. ``align_path`` forces the align step's implementation
    (moe_align_block_size's ``path``; the benchmark times each). ``token_sum`` forces the top-k
    sum inside the down GEMM (``_token_sum``) on or off; by default TOKEN_SUM_ON_CUDA decides."""
    t, h, e, inter, top_k = check_layouts(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, w13_min, w2_min,
                                          weight_block)
    if t == 0:
        return torch.zeros_like(x)
    fmt = "int4" if w13.dtype == torch.uint8 else "dense"  # the tile table's expert format
    if (t == 1 and config is None and down_config is None and align_path is None and w13_scale is None
            and token_sum is None and moe_gemv.chosen(x, w13, w2, topk_weights, topk_ids)):
        return moe_gemv.moe_gemv(x, w13, w2, topk_weights, topk_ids)  # one token's two streams in CUDA C++
    # a table's tile is fitted to this launch's dtypes; an explicit one (tests, the sweep) runs as given
    if config is None or down_config is None:
        fit = dict(limit=shared_memory_limit(x.device), act_bytes=x.element_size(),
                   weight_bytes=w13.element_size(), int4=fmt == "int4")
        config = config or fit_shared_memory(pick_config(t, e, inter, h, top_k, x.device, fmt), gated=True, **fit)
        down_config = down_config or fit_shared_memory(pick_config(t, e, h, inter, top_k, x.device, fmt),
                                                       gated=False, **fit)
    if down_config.block_m != config.block_m:  # the down GEMM runs on the gate/up GEMM's blocks
        if down_config.gemv and not config.gemv:
            raise ValueError(f"fused_moe: down_config {down_config} is the GEMV form (block_m 1) but the gate/up "
                             f"config {config} is not; the down GEMM runs on the gate/up GEMM's blocks, so give both "
                             "block_m 1 or neither")
        down_config = dataclasses.replace(down_config, block_m=config.block_m)
    if config.a_tma or config.warp_spec:
        raise ValueError(f"fused_moe: a_tma, warp_spec and persistent are the down GEMM's (its activation tiles are "
                         f"the sorted hidden rows; the gate/up GEMM's are gathered tokens), but the gate/up config "
                         f"{config} asks for them")
    if down_config.a_tma and fmt == "int4":
        raise ValueError(f"fused_moe: down_config {down_config} asks for a_tma, a K loop of float / INT8 / FP8 "
                         "experts; INT4 experts' loop reads its activations in two halves")
    if fmt == "int4":  # a K step must stay inside one group of each half
        config = _within_group(config, w13, w13_scale)
        down_config = _within_group(down_config, w2, w2_scale)
    elif weight_block is not None:  # a K step must stay inside one column block
        config, down_config = (dataclasses.replace(c, block_k=math.gcd(c.block_k, weight_block[1]))
                               for c in (config, down_config))
    pairs = t * top_k
    pair_blocks = align_path is None and t <= PAIR_BLOCKS_MAX_TOKENS
    if pair_blocks:
        sorted_ids, num_post = _pair_blocks(pairs, config.block_m, x.device)
        expert_ids = topk_ids.reshape(-1)
    else:
        sorted_ids, expert_ids, num_post = moe_align_block_size(topk_ids, config.block_m, e, path=align_path)
    int8 = w13.dtype in QUANTIZED_DTYPES
    int4 = fmt == "int4"
    bn, bk = weight_block or (0, 0)
    common = dict(DOT_F32=dot_in_fp32(x.dtype), DOT_PRECISION=dot_precision(x.dtype), INTERPRET=interpreting(),
                  **pdl_launch(x.device), SCALED=int8 and not bn, INT4=int4, BLOCK_M=config.block_m, SCALE_BN=bn,
                  SCALE_BK=bk)
    layouts = []
    for codes, scale, low in ((w13, w13_scale, w13_min), (w2, w2_scale, w2_min)):
        if int4:
            layouts.append(_int4_args(codes, scale, low))
        else:  # KH, GROUP and min_ptr are the INT4 path's (unused); a block-scaled row of blocks is stride_sg
            layouts.append(dict(KH=0, GROUP=1, min_ptr=codes, stride_se=scale.stride(0) if int8 else 0,
                                stride_sg=scale.stride(1) if bn else 0))
    descs = [_weight_desc(w, cfg) for w, cfg in ((w13, config), (w2, down_config))]
    # [T*k, I] by pair, or (a_tma) every sorted position's row, so the down GEMM reads whole tiles
    sorted_hidden = bool(down_config.a_tma)
    hidden = torch.empty(expert_ids.shape[0] * config.block_m if sorted_hidden else pairs, inter, dtype=x.dtype,
                         device=x.device)
    a_desc = tma_descriptor(hidden, [config.block_m, down_config.block_k]) if sorted_hidden else None
    grid, split = _grid_and_split("fused_moe_up", x, config, expert_ids.shape[0], inter, 2 * inter,
                                  w13.shape[1] if int4 else h)
    _moe_gemm_kernel[grid](
        x, x, w13, descs[0] or w13, w13_scale if int8 or int4 else w13, out_ptr=hidden, topk_w_ptr=topk_weights,
        sorted_ids_ptr=sorted_ids, expert_ids_ptr=expert_ids, num_post_ptr=num_post,
        N=inter, K=h, num_pairs=pairs, a_row_div=top_k,
        stride_am=x.stride(0), stride_be=w13.stride(0), stride_bn=w13.stride(1), stride_om=hidden.stride(0),
        GATED=True, MUL_WEIGHT=False, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages, GROUP_M=config.group_m,
        WEIGHT_TMA=descs[0] is not None, OUT_SORTED=sorted_hidden, GEMV_PREFETCH=_prefetches(config),
        **split, **layouts[0], **common)
    weights = topk_weights.reshape(-1)  # [T*k]; float32 (Mixtral) or x's dtype (Qwen-MoE)
    grid, split = _grid_and_split("fused_moe_down", x, down_config, expert_ids.shape[0], h, h,
                                  w2.shape[1] if int4 else inter)
    persistent = bool(down_config.persistent) and a_desc is not None and descs[1] is not None
    # one token's k rows summed by the down GEMM's last program of each column tile
    slot_sum = pair_blocks and t == 1 and split["SPLIT_K"] == 1 and not persistent
    tiles = triton.cdiv(h, down_config.block_n)
    if token_sum is None:
        token_sum = x.is_cuda and TOKEN_SUM_ON_CUDA
    token_sum = (token_sum and not slot_sum and not persistent and split["SPLIT_K"] == 1
                 and t * tiles <= TOKEN_SUM_SLOTS)
    if slot_sum:
        out = torch.empty(1, h, dtype=x.dtype, device=x.device)
        split.update(part_ptr=torch.empty(top_k, h, dtype=torch.float32, device=x.device),
                     lock_ptr=arrival_counters("fused_moe_slot_sum", x.device, tiles))
    else:
        out = torch.empty(pairs, h, dtype=x.dtype, device=x.device)  # [T*k, H]
    if token_sum:
        total = torch.empty(t, h, dtype=x.dtype, device=x.device)
        split.update(part_ptr=total, lock_ptr=arrival_counters("fused_moe_token_sum", x.device, t * tiles,
                                                               TOKEN_SUM_SLOTS))
    rows = dict(out_ptr=out, topk_w_ptr=weights, sorted_ids_ptr=sorted_ids, expert_ids_ptr=expert_ids,
                num_post_ptr=num_post, N=h, K=inter, num_pairs=pairs, stride_om=out.stride(0),
                BLOCK_N=down_config.block_n, BLOCK_K=down_config.block_k, GROUP_M=down_config.group_m,
                num_warps=down_config.num_warps, num_stages=down_config.num_stages)
    scale = w2_scale if int8 or int4 else w2
    if persistent:
        # the interpreter's programs run one after another: two "SMs", so each walks several tiles
        grid = (down_config.persistent * (sm_count(x.device) if x.is_cuda else 2),)
        kernel, operands = _moe_down_persistent_kernel, (a_desc, descs[1], scale)
        down = dict(rows, stride_se=layouts[1]["stride_se"], stride_sg=layouts[1]["stride_sg"], PROGRAMS=grid[0],
                    **{k: v for k, v in common.items() if k != "INT4"})
    else:
        kernel, operands = _moe_gemm_kernel, (hidden, a_desc or hidden, w2, descs[1] or w2, scale)
        down = dict(rows, a_row_div=1, stride_am=hidden.stride(0), stride_be=w2.stride(0), stride_bn=w2.stride(1),
                    GATED=False, MUL_WEIGHT=True, SUM_SLOTS=top_k if slot_sum else 0,
                    TOKEN_SUM=top_k if token_sum else 0, WEIGHT_TMA=descs[1] is not None, A_SORTED=sorted_hidden,
                    A_TMA=a_desc is not None, GEMV_PREFETCH=_prefetches(down_config), **split, **layouts[1],
                    **common)
    warp_spec = bool(down_config.warp_spec) and a_desc is not None and descs[1] is not None
    _launch_warp_spec(kernel, grid, operands, down, warp_spec, down_config)
    if slot_sum or token_sum:
        return total if token_sum else out
    return moe_sum(out.view(t, top_k, h))


def _prefetches(config: MoEConfig) -> bool:
    """The GEMV form's num_stages >= 2: its weight tiles loaded a step ahead (tl.dot tiles pipeline
    through num_stages themselves)."""
    return config.gemv and config.num_stages > 1


def _launch_warp_spec(kernel, grid, operands: tuple, kwargs: dict, warp_spec: bool, config: MoEConfig) -> None:
    """kernel[grid](*operands, WARP_SPEC=..., **kwargs), warp-specialized where asked unless this
    Triton's pass fails on the tile: then (and for every later launch of that config) the plain loop."""
    warp_spec = warp_spec and (kernel, config) not in _warp_spec_refused
    try:
        kernel[grid](*operands, WARP_SPEC=warp_spec, **kwargs)
    except RuntimeError as exc:
        if not warp_spec or "PassManager::run failed" not in str(exc):
            raise
        _warp_spec_refused.add((kernel, config))
        log.warning("fused_moe: this Triton (%s) cannot warp-specialize the down GEMM's tile %s; it runs the "
                    "plain pipelined loop", triton.__version__, config)
        kernel[grid](*operands, WARP_SPEC=False, **kwargs)


def weight_tma_supported(w: torch.Tensor) -> bool:
    """Whether ``w``'s experts can stream through a TMA descriptor: float / INT8 / FP8 weights
    (INT4's codes are laid out by K halves), contiguous, their rows as common.tma_descriptor
    takes them."""
    return _weight_desc(w, MoEConfig(16, 16, 16, weight_tma=1)) is not None


def _weight_desc(w: torch.Tensor, config: MoEConfig):
    """The TMA descriptor of one GEMM's experts (rows stacked [E * N, K]) for ``config``'s tile,
    or None where the config asks for pointer loads or the weights cannot take one."""
    if not config.weight_tma or w.dtype == torch.uint8 or not w.is_contiguous():
        return None
    return tma_descriptor(w.reshape(-1, w.shape[-1]), [config.block_n, config.block_k])


def _pair_blocks(pairs: int, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_ids, num_post) with block b holding pair b alone (its other rows padding): what
    moe_align_block_size would return for pairs of distinct experts in that order. Constant,
    so kept per size (not while a CUDA graph captures: its fill would only run at replay)."""
    key = (device.type, device.index, pairs, block_m)
    hit = _pair_block_cache.get(key)
    if hit is not None:
        return hit
    sorted_ids = torch.full((pairs, block_m), pairs, dtype=torch.int32, device=device)
    sorted_ids[:, 0] = torch.arange(pairs, dtype=torch.int32, device=device)
    blocks = (sorted_ids.view(-1), torch.full((1,), pairs * block_m, dtype=torch.int32, device=device))
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _pair_block_cache[key] = blocks
    return blocks


def _grid_and_split(kernel: str, x: torch.Tensor, config: MoEConfig, blocks: int, n: int, width: int,
                    k_rows: int) -> tuple[tuple[int, int, int], dict]:
    """One GEMM's grid (sorted blocks, column tiles, K splits; grouped order: blocks x column
    tiles on one axis) and split-K launch arguments: config.split_k pieces of the K loop's
    ``k_rows`` (K, or INT4's code rows), each a multiple of BLOCK_K, with float32 partials for
    every sorted row and ``width`` columns (2N gated)."""
    k_split = triton.cdiv(triton.cdiv(k_rows, config.split_k), config.block_k) * config.block_k
    splits = triton.cdiv(k_rows, k_split)  # a short K takes fewer splits than asked
    tiles = triton.cdiv(n, config.block_n)
    grid = (blocks * tiles, 1, splits) if config.group_m else (blocks, tiles, splits)
    part, locks = split_buffers(kernel, x, blocks * config.block_m, width, splits, blocks * tiles)
    return grid, dict(part_ptr=part, lock_ptr=locks, k_split=k_split, SPLIT_K=splits)
