"""The epilogue the fused MoE GEMMs share (fused_moe.py's grouped GEMM and
fused_moe_persistent.py's down GEMM): a tile's float32 sums to its output rows, rounded where the
torch reference rounds."""

from __future__ import annotations

import triton
import triton.language as tl

from llmesh.kernels.triton_helpers import cast_rtne


@triton.jit
def _epilogue_rows(acc, acc_up, s_base, topk_w_ptr, out_ptr, pair, m_mask, rn, n_mask, N, GATED: tl.constexpr,
                   MUL_WEIGHT: tl.constexpr, SCALED: tl.constexpr, INTERPRET: tl.constexpr):
    """The tile's output rows in out's dtype from its float32 sums: INT8/FP8 scales,
    SiLU-and-mul (gated), the routing weight (down), rounded where the reference rounds."""
    out_dtype = out_ptr.dtype.element_ty

    if SCALED:
        acc = acc * tl.load(s_base + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(s_base + N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Round where the reference rounds (each op's output in the activation dtype).
    acc = cast_rtne(acc, out_dtype, INTERPRET).to(tl.float32)
    if GATED:
        up = cast_rtne(acc_up, out_dtype, INTERPRET).to(tl.float32)
        act = cast_rtne(acc * tl.sigmoid(acc), out_dtype, INTERPRET).to(tl.float32)
        acc = act * up
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    return cast_rtne(acc, out_dtype, INTERPRET)
