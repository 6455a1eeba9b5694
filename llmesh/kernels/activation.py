"""SiLU-and-mul: the gated activation of a Llama MLP on a fused gate/up projection.

x: [..., 2 * I] holds gate then up; the result is silu(gate) * up: [..., I]. The kernel
rounds where torch does (silu's result to the input dtype, then the product), so it matches
`SiluAndMulMLP` in layers.py, which computes silu(gate_proj(x)) * up_proj(x) in the model dtype.

`silu_and_mul_fp8` hands the product to an FP8 down projection already quantized per token:
one program a row, so the bf16 product is never written and re-read; bit for bit
`quantize_fp8_per_token(silu_and_mul(x))`. A row of up to ONE_PASS_MAX products is held in
registers (16 warps) and loaded once; a longer one is walked twice in blocks (the products for
the absmax, then again for the codes). The walk is latency bound with one program: at batch 1
on the H200 the two-pass version over Llama-3-8B's 14,336 made the FP8 decode step 11% slower
than the separate kernels (quant_h200_fp8_unfused.json against quant_h200_fbgemm_large.json).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (check_last_dim_contiguous, check_out, check_tensor, interpreting,
                                   next_power_of_2, pdl_launch)
from llmesh.kernels.block_fp8_gemm import check_group, fp8_group_quantize, group_scales
from llmesh.kernels.fp8_gemm import FP8_DTYPE, SCALE_EPS_JIT, Fp8Rows, fp8_quantize, fp8_row_inverse, check_fp8_runnable
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

_BLOCK = 1024
ONE_PASS_MAX = 16384
"""Longest row silu_and_mul_fp8 holds in registers (32 products a thread at 16 warps)."""


@triton.jit
def _silu_mul(x_row, c, mask, INTER: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """silu(gate) * up at columns c of one row, rounded to DTYPE where torch rounds (float32 out)."""
    gate = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + INTER + c, mask=mask, other=0.0).to(tl.float32)
    act = cast_rtne(gate * tl.sigmoid(gate), DTYPE, INTERPRET).to(tl.float32)
    return cast_rtne(act * up, DTYPE, INTERPRET).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(
    x_ptr, xq_ptr, scale_ptr, stride_x, stride_q, stride_sg, INTER: tl.constexpr, BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr, GROUP: tl.constexpr = 0,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + t * stride_x
    dtype = x_ptr.dtype.element_ty
    if GROUP > 0:  # per-group scales [M, groups] M-major: each BLOCK (a multiple of GROUP) quantized as it is made
        groups = (INTER + GROUP - 1) // GROUP
        for c0 in range(0, INTER, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            y = _silu_mul(x_row, c, c < INTER, INTER, dtype, INTERPRET)
            q = fp8_group_quantize(y, scale_ptr + t + (c0 // GROUP) * stride_sg, groups - c0 // GROUP, stride_sg,
                                   BLOCK, GROUP, INTERPRET)
            tl.store(xq_ptr + t * stride_q + c, q, mask=c < INTER)
    elif BLOCK >= INTER:  # the whole row in registers: one load
        c = tl.arange(0, BLOCK)
        y = _silu_mul(x_row, c, c < INTER, INTER, dtype, INTERPRET)
        inv = fp8_row_inverse(tl.max(tl.abs(y), axis=0), scale_ptr + t, SCALE_EPS_JIT)
        tl.store(xq_ptr + t * stride_q + c, fp8_quantize(y, inv, INTERPRET), mask=c < INTER)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, INTER, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(_silu_mul(x_row, c, c < INTER, INTER, dtype, INTERPRET)))
        inv = fp8_row_inverse(tl.max(amax, axis=0), scale_ptr + t, SCALE_EPS_JIT)
        for c0 in range(0, INTER, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            y = _silu_mul(x_row, c, c < INTER, INTER, dtype, INTERPRET)
            tl.store(xq_ptr + t * stride_q + c, fp8_quantize(y, inv, INTERPRET), mask=c < INTER)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < INTER
    dtype = out_ptr.dtype.element_ty
    y = _silu_mul(x_ptr + t * stride_x, c, mask, INTER, dtype, INTERPRET)
    tl.store(out_ptr + t * stride_o + c, y.to(dtype), mask=mask)  # exact: y is rounded to dtype already


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x: [..., 2 * I]; returns (or fills `out`) [..., I]."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [..., 2 * I]")
    check_tensor("x", x, "[..., 2 * I]", x.dim())
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even (gate and up halves), got {x.shape[-1]}")
    check_last_dim_contiguous("x", x)
    inter = x.shape[-1] // 2
    out = check_out("out", out, (*x.shape[:-1], inter), x.dtype, x.device, contiguous=True)
    x2, out2 = x.reshape(-1, 2 * inter), out.view(-1, inter)
    if x2.shape[0] == 0 or inter == 0:
        return out
    grid = (x2.shape[0], triton.cdiv(inter, _BLOCK))
    _silu_and_mul_kernel[grid](
        x2, out2, x2.stride(0), out2.stride(0), INTER=inter, BLOCK=_BLOCK, INTERPRET=interpreting(),
        **pdl_launch(x2.device))
    return out


def silu_and_mul_fp8(x: torch.Tensor, group: int = 0) -> Fp8Rows:
    """quantize_fp8_per_token(silu_and_mul(x)) for a 16-bit x: [M, 2 * I], in one kernel; with
    ``group`` (a power of two >= 16) quantize_fp8_per_group(silu_and_mul(x), group)'s instead (the
    input of a block-scaled FP8 down projection), in one pass."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a tensor [M, 2 * I]")
    check_tensor("x", x, "[M, 2 * I]", 2, (torch.float16, torch.bfloat16))
    if x.shape[-1] % 2 or x.shape[-1] == 0:
        raise ValueError(f"x's last dimension must be even and positive (gate and up halves), got {x.shape[-1]}")
    check_last_dim_contiguous("x", x)
    check_fp8_runnable(x.device)
    check_group(group)
    m, inter = x.shape[0], x.shape[-1] // 2
    xq = torch.empty(m, inter, dtype=FP8_DTYPE, device=x.device)
    if group:
        scale = group_scales(m, -(-inter // group), x.device)
    else:
        scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = next_power_of_2(inter) if inter <= ONE_PASS_MAX else _BLOCK
        block = max(block, group)
        _silu_and_mul_fp8_kernel[(m,)](x, xq, scale, x.stride(0), xq.stride(0), scale.stride(-1), INTER=inter,
                                       BLOCK=block, INTERPRET=interpreting(),
                                       num_warps=max(4, min(16, block // 1024)), GROUP=group, **pdl_launch(x.device))
    return Fp8Rows(xq, scale)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :inter]) * x[..., inter:]
