"""FP8 (E4M3) KV cache: the quantization as @triton.jit helpers for the KV-write kernels and
the scale decoding for the attention kernels; the arithmetic of kernels/kv_quant_ref.py (which
explains the layout and the choice of scales), bit for bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmesh.kernels.fp8_gemm import _to_e4m3


@triton.jit
def exponent_to_scale(e):
    """int32 biased exponents → float32 scales 2^(e - 127) (bit construction, exact)."""
    return (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)


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
