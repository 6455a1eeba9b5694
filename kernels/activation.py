"""SiLU-and-mul: the gated activation of a Llama MLP on a fused gate/up projection.

x: [..., 2 * I] holds gate then up; the result is silu(gate) * up: [..., I]. The kernel
rounds where torch does (silu's result to the input dtype, then the product), so it matches
`SiluAndMulMLP` in layers.py, which computes silu(gate_proj(x)) * up_proj(x) in the model dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import check_last_dim_contiguous, check_out, check_tensor, interpreting, pdl_launch
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

_BLOCK = 1024


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
    gate = tl.load(x_ptr + t * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_x + INTER + c, mask=mask, other=0.0).to(tl.float32)
    act = cast_rtne(gate * tl.sigmoid(gate), dtype, INTERPRET).to(tl.float32)
    tl.store(out_ptr + t * stride_o + c, cast_rtne(act * up, dtype, INTERPRET), mask=mask)


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


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :inter]) * x[..., inter:]
