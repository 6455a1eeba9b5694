"""The INT4 experts' K loop of the fused MoE GEMMs (fused_moe.py's INT4 path).

Codes in the halves layout of an Int4Weight (byte (j, n) holds rows j and j + Kp / 2), float16
scales and mins per group of each output column, w = q * scale + min. A K step walks both
halves at once (one group of each) and widens the codes to exact small integers in the dot
type. Where the scales go depends on the tile:

- decode tiles (BLOCK_M < 64, a few rows an expert): the codes feed tl.dot and each column's
  scale and min are applied to the product, a @ (q s + z) = (a @ q) s + rowsum(a) z, so no
  per-weight arithmetic follows the widening (and the weights are not rounded, where the
  reference rounds each dequantized weight to the activation dtype);
- prefill tiles: each weight widened to q s + z, rounded as the reference does, and
  accumulated in place by tl.dot (a scale applied after each step's product would take
  wgmma's accumulator out of the loop).

Triton pipelines the code and activation tiles but not the scale and min rows, which feed
arithmetic: they are loaded one K step ahead and carried (docs/moe.md, bench/ttgir_audit.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from llmesh.kernels.triton_helpers import cast_rtne


# Marlin's exponent trick, two codes a 32-bit op: a code q in the low mantissa bits of a
# 16-bit float whose exponent makes the mantissa's last bit worth 1 (128.0 in bfloat16, 1024.0
# in float16) is that float plus q, so an and-or and a paired subtraction widen two codes,
# where a conversion instruction (a quarter of the FMA rate) would widen one.
_NIBBLE_MAGIC = {"bf16": ("0x43004300", "bf16x2"), "fp16": ("0x64006400", "f16x2")}


def _nibbles_asm(kind: str) -> str:
    magic, op = _NIBBLE_MAGIC[kind]
    # $4 holds four code bytes; prmt spreads bytes 0, 1 (2, 3) into the two 16-bit halves of
    # t0 (t1); $0, $1 get their low nibbles widened, $2, $3 the high ones (shifted down first).
    return f"""{{
    .reg .b32 t0, t1, h0, h1, m;
    mov.b32 m, {magic};
    prmt.b32 t0, $4, 0, 0x4140;
    prmt.b32 t1, $4, 0, 0x4342;
    shr.b32 h0, t0, 4;
    shr.b32 h1, t1, 4;
    lop3.b32 t0, t0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 t1, t1, 0x000F000F, {magic}, 0xEA;
    lop3.b32 h0, h0, 0x000F000F, {magic}, 0xEA;
    lop3.b32 h1, h1, 0x000F000F, {magic}, 0xEA;
    sub.{op} $0, t0, m;
    sub.{op} $1, t1, m;
    sub.{op} $2, h0, m;
    sub.{op} $3, h1, m;
    }}"""


_NIBBLES_BF16 = tl.constexpr(_nibbles_asm("bf16"))
_NIBBLES_FP16 = tl.constexpr(_nibbles_asm("fp16"))


@triton.jit
def _nibbles(codes, DTYPE: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr):
    """(low, high) 4-bit codes of a uint8 tile as exact small integers in DTYPE: by integer ops
    and a conversion for float32 dots and in the interpreter (nested tests: Triton 3.6 took
    `not DOT_F32 and not INTERPRET` for true with DOT_F32 set), else by the asm above."""
    if DOT_F32:
        lo = (codes & 0xF).to(DTYPE)
        hi = (codes >> 4).to(DTYPE)
    elif INTERPRET:
        lo = (codes & 0xF).to(DTYPE)
        hi = (codes >> 4).to(DTYPE)
    else:  # a 16-bit DTYPE on a GPU
        if DTYPE == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_BF16, "=r,=r,=r,=r,r", [codes],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(_NIBBLES_FP16, "=r,=r,=r,=r,r", [codes],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    return lo, hi


@triton.jit
def _int4_groups(s_cols, z_cols, n_mask, j0, KH, stride_sg, GROUP: tl.constexpr):
    """The scale and min rows of the K step at j0's two groups (one a half: BLOCK_K divides
    GROUP); the prefetch after the last step (j0 = KH) reads the last groups again, unused."""
    g = tl.minimum(j0, KH - 1) // GROUP
    g_lo = g * stride_sg
    g_hi = (g + KH // GROUP) * stride_sg
    s_lo = tl.load(s_cols + g_lo, mask=n_mask, other=0.0)
    z_lo = tl.load(z_cols + g_lo, mask=n_mask, other=0.0)
    s_hi = tl.load(s_cols + g_hi, mask=n_mask, other=0.0)
    z_hi = tl.load(z_cols + g_hi, mask=n_mask, other=0.0)
    return s_lo, z_lo, s_hi, z_hi


@triton.jit
def _int4_step(acc, a_lo, a_hi, sum_lo, sum_hi, b_ptrs, n_mask, s_lo, z_lo, s_hi, z_hi, WDTYPE: tl.constexpr,
               WIDEN: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc + one K step of both halves, the scales applied where they cost least:

    - WIDEN (tiles of 64 rows or more): each weight widened to q * s + z and rounded to the dot
      type, as the reference dequantizes, and accumulated in place by tl.dot (wgmma keeps its
      accumulator; the widening is shared by the tile's many rows);
    - else: a @ (q * s + z) = (a @ q) * s + rowsum(a) * z, the exact codes into the dot and each
      column's scale and min applied to its product (a few rows: no per-weight arithmetic
      beyond the widening of the codes)."""
    codes = tl.load(b_ptrs, mask=n_mask[None, :], other=0)  # [BLOCK_K, BLOCK_N], each byte two rows
    q_lo, q_hi = _nibbles(codes, WDTYPE, DOT_F32, INTERPRET)
    if WIDEN:
        w_lo = q_lo.to(tl.float32) * s_lo.to(tl.float32)[None, :] + z_lo.to(tl.float32)[None, :]
        w_hi = q_hi.to(tl.float32) * s_hi.to(tl.float32)[None, :] + z_hi.to(tl.float32)[None, :]
        acc = tl.dot(a_lo, cast_rtne(w_lo, WDTYPE, INTERPRET), acc, input_precision=DOT_PRECISION)
        acc = tl.dot(a_hi, cast_rtne(w_hi, WDTYPE, INTERPRET), acc, input_precision=DOT_PRECISION)
    else:
        acc += (tl.dot(a_lo, q_lo, input_precision=DOT_PRECISION) * s_lo.to(tl.float32)[None, :]
                + sum_lo * z_lo.to(tl.float32)[None, :])
        acc += (tl.dot(a_hi, q_hi, input_precision=DOT_PRECISION) * s_hi.to(tl.float32)[None, :]
                + sum_hi * z_hi.to(tl.float32)[None, :])
    return acc


@triton.jit
def _int4_mainloop(a_rows, m_mask, b_base, s_base, m_base, rn, n_mask, N, K, KH, j_lo, j_hi, stride_bk, stride_sg,
                   GATED: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   INTERPRET: tl.constexpr):
    """(a @ gate^T, a @ up^T) over INT4 codes in the halves layout (see the module docstring):
    rows j and j + KH of a K step share their codes' bytes; code rows j_lo..j_hi (this split's).

    Triton's pipeliner stages the code and activation tiles (their loads feed tl.dot) but not
    the scale and min rows, which feed arithmetic: left in the loop, each step waited out their
    latency (eight loads, serialized by the layout conversions after them). So they are loaded
    one step ahead and carried in registers."""
    wdtype = tl.float32 if DOT_F32 else a_rows.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s_cols = s_base + rn
    z_cols = m_base + rn
    if GATED:  # the up columns follow the gate columns: N further along each row
        up_mask = n_mask
    else:  # no up columns: their (unused) rows load nothing
        up_mask = rn < 0
    s_lo, z_lo, s_hi, z_hi = _int4_groups(s_cols, z_cols, n_mask, j_lo, KH, stride_sg, GROUP)
    su_lo, zu_lo, su_hi, zu_hi = _int4_groups(s_cols + N, z_cols + N, up_mask, j_lo, KH, stride_sg, GROUP)
    for j0 in range(j_lo, j_hi, BLOCK_K):  # BLOCK_K divides GROUP, and GROUP divides KH
        ns_lo, nz_lo, ns_hi, nz_hi = _int4_groups(s_cols, z_cols, n_mask, j0 + BLOCK_K, KH, stride_sg, GROUP)
        nsu_lo, nzu_lo, nsu_hi, nzu_hi = _int4_groups(s_cols + N, z_cols + N, up_mask, j0 + BLOCK_K, KH, stride_sg,
                                                      GROUP)
        j = j0 + tl.arange(0, BLOCK_K)
        a_lo = tl.load(a_rows + j[None, :], mask=m_mask[:, None] & (j < K)[None, :], other=0.0)
        a_hi = tl.load(a_rows + (j + KH)[None, :], mask=m_mask[:, None] & ((j + KH) < K)[None, :], other=0.0)
        sum_lo = tl.sum(a_lo.to(tl.float32), axis=1)[:, None]
        sum_hi = tl.sum(a_hi.to(tl.float32), axis=1)[:, None]
        x_lo = a_lo.to(wdtype)  # float32 dots (and the interpreter's): upcast
        x_hi = a_hi.to(wdtype)
        b_ptrs = b_base + j.to(tl.int64)[:, None] * stride_bk + rn[None, :]
        acc = _int4_step(acc, x_lo, x_hi, sum_lo, sum_hi, b_ptrs, n_mask, s_lo, z_lo, s_hi, z_hi, wdtype,
                         BLOCK_M >= 64, DOT_F32, INTERPRET, DOT_PRECISION)
        if GATED:
            acc_up = _int4_step(acc_up, x_lo, x_hi, sum_lo, sum_hi, b_ptrs + N, n_mask, su_lo, zu_lo, su_hi, zu_hi,
                                wdtype, BLOCK_M >= 64, DOT_F32, INTERPRET, DOT_PRECISION)
        s_lo, z_lo, s_hi, z_hi = ns_lo, nz_lo, ns_hi, nz_hi
        su_lo, zu_lo, su_hi, zu_hi = nsu_lo, nzu_lo, nsu_hi, nzu_hi
    return acc, acc_up


# The GEMV form widens to float32 by the same trick: a value v < 2^23 in the mantissa of 2^23
# (0x4B000000, whose last mantissa bit is worth 1) is the float 2^23 + v, so one subtraction
# makes it exact. A byte's two codes: prmt puts the byte under 0x4B (the byte's lane k of the
# packed word into byte 0, zeros, 0x4B into byte 3), then one and each keeps the low nibble (q)
# or the high one where it lies (16 q): a prmt and two ands a byte. ptxas leaves Triton's
# extract / and / or for the same thing as three ops a code.
_BYTE_BITS = tl.constexpr("""{
    .reg .b32 t0, t1, t2, t3;
    prmt.b32 t0, $8, 0x4B000000, 0x7540;
    prmt.b32 t1, $8, 0x4B000000, 0x7541;
    prmt.b32 t2, $8, 0x4B000000, 0x7542;
    prmt.b32 t3, $8, 0x4B000000, 0x7543;
    and.b32 $0, t0, 0x4B00000F;
    and.b32 $1, t1, 0x4B00000F;
    and.b32 $2, t2, 0x4B00000F;
    and.b32 $3, t3, 0x4B00000F;
    and.b32 $4, t0, 0x4B0000F0;
    and.b32 $5, t1, 0x4B0000F0;
    and.b32 $6, t2, 0x4B0000F0;
    and.b32 $7, t3, 0x4B0000F0;
    }""")


@triton.jit
def _nibbles_f32(codes, INTERPRET: tl.constexpr):
    """(q, 16 q) of a uint8 code tile's low and high nibbles as exact float32 (the interpreter,
    which runs no PTX: the same bits by integer ops), where the integer conversion instruction
    would issue at a quarter of the ALU rate."""
    if INTERPRET:
        wide = codes.to(tl.int32)
        lo = (wide & 0xF) | 0x4B000000
        hi = (wide & 0xF0) | 0x4B000000
    else:
        lo, hi = tl.inline_asm_elementwise(_BYTE_BITS, "=r,=r,=r,=r,=r,=r,=r,=r,r", [codes],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=4)
    return lo.to(tl.float32, bitcast=True) - 8388608.0, hi.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _int4_gemv_cols(acc, a_lo, a_hi, codes, s_lo, z_lo, s_hi, z_hi, INTERPRET: tl.constexpr):
    """acc [BLOCK_K, BLOCK_N] + one K step of both halves (a_lo, a_hi [BLOCK_K, 1]) in float32,
    each weight of the step's codes dequantized (q * s + z, not rounded: as the decode tiles apply
    the scales to exact products). The high nibble is widened where it lies, as 16 q, against
    s / 16 (exact: a power of two), so fma(16 q, s / 16, z) is fma(q, s, z) bit for bit, without a
    shift."""
    q_lo, q16_hi = _nibbles_f32(codes, INTERPRET)
    w_lo = q_lo * s_lo.to(tl.float32)[None, :] + z_lo.to(tl.float32)[None, :]
    w_hi = q16_hi * (s_hi.to(tl.float32) * 0.0625)[None, :] + z_hi.to(tl.float32)[None, :]
    return acc + a_lo * w_lo + a_hi * w_hi


@triton.jit
def _int4_codes(b_ptrs, mask):
    return tl.load(b_ptrs, mask=mask, other=0, eviction_policy="evict_first")


@triton.jit
def _int4_gemv_loop(a_row, live, b_base, s_base, m_base, rn, n_mask, N, K, KH, j_lo, j_hi, stride_bk, stride_sg,
                    GATED: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    INTERPRET: tl.constexpr, PREFETCH: tl.constexpr = False):
    """The GEMV form of _int4_mainloop for a block of one pair (a_row: a scalar pointer to its row of
    activations, live: whether the block holds a pair): the code rows of a
    K step against both halves' activations, per-element FMAs into a float32 [BLOCK_K, BLOCK_N]
    accumulator per GEMM, summed over K once after the loop; [1, BLOCK_N] each. No tl.dot, so no
    code tile passes through shared memory and no 16-row tile pads fifteen rows.
    PREFETCH (num_stages >= 2, as fused_moe_dense._dense_gemv_loop's): the next K step's code tiles
    loaded before this step's FMAs and carried in registers; the same FMAs in the same order."""
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    s_cols = s_base + rn
    z_cols = m_base + rn
    up_mask = n_mask if GATED else rn < 0  # no up columns: their (unused) rows load nothing
    k_live = tl.where(live, K, 0)  # a block without a pair reads no activations
    cols = b_base + rn[None, :]
    if PREFETCH:
        j = j_lo + tl.arange(0, BLOCK_K)
        ahead = (j < j_hi)[:, None] & n_mask[None, :]  # a split's range may be empty
        codes = _int4_codes(cols + j.to(tl.int64)[:, None] * stride_bk, ahead)
        codes_up = codes
        if GATED:
            codes_up = _int4_codes(cols + N + j.to(tl.int64)[:, None] * stride_bk, ahead)
    for j0 in range(j_lo, j_hi, BLOCK_K):  # BLOCK_K divides GROUP, and GROUP divides KH
        j = j0 + tl.arange(0, BLOCK_K)
        # loaded as [BK] and broadcast down the tile's K rows: each thread loads the rows it holds
        a_lo = tl.load(a_row + j, mask=j < k_live, other=0.0, eviction_policy="evict_last")
        a_hi = tl.load(a_row + j + KH, mask=(j + KH) < k_live, other=0.0, eviction_policy="evict_last")
        a_lo = a_lo.to(tl.float32)[:, None]
        a_hi = a_hi.to(tl.float32)[:, None]
        s_lo, z_lo, s_hi, z_hi = _int4_groups(s_cols, z_cols, n_mask, j0, KH, stride_sg, GROUP)
        b_ptrs = cols + j.to(tl.int64)[:, None] * stride_bk
        ahead = (j + BLOCK_K < j_hi)[:, None] & n_mask[None, :]  # a prefetch past this split's range: nothing
        if PREFETCH:  # this step's codes were loaded a step ago; the next one's load goes out first
            cur = codes
            codes = _int4_codes(b_ptrs + BLOCK_K * stride_bk, ahead)
        else:
            cur = _int4_codes(b_ptrs, n_mask[None, :])
        acc = _int4_gemv_cols(acc, a_lo, a_hi, cur, s_lo, z_lo, s_hi, z_hi, INTERPRET)
        if GATED:
            su_lo, zu_lo, su_hi, zu_hi = _int4_groups(s_cols + N, z_cols + N, up_mask, j0, KH, stride_sg, GROUP)
            if PREFETCH:
                cur_up = codes_up
                codes_up = _int4_codes(b_ptrs + N + BLOCK_K * stride_bk, ahead)
            else:
                cur_up = _int4_codes(b_ptrs + N, n_mask[None, :])
            acc_up = _int4_gemv_cols(acc_up, a_lo, a_hi, cur_up, su_lo, zu_lo, su_hi, zu_hi, INTERPRET)
    return tl.sum(acc, axis=0)[None, :], tl.sum(acc_up, axis=0)[None, :]
