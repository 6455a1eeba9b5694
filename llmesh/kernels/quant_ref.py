"""Torch references of the packed-weight GEMMs, without Triton: the kernels are tested
against them, and the packed weights (services/engine/quant/packed.py) dequantize through
them, so the layouts' arithmetic is written once."""

from __future__ import annotations

import torch


def dequantize_int4_ref(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                        k: int) -> torch.Tensor:
    """W [K, N] in float32 from the Int4Weight layout (rows in the stored order)."""
    full = torch.cat([qweight & 0x0F, qweight >> 4], dim=0).float()  # [Kp, N]
    s = scales.float().repeat_interleave(group_size, 0)
    mn = mins.float().repeat_interleave(group_size, 0)
    return (full * s + mn)[:k]


def w4a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """Dequantize in float32, round W to x's dtype (as the torch backend's x @ W.to(x.dtype)),
    multiply in float32 and cast: [M, N] in x's dtype."""
    w = dequantize_int4_ref(qweight, scales, mins, group_size, x.shape[1]).to(x.dtype)
    return (x.float() @ w.float()).to(x.dtype)


def dequantize_int8_ref(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """W [K, N] in float32 from the Int8Weight layout."""
    return qweight.float() * scales.float().repeat_interleave(group_size, 0)


def w8a16_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The kernel's arithmetic in torch: [M, N] in x's dtype.

    Grouped: dequantize in float32, round W to x's dtype (as the torch backend's
    x @ W.to(x.dtype)), multiply in float32, cast. Per-channel: x @ q in float32 times the
    scale row, cast, like the kernel; this skips W's rounding, so in 16-bit it is closer to the
    exact product than the torch backend is (they differ by ~2^-9 of |x| |W| per term).
    """
    if group_size == qweight.shape[0]:
        return ((x.float() @ qweight.float()) * scales.float()).to(x.dtype)
    w = dequantize_int8_ref(qweight, scales, group_size).to(x.dtype)
    return (x.float() @ w.float()).to(x.dtype)
