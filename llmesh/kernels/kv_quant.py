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
"""`asm` (default): the integer route of `widen_e4m3`; `convert`: Triton's E4M3 -> bfloat16
conversion (the reference route, for an A/B). Read when this module is imported."""
WIDEN_ROUTE = "convert" if os.environ.get(WIDEN_ENV) == "convert" else "asm"
_WIDEN_ASM = tl.constexpr(WIDEN_ROUTE == "asm")

# E4M3 (s eeee mmm, bias 7) to bfloat16 (bias 127), four codes a call, without a conversion
# instruction. Why: Triton (3.6-3.9) converts through float16 and then float16 -> bfloat16 one
# value at a time (cvt.bf16.f16, an F2F: a quarter of the FMA rate), and an FP8 pool's decode
# attention measured slower than a bf16 pool's (kv_fp8_h200.json: 0.82x at 64 x 4096 tokens),
# which points at the conversion rather than the halved bytes. Here prmt puts each code byte in
# the high byte of a 16-bit half, a shift by 4 and a mask move its exponent and mantissa under
# bfloat16's (the sign stays), and one paired multiply by 2^120 rebiases the exponent: exact for
# every finite code, subnormals included (checked for all 256 codes by emulating these integer
# ops; E4M3 has no infinities, its NaN code 0x7F would read 480, and the KV quantizer never
# writes it). On the H200 the FP8 attention and engine tests pass with it, and the FP8 pool's
# decode attention is 1.07x faster at 64 x 4096 tokens and 1.05x at 256 x 256 than with the
# conversion (kv_fp8_h200_widen.json against kv_fp8_h200_convert.json). The conversion was a
# part of the gap to a bf16 pool, not most of it: that was the V tile's byte-wise gather
# (`_widen_e4m3_asm`'s IN_PLACE; docs/quantization.md, "FP8 KV cache").
E4M3_FIELD_MASK = 0x07F007F0
"""Exponent and mantissa of two codes once shifted under bfloat16's fields."""
SIGN_MASK = 0x80008000
BF16_TWO_POW_120 = 0x7B80
"""bfloat16 2^120: E4M3's bias 7 against bfloat16's 127."""
_E4M3_BF16_ASM = tl.constexpr(f"""{{
    .reg .b32 t0, t1, s0, s1, m, z;
    mov.b32 m, {BF16_TWO_POW_120 * 0x10001:#010x};
    mov.b32 z, {SIGN_MASK:#010x};
    prmt.b32 t0, $2, 0, 0x1404;
    prmt.b32 t1, $2, 0, 0x3424;
    shr.b32 s0, t0, 4;
    shr.b32 s1, t1, 4;
    and.b32 s0, s0, {E4M3_FIELD_MASK:#010x};
    and.b32 s1, s1, {E4M3_FIELD_MASK:#010x};
    lop3.b32 t0, t0, {SIGN_MASK:#010x}, s0, 0xEA;
    lop3.b32 t1, t1, {SIGN_MASK:#010x}, s1, 0xEA;
    fma.rn.bf16x2 $0, t0, m, z;
    fma.rn.bf16x2 $1, t1, m, z;
    }}""")


def widen_e4m3_bits_ref(codes):
    """The integer route of `_E4M3_BF16_ASM` on a torch uint8 tensor of codes, one code a 16-bit
    half: the bfloat16 bits before the multiply by 2^120 (the asm does two halves a 32-bit word;
    the shift moves the high half's low bits only into the masked-out bits of the low half)."""
    import torch

    t = codes.to(torch.int32) << 8  # prmt: the byte in the high byte of its half
    return ((t & (SIGN_MASK & 0xFFFF)) | ((t >> 4) & (E4M3_FIELD_MASK & 0xFFFF))).to(torch.int16)


@triton.jit
def _widen_e4m3_asm(x, IN_PLACE: tl.constexpr = False):
    """E4M3 tile -> bfloat16 by `_E4M3_BF16_ASM` (GPU only: the interpreter runs no asm).

    IN_PLACE marks the asm impure, so Triton widens the tile in the layout it was loaded in
    rather than moving the widening after the load into the dot's operand layout. For the V
    tile of P.V that move is what costs: the MMA wants 4 consecutive keys of one column in a
    register, the tile is column-contiguous, and Hopper has no transposing ldmatrix for bytes,
    so the operand is gathered a byte at a time (64 ld.shared.b8 a thread a step at 64 x 128).
    Widened first, the bf16 tile takes the 16-bit route (ldmatrix .trans) as a bf16 pool's does.
    The K tile is dimension-contiguous, its operand's K dimension, so it is left to move."""
    return tl.inline_asm_elementwise(_E4M3_BF16_ASM, "=r,=r,r", [x.to(tl.uint8, bitcast=True)],
                                     dtype=tl.bfloat16, is_pure=not IN_PLACE, pack=4)


@triton.jit
def widen_e4m3(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr, IN_PLACE: tl.constexpr = False):
    """An E4M3 tile as DTYPE (exact). bfloat16 on a GPU by the integer route above unless
    LLMESH_FP8_WIDEN=convert; otherwise (and for float16, one paired hardware conversion already,
    float32 and the interpreter) Triton's cast. IN_PLACE: see `_widen_e4m3_asm`."""
    # Nested, not `and`: Triton 3.6 has evaluated a compound test of constexprs as true when it
    # was not (fused_moe_int4._nibbles), which here would take the asm route in the interpreter.
    if INTERPRET:
        out = x.to(DTYPE)
    elif DTYPE == tl.bfloat16:
        if _WIDEN_ASM:
            out = _widen_e4m3_asm(x, IN_PLACE)
        else:
            out = x.to(DTYPE)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def exponent_to_scale(e):
    """int32 biased exponents → float32 scales 2^(e - 127) (bit construction, exact)."""
    return (e.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def scale_codes(k_scale_ptr, v_scale_ptr, blocks, n, end, kv_head, BLOCK_SIZE: tl.constexpr,
                NUM_KV_HEADS: tl.constexpr):
    """The K and V scale codes ([BLOCK_N] uint8, from scale pools [num_blocks, block_size, H_kv])
    of keys n, whose block-table entries are `blocks` (0 past `end`)."""
    sc = (blocks.to(tl.int64) * BLOCK_SIZE + n % BLOCK_SIZE) * NUM_KV_HEADS + kv_head
    return (tl.load(k_scale_ptr + sc, mask=n < end, other=0),
            tl.load(v_scale_ptr + sc, mask=n < end, other=0))


# The scales are 1-byte gathers through the block table: too narrow for Triton to pipeline, so
# loaded in the step that uses them they cost two dependent global latencies a step (the table
# entry, then the scale). The attention loops over an FP8 pool carry them instead: step i uses
# the codes loaded in step i - 1, issues those of step i + 1 (from table entries loaded in step
# i - 1) and the table entries of step i + 2. Masks use the loop's `end`, so a loop that stops
# early (or a second loop continuing the first's tiles) reads nothing past it.
@triton.jit
def scale_carry_init(k_scale_ptr, v_scale_ptr, table, n, end, kv_head, BLOCK_N: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
    """The carry before a loop whose first tile is keys n: (K codes, V codes) of that tile and
    the block-table entries of the next."""
    blocks = tl.load(table + n // BLOCK_SIZE, mask=n < end, other=0)
    ks, vs = scale_codes(k_scale_ptr, v_scale_ptr, blocks, n, end, kv_head, BLOCK_SIZE, NUM_KV_HEADS)
    blocks_next = tl.load(table + (n + BLOCK_N) // BLOCK_SIZE, mask=n + BLOCK_N < end, other=0)
    return ks, vs, blocks_next


@triton.jit
def scale_carry_step(k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, end, kv_head,
                     BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
    """At the tile of keys n: (its K codes, its V codes, the carry for the next tile)."""
    ks_codes, vs_codes = ks_next, vs_next
    ks_next, vs_next = scale_codes(k_scale_ptr, v_scale_ptr, blocks_next, n + BLOCK_N, end, kv_head, BLOCK_SIZE,
                                   NUM_KV_HEADS)
    n3 = n + 2 * BLOCK_N
    blocks_next = tl.load(table + n3 // BLOCK_SIZE, mask=n3 < end, other=0)  # int32 until used
    return ks_codes, vs_codes, ks_next, vs_next, blocks_next


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
        v = widen_e4m3(v, tl.bfloat16, INTERPRET, IN_PLACE=True)
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
