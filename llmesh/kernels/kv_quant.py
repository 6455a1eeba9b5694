"""FP8 (E4M3) KV cache: the quantization as @triton.jit helpers for the KV-write kernels and
the scale decoding for the attention kernels; the arithmetic of llmesh/kernels/kv_quant_ref.py (which
explains the layout and the choice of scales), bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmesh.kernels.fp8_gemm import _to_e4m3
from llmesh.kernels.triton_helpers import cast_rtne


@triton.jit
def exponent_to_scale(e):
    """int32 biased exponents → float32 scales 2^(e - 127) (bit construction, exact)."""
    return (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp8_pv_operands(p, vs, v, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr):
    """Operands of the P·V dot over an FP8 value tile: p: [M, N] float32 probabilities times the
    value scales vs: [N], and v: [N, D] E4M3 codes.

    In float32 when the kernel's dots run in float32; otherwise in bfloat16 whatever the model's
    dtype, because p * vs takes the magnitude of the value vectors (a vector of absmax 0.03 has
    scale 2^-14): float16 holds that only as subnormals (a 46% error at value std 0.01), while
    bfloat16 has float32's exponent range and holds every E4M3 code exactly; its 8-bit
    mantissa rounds p by 2^-9 at most, far below E4M3's own 2^-4. The interpreter cannot
    multiply bfloat16 (see triton_helpers), so there the bfloat16-rounded operands go to a
    float32 dot: the same products, accumulated in float32 as the GPU's dot units do.
    """
    # One return: Triton's code generator goes on past a return inside a constexpr branch,
    # and a second return of other types fails to compile.
    pv = p * vs[None, :]
    if DOT_F32:
        v = v.to(tl.float32)
    elif INTERPRET:
        pv = cast_rtne(pv, tl.bfloat16, INTERPRET).to(tl.float32)
        v = v.to(tl.float32)
    else:
        pv = pv.to(tl.bfloat16)
        v = v.to(tl.bfloat16)
    return pv, v


@triton.jit
def kv_exponent(amax):
    """[BLOCK_H] float32 absmax → [BLOCK_H] int32 biased exponents, as `kv_scale_exponent_ref`."""
    bits = amax.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    e = exp - 8 + (mant > 0x600000).to(tl.int32)
    return tl.minimum(tl.maximum(e, 1), 253)


@triton.jit
def kv_quantize(x, e, INTERPRET: tl.constexpr):
    """x: [BLOCK_H, BLOCK_X] float32 scaled by 2^(127 - e[:, None]), saturated, cast to E4M3."""
    inv = exponent_to_scale(254 - e)
    q = tl.minimum(tl.maximum(x * inv[:, None], -448.0), 448.0)
    return _to_e4m3(q, INTERPRET)


@triton.jit
def quantize_kv_tile(x, INTERPRET: tl.constexpr):
    """x: [BLOCK_H, BLOCK_D] float32 (padding lanes 0) → (E4M3 tile, [BLOCK_H] int32 exponents),
    the arithmetic of `quantize_kv_ref`."""
    e = kv_exponent(tl.max(tl.abs(x), axis=1))
    return kv_quantize(x, e, INTERPRET), e
