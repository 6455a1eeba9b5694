"""The 16-bit, INT8 and FP8 experts' K loops of the fused MoE GEMMs (fused_moe.py's dense path).

Two forms of one product, a block's rows of activations times rows rn of its expert's weight
([N, K], or [2N, K] gated: gate rows, then up rows) over this split's K range:

- ``_dense_mainloop``, tiles of BLOCK_M >= 16 rows into tl.dot (the tensor cores): what every
  batch with several pairs an expert needs, the sorted pairs of an expert sharing each weight
  tile loaded.
- ``_dense_gemv_loop``, BLOCK_M = 1 (the GEMV form): one pair a program, each weight element
  multiplied into a float32 [BLOCK_N, BLOCK_K] accumulator and summed over K once after the loop
  (skinny_gemm.py's FMA form). A block that holds one pair, as every block of a one-token step
  does, pads a 16-row tile with 15 rows of zeros; the tile form then streams its weight at about
  0.75 of the copy bandwidth at batch 1 (docs/moe.md), where the dense projections' FMA form
  reaches 0.73-0.99 (gemm_sweep_h200.json). Narrow weight tiles with long K steps are what that
  form wins with, and BLOCK_N below 16 only works without tl.dot. Which form a shape takes is the
  tile table's (fused_moe_config.py), from a measured sweep.

INT8 and E4M3 codes are exact in float32 and bfloat16 alike; a per-channel scale is applied by
the epilogue, a block scale (``SCALE_BN`` > 0) to each K step's products before they join the
sum (a step lies in one column block).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dense_mainloop(a_rows, m_mask, a_desc, a_row, b_base, b_desc, b_row, rn, n_mask, N, K, k_lo, k_hi, stride_bn,
                    s_base, stride_sn,
                    GATED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, WEIGHT_TMA: tl.constexpr,
                    SCALE_BN: tl.constexpr = 0, SCALE_BK: tl.constexpr = 0, A_TMA: tl.constexpr = False,
                    WARP_SPEC: tl.constexpr = False):
    """(a @ gate^T, a @ up^T) over float, int8 or E4M3 rows [N (2N gated), K] of one expert,
    columns k_lo..k_hi of K (this split's).

    WEIGHT_TMA: the weight tiles come from b_desc (the experts' rows stacked [E * rows, K]),
    this tile's first row being b_row. The descriptor fills columns past K with zeros; rows
    past this expert's N are the up rows or the next expert's, in columns the store masks.
    A_TMA: the activation tiles come from a_desc (rows a_row.. of a [rows, K] tensor in sorted
    order, the down GEMM's hidden rows) instead of the gathered rows a_rows; padding rows hold
    zeros there, so no row mask is needed.
    WARP_SPEC: the K loop warp-specialized (Triton's producer warps issue the copies while the
    others run the MMAs); Triton 3.6 partitions it on sm90 only with both operands through TMA
    (bench/warp_spec_probe.py), so the wrapper asks for it with A_TMA and WEIGHT_TMA alone.
    SCALE_BN > 0: block-scaled E4M3 rows, one scale per SCALE_BN rows and SCALE_BK columns at
    s_base ([rows / SCALE_BN, K / SCALE_BK], stride_sn a row); a K step lies in one column block
    (BLOCK_K divides SCALE_BK, splits start on a step), so its product is scaled per column
    before it joins the float32 sum."""
    act_dtype = a_rows.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SCALE_BN > 0:
        # The scales are carried a step ahead: Triton pipelines the tiles, not these gathers.
        s_rows = s_base + (rn // SCALE_BN).to(tl.int64) * stride_sn  # [BLOCK_N]
        last_block = (k_hi - 1) // SCALE_BK
        ws = tl.load(s_rows + k_lo // SCALE_BK, mask=n_mask, other=0.0)
        if GATED:  # the up rows' scales follow the gate rows'
            s_rows_up = s_base + ((rn + N) // SCALE_BN).to(tl.int64) * stride_sn
            ws_up = tl.load(s_rows_up + k_lo // SCALE_BK, mask=n_mask, other=0.0)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, warp_specialize=WARP_SPEC):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        if A_TMA:
            a = a_desc.load([a_row, k0])  # [BM, BK]; columns past K come in as zeros
        else:
            a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        if WEIGHT_TMA:
            b = b_desc.load([b_row, k0]).T  # [BK, BN]
        else:
            b_mask = k_mask[:, None] & n_mask[None, :]
            b = tl.load(b_base + rn.to(tl.int64)[None, :] * stride_bn + k[:, None], mask=b_mask, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(act_dtype)  # int8 / E4M3 codes are exact in 16-bit floats
        if SCALE_BN > 0:
            nxt = tl.minimum((k0 + BLOCK_K) // SCALE_BK, last_block)  # the last step reloads its own
            ws_next = tl.load(s_rows + nxt, mask=n_mask, other=0.0)
            acc += tl.dot(a, b, input_precision=DOT_PRECISION) * ws[None, :]
            ws = ws_next
        else:
            acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        if GATED:
            if WEIGHT_TMA:
                bu = b_desc.load([b_row + N, k0]).T
            else:
                bu = tl.load(b_base + (rn + N).to(tl.int64)[None, :] * stride_bn + k[:, None], mask=b_mask, other=0.0)
            if DOT_F32:
                bu = bu.to(tl.float32)
            else:
                bu = bu.to(act_dtype)
            if SCALE_BN > 0:
                ws_up_next = tl.load(s_rows_up + nxt, mask=n_mask, other=0.0)
                acc_up += tl.dot(a, bu, input_precision=DOT_PRECISION) * ws_up[None, :]
                ws_up = ws_up_next
            else:
                acc_up += tl.dot(a, bu, input_precision=DOT_PRECISION)
    return acc, acc_up


@triton.jit
def _gemv_load(rows, b_desc, b_row, k, k_mask, k0, WEIGHT_TMA: tl.constexpr):
    """One K step's weight tile W[rows, k] ([BLOCK_N, BLOCK_K], the weights' dtype)."""
    if WEIGHT_TMA:
        return b_desc.load([b_row, k0])  # [BN, BK]; columns past K come in as zeros
    return tl.load(rows + k[None, :], mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _gemv_product(a, w, s_rows, k0, SCALE_BN: tl.constexpr, SCALE_BK: tl.constexpr):
    """One K step's products a * w in float32, block-scaled where SCALE_BN > 0."""
    prod = a * w.to(tl.float32)
    if SCALE_BN > 0:
        prod = prod * tl.load(s_rows + k0 // SCALE_BK)[:, None]
    return prod


@triton.jit
def _dense_gemv_loop(a_row, live, b_base, b_desc, b_row, rn, N, K, k_lo, k_hi, stride_bn, s_base, stride_sn,
                     GATED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WEIGHT_TMA: tl.constexpr,
                     SCALE_BN: tl.constexpr = 0, SCALE_BK: tl.constexpr = 0, PREFETCH: tl.constexpr = False):
    """The GEMV form of _dense_mainloop's (a @ gate^T, a @ up^T) for a block of one pair (a_row:
    a scalar pointer to its row of activations, live: whether the block holds a pair):
    [1, BLOCK_N] each. The row loads as a [BLOCK_K] vector broadcast along the weight rows (at
    BLOCK_N 8-16 Triton 3.6 still moves it into the tile's layout through shared memory, a barrier
    a K step; at 4 it does not: the sweep weighs that). Rows of rn past N read row rn % N (loads
    need no row predicate) and are never stored; TMA tiles (WEIGHT_TMA) start at b_row as in the
    tile form.
    PREFETCH (MoEConfig.num_stages >= 2 in the GEMV form): the next K step's weight tiles are
    loaded before this step's products and carried in registers, so a program keeps two steps of
    its weight stream in flight (Triton software-pipelines only loads that feed tl.dot, so without
    this each step waits out its loads' latency); the same products in the same order."""
    rk = tl.arange(0, BLOCK_K)
    row = rn % N
    rows = b_base + row.to(tl.int64)[:, None] * stride_bn  # [BN, 1]
    rows_up = b_base + (row + N).to(tl.int64)[:, None] * stride_bn
    s_rows = s_base + (row // SCALE_BN).to(tl.int64) * stride_sn if SCALE_BN > 0 else s_base
    s_rows_up = s_base + ((row + N) // SCALE_BN).to(tl.int64) * stride_sn if SCALE_BN > 0 else s_base
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_live = tl.where(live, K, 0)  # a block without a pair reads no activations
    k_end = tl.minimum(k_hi, K)  # a prefetch past this split's K range loads nothing (pointer loads)
    if PREFETCH:
        w = _gemv_load(rows, b_desc, b_row, k_lo + rk, k_lo + rk < k_end, k_lo, WEIGHT_TMA)
        w_up = w
        if GATED:
            w_up = _gemv_load(rows_up, b_desc, b_row + N, k_lo + rk, k_lo + rk < k_end, k_lo, WEIGHT_TMA)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        a = tl.load(a_row + k, mask=k < k_live, other=0.0,
                    eviction_policy="evict_last").to(tl.float32)[None, :]  # every program of the pair reads it
        kn = k + BLOCK_K
        if PREFETCH:  # this step's tile was loaded a step ago; the next one's load goes out first
            cur = w
            w = _gemv_load(rows, b_desc, b_row, kn, kn < k_end, k0 + BLOCK_K, WEIGHT_TMA)
        else:
            cur = _gemv_load(rows, b_desc, b_row, k, k_mask, k0, WEIGHT_TMA)
        acc += _gemv_product(a, cur, s_rows, k0, SCALE_BN, SCALE_BK)
        if GATED:
            if PREFETCH:
                cur_up = w_up
                w_up = _gemv_load(rows_up, b_desc, b_row + N, kn, kn < k_end, k0 + BLOCK_K, WEIGHT_TMA)
            else:
                cur_up = _gemv_load(rows_up, b_desc, b_row + N, k, k_mask, k0, WEIGHT_TMA)
            acc_up += _gemv_product(a, cur_up, s_rows_up, k0, SCALE_BN, SCALE_BK)
    return tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :]
