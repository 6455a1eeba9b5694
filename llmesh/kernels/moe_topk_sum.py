"""The top-k sum of the fused MoE layer: each token's k weighted expert rows added into one.

Three forms of one sum, all in slot order in float32 and rounded once, so they agree bit for bit
(deterministic: no floating-point atomics):

- ``moe_sum`` (``_moe_sum_kernel``): a launch after the down GEMM over its [T, k, H] rows.
- ``_slot_sum``: inside the down GEMM of a one-token step (one pair a block).
- ``_token_sum``: inside the down GEMM at any batch; the last of a token's k pairs to arrive at a
  column tile sums them (fused_moe.TOKEN_SUM_ON_CUDA decides where it runs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import check_last_dim_contiguous, interpreting, pdl_launch
from llmesh.kernels.split_k import arrive
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

TOKEN_SUM_SLOTS = 1 << 20
"""Counters of the fused top-k sum (one per token and column tile of the down GEMM: 16 tiles at
BLOCK_N 128 cover 65,536 tokens); a larger step sums with _moe_sum_kernel."""


@triton.jit
def _slot_sum(rows, part_ptr, lock_ptr, out_ptr, pair, m_mask, rn, n_mask, N, tile, SLOTS: tl.constexpr,
              INTERPRET: tl.constexpr):
    """One token's top-k sum inside the down GEMM (one pair a block): each program stores its
    pair's weighted row (rounded, as the [T, k, H] rows _moe_sum_kernel reads) into part [k, N];
    the last of the k to arrive at this column tile sums them in slot order in float32, rounds
    once, writes out [1, N] and resets the tile's counter: _moe_sum_kernel's result, bit for bit,
    without its launch."""
    tl.store(part_ptr + pair.to(tl.int64)[:, None] * N + rn[None, :], rows.to(tl.float32),
             mask=m_mask[:, None] & n_mask[None, :])
    if arrive(lock_ptr, tile) == SLOTS - 1:
        total = tl.zeros(rn.shape, dtype=tl.float32)
        for j in tl.static_range(SLOTS):
            total += tl.load(part_ptr + j * N + rn, mask=n_mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + rn, cast_rtne(total, out_ptr.dtype.element_ty, INTERPRET), mask=n_mask)
        tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch on this stream


@triton.jit
def _token_sum(rows, out_ptr, sum_ptr, lock_ptr, pair, m_mask, rn, n_mask, N, stride_om, tile, num_tiles,
               SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr):
    """The top-k sum inside the down GEMM at any batch: the tile's weighted rows go to out
    [T * k, N] as _moe_sum_kernel reads them; each row then arrives at its token's counter for this
    column tile, and the last of the token's k pairs sums their rows in slot order in float32,
    rounds once, writes sum [T, N] and resets the counter: _moe_sum_kernel's result, bit for bit,
    without its launch or its read of every row after the GEMM. A block holds one expert, so a token
    has one row in it, except in the run of other ranks' pairs, whose lanes' atomics still count
    one arrival each."""
    tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_om + rn[None, :], rows,
             mask=m_mask[:, None] & n_mask[None, :])
    tl.debug_barrier()  # every thread's rows are stored before the releases below
    token = pair // SLOTS
    counter = lock_ptr + token * num_tiles + tile
    last = (tl.atomic_add(counter, 1, mask=m_mask, sem="acq_rel") == SLOTS - 1) & m_mask
    if tl.max(last.to(tl.int32), axis=0) > 0:  # a program that finished no token issues no loads
        total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(SLOTS):
            slot = (token * SLOTS + j).to(tl.int64)
            total += tl.load(out_ptr + slot[:, None] * stride_om + rn[None, :],
                             mask=last[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(sum_ptr + token.to(tl.int64)[:, None] * N + rn[None, :],
                 cast_rtne(total, sum_ptr.dtype.element_ty, INTERPRET), mask=last[:, None] & n_mask[None, :])
        tl.atomic_xchg(counter, 0, mask=last)  # ready for the next launch on this stream


@triton.jit
def _moe_sum_kernel(src_ptr, out_ptr, H, stride_st, stride_sk, stride_ot,
                    K: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = h < H
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in tl.static_range(K):
        acc += tl.load(src_ptr + t * stride_st + j * stride_sk + h, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + h, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


def moe_sum(src: torch.Tensor) -> torch.Tensor:
    """[T, k, H] → [T, H]: each token's k rows summed in float32 in slot order, rounded once."""
    t, k, h = src.shape
    out = torch.empty(t, h, dtype=src.dtype, device=src.device)
    if t == 0:
        return out
    check_last_dim_contiguous("src", src)
    block_h = min(1024, triton.next_power_of_2(h)) if not interpreting() else min(64, triton.next_power_of_2(h))
    _moe_sum_kernel[(t, triton.cdiv(h, block_h))](src, out, h, src.stride(0), src.stride(1), out.stride(0),
                                                  K=k, BLOCK_H=block_h, INTERPRET=interpreting(),
                                                  num_warps=4 if not interpreting() else 1, **pdl_launch(src.device))
    return out
