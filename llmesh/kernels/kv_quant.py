"""FP8 (E4M3) KV cache: the quantization as @triton.jit helpers for the KV-write kernels and
the scale decoding for the attention kernels; the arithmetic of llmesh/kernels/kv_quant_ref.py (which
explains the layout and the choice of scales), bit for bit.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from llmesh.kernels.fp8_gemm import _to_e4m3
from llmesh.kernels.triton_helpers import cast_rtne

WIDEN_ENV = "LLMESH_FP8_WIDEN"
"""`asm` (default): E4M3 codes widen to bfloat16 by integer ops (`widen_e4m3`); `convert`:
Triton's conversion, for an A/B. Read when this module is imported."""
_WIDEN_ASM = tl.constexpr(os.environ.get(WIDEN_ENV, "asm") != "convert")

# E4M3 (s eeee mmm, bias 7) to bfloat16 (bias 127), four codes a call, without a conversion
# instruction: Triton converts through float16 and then float16 -> bfloat16 one value at a time
# (F2F, a quarter of the FMA rate), which at decode bandwidth costs more than the bytes an FP8
# pool saves. Here prmt puts each code byte in the high byte of a 16-bit half, a shift by 4 and
# a mask move its exponent and mantissa under bfloat16's (the sign stays), and one paired
# multiply by 2^120 rebiases the exponent: exact for every finite code, subnormals included
# (E4M3 has no infinities; its NaN code 0x7F would read 480, and the KV quantizer never writes it).
_E4M3_BF16_ASM = tl.constexpr("""{
    .reg .b32 t0, t1, s0, s1, m, z;
    mov.b32 m, 0x7B807B80;
    mov.b32 z, 0x80008000;
    prmt.b32 t0, $2, 0, 0x1404;
    prmt.b32 t1, $2, 0, 0x3424;
    shr.b32 s0, t0, 4;
    shr.b32 s1, t1, 4;
    and.b32 s0, s0, 0x07F007F0;
    and.b32 s1, s1, 0x07F007F0;
    lop3.b32 t0, t0, 0x80008000, s0, 0xEA;
    lop3.b32 t1, t1, 0x80008000, s1, 0xEA;
    fma.rn.bf16x2 $0, t0, m, z;
    fma.rn.bf16x2 $1, t1, m, z;
    }""")


@triton.jit
def widen_e4m3(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """An E4M3 tile as DTYPE (exact). bfloat16 on a GPU by the integer route above; float16
    (one paired hardware conversion already), float32 and the interpreter by Triton's cast."""
    if INTERPRET:
        out = x.to(DTYPE)
    elif DTYPE == tl.bfloat16 and _WIDEN_ASM:
        out = tl.inline_asm_elementwise(_E4M3_BF16_ASM, "=r,=r,r", [x.to(tl.uint8, bitcast=True)],
                                        dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        out = x.to(DTYPE)
    return out


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
        v = widen_e4m3(v, tl.bfloat16, INTERPRET)
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
