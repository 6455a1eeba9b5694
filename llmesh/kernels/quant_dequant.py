"""Expanding a packed weight to a dense [K, N] matrix on the device, for large batches.

At prefill sizes (thousands of tokens) a GEMM is compute bound: the fastest path is to
expand the 4- or 8-bit weight once into x's dtype (one read of the codes, one write of the
dense matrix) and hand it to cuBLAS, as vLLM does for AWQ above 256 tokens. Decode sizes
keep the fused kernels (w4a16_gemm / w8a16_gemm), where the weight is read once and never
written. Layouts: services/engine/quant/packed.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import check_tensor, interpreting
from llmesh.kernels.triton_helpers import cast_rtne

BLOCK_ROWS, BLOCK_COLS = 32, 128


@triton.jit
def _dequant_int4_kernel(q_ptr, s_ptr, mn_ptr, w_ptr, K, N, HALF, GROUP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    j = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)          # byte rows
    n = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = n < N
    mask = (j < HALF)[:, None] & n_mask[None, :]
    packed = tl.load(q_ptr + j.to(tl.int64)[:, None] * N + n[None, :], mask=mask, other=0)
    w_dtype = w_ptr.dtype.element_ty
    for half in tl.static_range(2):
        k = j + half * HALF
        g = k // GROUP
        s = tl.load(s_ptr + g.to(tl.int64)[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
        mn = tl.load(mn_ptr + g.to(tl.int64)[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
        q = (packed >> (4 * half)) & 0xF
        w = q.to(tl.float32) * s + mn
        tl.store(w_ptr + k.to(tl.int64)[:, None] * N + n[None, :], cast_rtne(w, w_dtype, INTERPRET),
                 mask=mask & (k < K)[:, None])


@triton.jit
def _dequant_int8_kernel(q_ptr, s_ptr, w_ptr, K, N, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    k = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    n = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (k < K)[:, None] & (n < N)[None, :]
    q = tl.load(q_ptr + k.to(tl.int64)[:, None] * N + n[None, :], mask=mask, other=0)
    g = k // GROUP
    s = tl.load(s_ptr + g.to(tl.int64)[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + k.to(tl.int64)[:, None] * N + n[None, :],
             cast_rtne(q.to(tl.float32) * s, w_ptr.dtype.element_ty, INTERPRET), mask=mask)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int, k: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Int4Weight → W [K, N] in ``dtype`` (q*s+m in float32, then rounded)."""
    check_tensor("qweight", qweight, "[Kp/2, N]", 2, (torch.uint8,))
    half, n = qweight.shape
    if not 0 < k <= 2 * half or scales.shape != (2 * half // group_size, n) or mins.shape != scales.shape:
        raise ValueError(f"Int4Weight tensors do not fit: qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)}, mins {tuple(mins.shape)}, group {group_size}, K {k}")
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(half, BLOCK_ROWS), triton.cdiv(n, BLOCK_COLS))
    _dequant_int4_kernel[grid](qweight.contiguous(), scales.contiguous(), mins.contiguous(), w, k, n, half,
                               GROUP=group_size, BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, INTERPRET=interpreting())
    return w


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Int8Weight → W [K, N] in ``dtype``."""
    check_tensor("qweight", qweight, "[K, N]", 2, (torch.int8,))
    k, n = qweight.shape
    if k % group_size or scales.shape != (k // group_size, n):
        raise ValueError(f"Int8Weight tensors do not fit: qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)}, group {group_size}")
    w = torch.empty(k, n, dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(k, BLOCK_ROWS), triton.cdiv(n, BLOCK_COLS))
    _dequant_int8_kernel[grid](qweight.contiguous(), scales.contiguous(), w, k, n, GROUP=group_size,
                               BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS, INTERPRET=interpreting())
    return w
