"""Integer weight codes to float32 without int-to-float conversions (Marlin's trick, in Triton).

A weight-streaming INT4 kernel that converts every code with an int-to-float instruction
spends issue slots on that instruction: on Hopper I2F issues at 16 per SM per clock, an eighth
of the FP32 rate, and a byte of INT4 holds two codes, so the conversions alone cap the kernel
near half of the H200's copy bandwidth. (Measured, they were one limit, not the main one: the
word kernels made INT4 at M = 1 1.10x bf16 where the byte kernels were 0.94x, both far from the
copy bandwidth; docs/quantization.md says what the sweep points at next.)

Instead the code is moved into the top mantissa bits of 1.0: the float32 bit pattern
0x3F800000 | (q << (23 - BITS)) is exactly 1 + q / 2^BITS. Moving it is a shift and an
and-or (ptxas fuses the two logic ops into one LOP3), both on the integer pipe, and the
dequantization folds the offset into the scale's FMA with per-column constants:

    q * s + m = f * (2^BITS * s) + (m - 2^BITS * s),        f = 1 + q / 2^BITS

one FMA per weight, evaluated exactly and rounded once (the constant's own rounding is
2^-24 of |m - 2^BITS * s|). The kernels load the packed weights as int32 words, four bytes of four
adjacent output columns each, so no byte is extracted on its own: the shift picks the code
straight out of the word.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SIGN_FLIP_BYTES = tl.constexpr(-2139062144)
"""0x80808080 as an int32: XOR with it turns four int8 codes q into the unsigned q + 128 (a
constexpr: a @jit function reads no other globals)."""


@triton.jit
def unit_code(word, SHIFT: tl.constexpr, BITS: tl.constexpr):
    """1 + q / 2^BITS in float32, q the BITS-bit unsigned code at bit SHIFT of each int32 word."""
    TOP: tl.constexpr = 23 - BITS
    MASK: tl.constexpr = ((1 << BITS) - 1) << TOP
    if SHIFT <= TOP:
        v = word << (TOP - SHIFT)
    else:
        v = word >> (SHIFT - TOP)  # arithmetic on negative words: the mask drops the sign bits
    return ((v & MASK) | 0x3F800000).to(tl.float32, bitcast=True)


def as_words(qweight: torch.Tensor) -> torch.Tensor | None:
    """A packed [rows, N] byte weight as int32 words [rows, N/4] (a view), or None where its
    layout has no whole words (N % 4, a row stride or start off a 4-byte boundary)."""
    if qweight.shape[1] % 4 or qweight.stride(0) % 4 or qweight.storage_offset() % 4 or qweight.data_ptr() % 4:
        return None  # view(int32) needs the offset aligned; the kernels need the address aligned
    return qweight.view(torch.int32)
