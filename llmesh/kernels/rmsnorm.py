"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

With a residual, the kernel computes s = x + residual (rounded to the input dtype, as HF's
``hidden_states = residual + hidden_states`` does) and returns (rmsnorm(s), s), so a decoder
layer reads the hidden state once per norm instead of three times. The normalisation follows
`layers.RMSNorm`: float32 statistics, the normalised value cast to the input dtype, then
multiplied by the weight in the promoted dtype.

`rmsnorm_fp8` ends the same kernel with the per-token FP8 quantization of its output (the
input of an FP8 linear layer): the normalised row, rounded to its dtype as `rmsnorm` stores it,
is still in registers, so its absmax and E4M3 codes cost no second pass over memory, and the
codes and scale are bit for bit `quantize_fp8_per_token(rmsnorm(...))`'s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    check_last_dim_contiguous, check_out, check_size, check_tensor, interpreting, next_power_of_2, pdl_launch)
from llmesh.kernels.block_fp8_gemm import check_group, fp8_group_quantize, group_scales
from llmesh.kernels.fp8_gemm import FP8_DTYPE, SCALE_EPS_JIT, Fp8Rows, fp8_quantize, fp8_row_inverse, check_fp8_runnable
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

_MAX_HIDDEN = 65536  # one program holds a whole row in registers


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr,
    stride_x, stride_r, stride_o, stride_ro, stride_sg, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, FP8: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr, GROUP: tl.constexpr = 0,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < HIDDEN
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    in_dtype = x_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
        s = cast_rtne(x + r, in_dtype, INTERPRET)
        tl.store(res_out_ptr + row * stride_ro + c, s, mask=mask)
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
    normed = cast_rtne(x * rstd, in_dtype, INTERPRET).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if FP8:  # the row as rmsnorm stores it (weight in x's dtype), then quantized per token or group
        y = cast_rtne(w * normed, in_dtype, INTERPRET).to(tl.float32)
        if GROUP > 0:  # scales [M, groups] M-major (group_scales): row `row`'s group g at row + g * M
            groups = (HIDDEN + GROUP - 1) // GROUP
            q = fp8_group_quantize(y, scale_ptr + row, groups, stride_sg, BLOCK, GROUP, INTERPRET)
        else:
            q = fp8_quantize(y, fp8_row_inverse(tl.max(tl.abs(y), axis=0), scale_ptr + row, SCALE_EPS_JIT), INTERPRET)
        tl.store(out_ptr + row * stride_o + c, q, mask=mask)
    else:
        tl.store(out_ptr + row * stride_o + c, cast_rtne(w * normed, out_ptr.dtype.element_ty, INTERPRET),
                 mask=mask)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x: [..., H] with weight: [H].

    Without `residual` returns normed [..., H] (dtype: x's promoted with weight's, as
    `weight * x` in torch). With `residual` ([..., H], x's dtype) returns (normed, x + residual).
    `out` / `residual_out` are optional preallocated results.
    """
    return _launch(x, weight, eps, residual, out, residual_out, fp8=False)


def rmsnorm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                group: int = 0) -> tuple[Fp8Rows, torch.Tensor | None]:
    """(quantize_fp8_per_token(normed), x + residual or None) for x: [M, H] and weight: [H] in
    x's (16-bit) dtype: `rmsnorm` with the per-token FP8 quantization of its output fused in;
    with ``group`` (a power of two >= 16), quantize_fp8_per_group(normed, group)'s instead (the
    input of a block-scaled FP8 layer)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError("x must be a tensor [M, H]")
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
        raise ValueError(f"rmsnorm_fp8 takes 16-bit x and a weight of its dtype, got {x.dtype} and "
                         f"{getattr(weight, 'dtype', None)}")
    check_fp8_runnable(x.device)
    check_group(group)
    return _launch(x, weight, eps, residual, None, None, fp8=True, group=group)


def _launch(x, weight, eps, residual, out, residual_out, fp8: bool, group: int = 0):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor [..., H]")
    check_tensor("x", x, "[..., H]", x.dim())
    hidden = x.shape[-1]
    check_tensor("weight", weight, "[H]", 1, device=x.device)
    check_size("weight", "H", weight.shape[0], hidden, "x's last dimension")
    if not 0 < hidden <= _MAX_HIDDEN:
        raise ValueError(f"hidden size must be in 1..{_MAX_HIDDEN}, got {hidden}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    x2 = x.reshape(-1, hidden)
    out = check_out("out", out, tuple(x.shape), FP8_DTYPE if fp8 else torch.promote_types(x.dtype, weight.dtype),
                    x.device, contiguous=True)
    out2 = out.view(-1, hidden)
    if not fp8:
        scale = out2  # unused by the kernel
    elif group:
        scale = group_scales(x2.shape[0], -(-hidden // group), x.device)
    else:
        scale = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    if residual is not None:
        check_tensor("residual", residual, "[..., H]", x.dim(), (x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
        check_last_dim_contiguous("residual", residual)
        residual_out = check_out("residual_out", residual_out, tuple(x.shape), x.dtype, x.device, contiguous=True)
        r2, ro2 = residual.reshape(-1, hidden), residual_out.view(-1, hidden)
    else:
        r2 = ro2 = x2  # unused by the kernel
    if x2.shape[0]:
        block = max(next_power_of_2(hidden), group)
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out2, ro2, scale,
            x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0), scale.stride(-1), float(eps),
            HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, FP8=fp8, INTERPRET=interpreting(),
            GROUP=group, num_warps=max(1, min(16, block // 256)), **pdl_launch(x2.device)
        )
    if fp8:
        return Fp8Rows(out, scale), residual_out
    return out if residual is None else (out, residual_out)


def rmsnorm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The arithmetic of `layers.RMSNorm.forward`, after HF's residual add when one is given."""
    if residual is not None:
        x = x + residual
    x32 = x.to(torch.float32)
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)
