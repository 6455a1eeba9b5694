"""Write the new tokens' keys and values into the paged KV pool.

Token ``t`` goes to slot ``slot_mapping[t] = block * block_size + offset`` of both pools
``k_cache, v_cache: [num_blocks, block_size, H_kv, D]``. A negative slot marks a padding
token (a batch padded up to a CUDA-graph size) and is skipped. One program per token copies
all its heads, so a launch is T programs of H_kv * D elements each.

An FP8 pool (float8_e4m3fn, with ``k_scales, v_scales: [num_blocks, block_size, H_kv]``
exponents beside it) is quantized on store, per token and head (llmesh/kernels/kv_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    INDEX_DTYPES, check_last_dim_contiguous, check_size, check_tensor, interpreting, next_power_of_2, pdl_launch)
from llmesh.kernels.kv_quant import quantize_kv_tile
from llmesh.kernels.kv_quant_ref import POOL_DTYPES, check_kv_scales
from llmesh.kernels.paged_attention import write_kv_ref
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # The slot test is broadcast as a tensor: Triton 3.9's interpreter rejects a scalar & tensor mask.
    mask = (h[:, None] < NUM_HEADS) & (d[None, :] < HEAD_DIM) & (h[:, None] * 0 + slot >= 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    # k, v: [BLOCK_H, BLOCK_D] tiles of one token's heads
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0).to(tl.float32)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kcs + h[:, None] * stride_kch + d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vcs + h[:, None] * stride_vch + d[None, :]
    if FP8:
        kq, ke = quantize_kv_tile(k, INTERPRET)
        vq, ve = quantize_kv_tile(v, INTERPRET)
        tl.store(k_dst, kq, mask=mask)
        tl.store(v_dst, vq, mask=mask)
        # scales: [num_blocks, block_size, H_kv] contiguous, so a slot's heads are adjacent
        h_mask = (h < NUM_HEADS) & (h * 0 + slot >= 0)
        tl.store(k_scale_ptr + slot * NUM_HEADS + h, ke.to(tl.uint8), mask=h_mask)
        tl.store(v_scale_ptr + slot * NUM_HEADS + h, ve.to(tl.uint8), mask=h_mask)
    else:
        tl.store(k_dst, cast_rtne(k, k_cache_ptr.dtype.element_ty, INTERPRET), mask=mask)
        tl.store(v_dst, cast_rtne(v, v_cache_ptr.dtype.element_ty, INTERPRET), mask=mask)


def kv_cache_write(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> None:
    """Store k, v: [T, H_kv, D] into the pools at slot_mapping: [T] (negative slots skipped);
    an FP8 pool takes its scale pools k_scales, v_scales: [num_blocks, block_size, H_kv] uint8.

    Same argument order as `write_kv_ref`, so the GPU backend swaps one for the other.
    """
    check_tensor("k_cache", k_cache, "[num_blocks, block_size, H_kv, D]", 4, POOL_DTYPES)
    num_blocks, block_size, h_kv, d = k_cache.shape
    device = k_cache.device
    check_tensor("v_cache", v_cache, "[num_blocks, block_size, H_kv, D]", 4, POOL_DTYPES, device=device)
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    check_tensor("k", k, "[T, H_kv, D]", 3, device=device)
    check_tensor("v", v, "[T, H_kv, D]", 3, device=device)
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    check_size("k", "H_kv", k.shape[1], h_kv, "the pool's KV heads")
    check_size("k", "D", k.shape[2], d, "the pool's head_dim")
    check_tensor("slot_mapping", slot_mapping, "[T]", 1, INDEX_DTYPES, device=device)
    check_size("slot_mapping", "T", slot_mapping.shape[0], k.shape[0], "one slot per token of k")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    fp8 = check_kv_scales(k_cache, k_scales, v_scales)
    slot_mapping = slot_mapping.contiguous()
    if k.shape[0] == 0:
        return
    _kv_cache_write_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, k_scales if fp8 else k_cache, v_scales if fp8 else v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=h_kv, HEAD_DIM=d, BLOCK_H=next_power_of_2(h_kv), BLOCK_D=next_power_of_2(d),
        BLOCK_SIZE=block_size, FP8=fp8, INTERPRET=interpreting(), **pdl_launch(k.device)
    )


def kv_cache_write_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> None:
    """`write_kv_ref` restricted to the non-negative slots (torch would wrap -1 to the last slot)."""
    keep = slot_mapping >= 0
    write_kv_ref(k_cache, v_cache, k[keep], v[keep], slot_mapping[keep], k_scales, v_scales)
