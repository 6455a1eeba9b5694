"""Quantize-on-load: a float weight [out, in] (nn.Linear layout) → a packed weight.

Runs on the weight's device, one tensor at a time, so an 8B model is quantized while it
streams in and the full-precision copy never exists in memory as a whole.
"""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import (W4A8_ROW_RANGE, Fp8Weight, Int4Weight, Int8Weight, W4A8Weight,
                                        pack_int4, pack_signed_nibbles, w4a8_product)

INT4_GROUP_SIZE = 128
"""Group size of INT4 quantize-on-load (the AWQ/GPTQ default)."""

_TINY = 1e-10


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric per-output-channel INT8: q = round(w / s), s = max|w[n, :]| / 127."""
    w = weight.float()                                            # [N, K]
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(_TINY)        # [N]
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(q.t().contiguous(), scales[None, :].contiguous(), group_size=w.shape[1])


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weight:
    """Asymmetric group-wise INT4 with integer zero points (AWQ/GPTQ semantics):
    w ≈ (q - z) * s per group of ``group_size`` input channels, q, z in 0..15.

    Round-to-nearest over each group's full [min, max] range. Shrinking the range to the
    MSE-optimal clip (AWQ's clip search without activations) lowers the weights' squared
    error by ~15% but raised the demo model's perplexity delta from +20% to +38%: the
    clipped outliers are the weights that matter, which only activation-aware calibration
    can see. The scale and min (-z*s) are rounded to float16 before the codes are chosen, so
    what the kernels reconstruct is what the codes were fitted to.
    """
    w = weight.float().t()                                         # [K, N]
    k, n = w.shape
    groups = -(-k // group_size)
    padded = torch.zeros(groups * group_size, n, dtype=torch.float32, device=w.device)
    padded[:k] = w
    g = padded.view(groups, group_size, n)                         # [G, gs, N]
    lo0 = g.amin(dim=1).clamp(max=0.0)                              # zero must be representable
    hi0 = g.amax(dim=1).clamp(min=0.0)
    scales = ((hi0 - lo0) / 15.0).clamp_min(_TINY).half().float()           # [G, N]
    mins = (-torch.round(-lo0 / scales).clamp_(0, 15) * scales).half().float()
    q = torch.round((g - mins[:, None]) / scales[:, None]).clamp_(0, 15)
    q = q.reshape(groups * group_size, n)[:k]
    return pack_int4(q.to(torch.uint8), scales, mins, group_size, fmt="int4")


def quantize_fp8(weight: torch.Tensor) -> Fp8Weight:
    """FP8 E4M3 with one float32 scale per output channel (the kernels' W8A8 weight)."""
    from llmesh.kernels.fp8_gemm import quantize_fp8_weight

    q, scales = quantize_fp8_weight(weight)
    return Fp8Weight(q.contiguous(), scales.float().contiguous())


W4A8_GROUP_SIZE = 128
"""Group size of W4A8 (FBGEMM's kernel takes groups of at least 128)."""

_E4M3_MIN_SUBNORMAL = 2.0 ** -9


def quantize_w4a8(weight: torch.Tensor, group_size: int = W4A8_GROUP_SIZE) -> W4A8Weight:
    """Symmetric group-wise INT4 for FP8 activations: w ~ e4m3(q * g) * r with q in -8..7, one
    E4M3 scale g per group of ``group_size`` input channels and one float32 scale r per output
    channel (W4A8Weight says why the product is rounded to E4M3: it is the kernel's arithmetic).

    K is padded with zeros to a multiple of ``group_size``. r maps each row's largest |w| to
    W4A8_ROW_RANGE = 392 = 7 * 56, so that every group scale stays at most 56 and every product
    q * g within E4M3's 448. The group scale is the least
    that covers the group's range on the side it lies, max(max w / 7, -min w / 8) (max|w| / 8,
    FBGEMM's recipe, clips the positive extreme; max|w| / 7 never uses -8), rounded to E4M3;
    each code is then the one whose rounded product lies nearest the weight. FBGEMM's recipe
    instead rounds the weights to FP8 first and fits the codes to the unrounded scale, so its
    weights are rounded three times where these are fitted to what the kernel reconstructs.
    """
    n, k = weight.shape
    kp = -(-k // group_size) * group_size
    packed = torch.empty(n, kp // 2, dtype=torch.int8, device=weight.device)
    gs8 = torch.empty(n, kp // group_size, dtype=torch.float8_e4m3fn, device=weight.device)
    rows = torch.empty(n, dtype=torch.float32, device=weight.device)
    for r0 in range(0, n, W4A8_ROWS_AT_ONCE):  # a dozen float32 temporaries of the slice, not the weight
        r1 = min(n, r0 + W4A8_ROWS_AT_ONCE)
        packed[r0:r1], gs8[r0:r1], rows[r0:r1] = _w4a8_rows(weight[r0:r1], kp, group_size)
    return W4A8Weight(packed, gs8.t().contiguous(), rows, group_size, k)


W4A8_ROWS_AT_ONCE = 2048
"""Output rows quantize_w4a8 works on at a time: a 70B model's 28672 x 8192 projection would
otherwise need ~11 GB of float32 temporaries on the device it loads on."""


def _w4a8_rows(weight: torch.Tensor, kp: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_w4a8 of rows [R, K]: (codes int8 [R, Kp/2], group scales E4M3 [R, G], row scales [R])."""
    w = weight.float()                                                     # [R, K]
    n, k = w.shape
    rows = (w.abs().amax(dim=1) / W4A8_ROW_RANGE).clamp_min(_TINY)          # [R]
    g = torch.zeros(n, kp, dtype=torch.float32, device=w.device)
    g[:, :k] = w / rows[:, None]
    g = g.view(n, kp // group_size, group_size)                             # [R, G, gs] within +-392
    need = torch.maximum(g.amax(dim=2).clamp_min(0) / 7.0, (-g.amin(dim=2)).clamp_min(0) / 8.0)
    gs8 = need.clamp(_E4M3_MIN_SUBNORMAL, W4A8_ROW_RANGE / 7).to(torch.float8_e4m3fn)   # [R, G]
    scale = gs8.float()[:, :, None]
    q0 = torch.round(g / scale).clamp_(-8, 7)
    best, best_err = q0, (w4a8_product(q0, scale) - g).abs()
    for step in (-1.0, 1.0):  # the product's rounding can make a neighbouring code nearer
        cand = (q0 + step).clamp_(-8, 7)
        err = (w4a8_product(cand, scale) - g).abs()
        better = err < best_err
        best, best_err = torch.where(better, cand, best), torch.where(better, err, best_err)
    q = best.to(torch.int16).view(n, kp)
    return pack_signed_nibbles(q), gs8, rows


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8, "w4a8": quantize_w4a8}
