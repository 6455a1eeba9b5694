"""W4A8 at decode sizes: FBGEMM's W4A8 format through the fragment-order kernel's W4A8 instance.

W4A8 (services/engine/quant/packed.W4A8Weight) multiplies per-token FP8 activations by
w[k, n] = e4m3(q[n, k] * g[k // G, n]) * r[n]. Its GPU kernel, FBGEMM's ``f8i4bf16_shuffled``,
is a CUTLASS GEMM: at one row it reads the weight at about 0.37 of the copy bandwidth (1.04x
bf16 on the H200 at batch 1, where ``int4``'s fragment-order kernel gives 2.8x), so W4A8 was
the throughput format and ``int4`` the latency one. This is the same arithmetic in
llmesh/kernels/cuda/w4a16_mma.cu's fragment order (template argument W4A8):

- the codes as ``w4a16_mma.pack_codes`` lays 4-bit codes out, stored as u = q + 8 (a copy of
  the codes beside FBGEMM's shuffled one, as ``int4`` keeps its MMA copy);
- each widened by the exponent trick to float16 1024 + u and multiplied by its group scale in
  one paired FMA, (1024 + u) g - 1032 g = q g: exact, as float16 holds every product of a 4-bit
  code and an E4M3 scale, and 1032 g for every scale up to ``MAX_GROUP_SCALE``;
- rounded to E4M3 and back (``cvt.rn.satfinite.e4m3x2.f16x2``, sm_89 on), the rounding FBGEMM's
  table of products makes, so both kernels multiply the same weights;
- multiplied by x's E4M3 codes widened to float16 (exact) on the float16 tensor cores into
  float32, with the row and column scales applied once at the end.

The scales go through ``w4a16_mma.pack_scales`` as (g, -1032 g) in the place of (s, m). The sums
are float32 throughout, so, unlike FBGEMM's FP8 tensor cores (docs/quantization.md: about 14
bits in their running sums), a long sum of one sign loses nothing.
"""

from __future__ import annotations

import ctypes

import torch

from llmesh.kernels.common import check_out, check_tensor
from llmesh.kernels.w4a16_mma import (SCALES_SHAPE, STRIP, MmaConfig, launch, pack_codes, pack_scales, unpack_codes,
                                      unpack_scales)
from llmesh.kernels.w4a16_mma import unsupported as mma_unsupported

OFFSET = 1032.0
"""What widening adds, times g: (1024 + u) g with u = q + 8 is q g + 1032 g."""
MAX_GROUP_SCALE = 60.0
"""The largest E4M3 group scale whose 1032 multiple float16 holds (65504 / 1032 = 63.5)."""
_NULL = ctypes.c_void_p(0)


def kernel_k(k: int, group: int) -> int:
    """The kernel's K: whole pairs of groups (its splits plan in groups; the padding is zeros)."""
    return -(-k // (2 * group)) * 2 * group


def pack_w4a8_codes(codes: torch.Tensor, kp: int) -> torch.Tensor:
    """Signed codes int8 [N, K'] (W4A8Weight.codes(), K' <= kp) → ``pack_codes``'s int32 layout of
    u = q + 8 over kp rows (u = 8, q = 0, past K')."""
    n, k = codes.shape
    if k > kp:
        raise ValueError(f"codes hold {k} input rows, more than the kernel's K={kp}")
    u = torch.full((kp, n), 8, dtype=torch.uint8, device=codes.device)
    u[:k] = (codes.t().to(torch.int16) + 8).to(torch.uint8)
    return pack_codes(u)


def pack_w4a8_scales(group_scales: torch.Tensor, group: int, kp: int) -> torch.Tensor:
    """E4M3 group scales [K'/G, N] → ``pack_scales``'s float16 layout of (g, -1032 g) over kp / G
    groups (zeros past K')."""
    g = group_scales.float()
    g = torch.nn.functional.pad(g, (0, 0, 0, kp // group - g.shape[0]))
    return pack_scales(g.half().contiguous(), (-OFFSET * g).half().contiguous())


INT_ROUND_MAX_SCALE = 56.0
"""Group scales up to which rounding a product's float16 bits is E4M3's rounding (config round 1):
|q g| stays within E4M3's 448 (-8 * 56), and a subnormal scale's products lie on E4M3's
subnormal grid (multiples of 2^-9), so only a normal's mantissa is ever cut."""


def _within(group_scales: torch.Tensor, bound: float) -> bool:
    return not group_scales.numel() or bool(group_scales.float().abs().max() <= bound)


def int_rounding_exact(group_scales: torch.Tensor) -> bool:
    """Whether the integer rounding (MmaConfig.round = 1) is exact for every product of these
    scales: all within ``INT_ROUND_MAX_SCALE`` (quantize_w4a8's are)."""
    return _within(group_scales, INT_ROUND_MAX_SCALE)


def scales_fit(group_scales: torch.Tensor) -> bool:
    """Whether every group scale is within ``MAX_GROUP_SCALE`` (quantize_w4a8's are at most 56)."""
    return _within(group_scales, MAX_GROUP_SCALE)


def round_f16_bits(p: torch.Tensor) -> torch.Tensor:
    """The integer rounding (MmaConfig.round = 1) of float16 values, as the kernel does it on a
    pair's 32 bits: round to nearest even at 3 mantissa bits by adding 0x3F plus the lowest kept
    bit and clearing the 7 dropped ones."""
    bits = p.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = (bits + 0x3F + ((bits >> 7) & 1)) & 0xFF80
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.float16).float()


def emulate(xq: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
            row_scales: torch.Tensor, group: int, round_: int = 0) -> torch.Tensor:
    """What the kernel computes, in torch (float32) from its layouts: each weight (1024 + u) g +
    c rounded to E4M3 (``round_`` 1: by ``round_f16_bits``), times x's codes, summed, times the
    row and column scales. The CPU tests hold it to linear.w4a8_matmul_ref."""
    u = unpack_codes(codes).float()                                            # [Kp, N]
    g, c = (v.float().repeat_interleave(group, dim=0) for v in unpack_scales(scales))
    p = (1024.0 + u) * g + c
    w = round_f16_bits(p) if round_ else p.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    xp = torch.nn.functional.pad(xq.float(), (0, u.shape[0] - xq.shape[1]))
    return (xp @ w) * x_scale.float()[:, None] * row_scales.float()[None, :]


def unsupported(xq: torch.Tensor, n: int, group: int) -> str | None:
    """Why the kernel cannot serve these FP8 rows times a weight of N columns, or None."""
    return mma_unsupported(xq, n, group, dtype=torch.float8_e4m3fn)


def w4a8_mma(xq: torch.Tensor, x_scale: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
             row_scales: torch.Tensor, group_size: int, *, out: torch.Tensor | None = None,
             config: MmaConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """y [M, N] bf16 = (xq [M, K] E4M3 * x_scale [M]) @ W for W in this module's layouts
    (``pack_w4a8_codes``, ``pack_w4a8_scales``) times ``row_scales`` [N] (float32). ``pdl`` as
    w4a16_mma's."""
    check_tensor("xq", xq, "[M, K]", 2)
    check_tensor("codes", codes, "[N/64, Kp/16, 32, 4]", 4, (torch.int32,), device=xq.device)
    check_tensor("scales", scales, SCALES_SHAPE, 6, (torch.float16,), device=xq.device)
    check_tensor("x_scale", x_scale, "[M]", 1, (torch.float32,), device=xq.device)
    check_tensor("row_scales", row_scales, "[N]", 1, (torch.float32,), device=xq.device)
    m, k = xq.shape
    strips, steps = codes.shape[:2]
    n, kp = strips * STRIP, steps * 16
    if (why := unsupported(xq, n, group_size)) is not None:
        raise ValueError(f"w4a8_mma: {why}")
    if kp % (2 * group_size) or not kp - 2 * group_size < k <= kp:
        raise ValueError(f"w4a8_mma: codes hold Kp={kp} input rows; x has K={k}: expected Kp a multiple of "
                         f"2*group_size={2 * group_size} and {kp - 2 * group_size} < K <= {kp}")
    if tuple(scales.shape) != (strips, kp // group_size, 8, 4, 2, 2):
        raise ValueError(f"w4a8_mma: scales of shape {list(scales.shape)}, expected {SCALES_SHAPE} of Kp={kp}, "
                         f"G={group_size}")
    if x_scale.shape[0] != m or row_scales.shape[0] != n:
        raise ValueError(f"w4a8_mma: x_scale has {x_scale.shape[0]} rows for M={m}; row_scales "
                         f"{row_scales.shape[0]} for N={n}")
    if not (codes.is_contiguous() and scales.is_contiguous() and x_scale.is_contiguous()
            and row_scales.is_contiguous()):
        raise ValueError("w4a8_mma: codes, scales and both scale vectors must be contiguous")
    if not xq.is_contiguous() or xq.data_ptr() % 16:
        xq = xq.clone(memory_format=torch.contiguous_format)  # rows are read as 8-byte vectors
    out = check_out("out", out, (m, n), torch.bfloat16, xq.device)
    if out.stride(-1) != 1 or out.stride(0) % 2:
        raise ValueError(f"out must have unit last stride and an even row stride, got {out.stride()}")
    if m == 0:
        return out
    launch(xq, out, codes, scales, k, group_size, config, pdl, [_NULL, _NULL, _NULL, ctypes.c_float(0.0), x_scale,
                                                                 row_scales], w4a8=True)
    return out
