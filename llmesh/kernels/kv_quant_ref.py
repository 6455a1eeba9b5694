"""FP8 (E4M3) KV cache: the torch reference of the quantization (no Triton import, so the
torch backend runs without it) and the pool layout. llmesh/kernels/kv_quant.py holds the same
arithmetic as @triton.jit helpers; the rationale below applies to both.

Layout: the pools ``k_cache, v_cache: [num_blocks, block_size, H_kv, D]`` hold float8_e4m3fn
and beside them ``k_scales, v_scales: [num_blocks, block_size, H_kv]`` uint8 hold one scale per
(token, KV head): a power of two 2^(e - 127) stored as its biased exponent e (the E8M0
encoding of the OCP microscaling formats). A stored value dequantizes as
``fp8_value * 2^(e - 127)``.

Why per token and head, and why powers of two:

- The scale is computed from the vector being stored (its absmax over D), so nothing has to be
  calibrated, no value ever saturates (absmax maps into [224, 448]), and a token's stored bits
  depend on that token alone: a prefix-cache hit reads exactly what a recomputation would
  store, whatever else was in the batch, and the torch and Triton backends store equal bits.
- A power of two costs one byte per (token, head) (1/D of the fp8 payload: 1/128 at D = 128),
  and scaling by it is exact in floating point. The attention kernels therefore fold it into
  the scores (keys) and the probabilities (values) per key column, BLOCK_N multiplies per
  tile instead of BLOCK_N x D, with the same result as dequantizing the tile first. E4M3 is a
  floating-point format, so a scale that is not the exact absmax / 448 loses no relative
  precision; it only sets where the (irrelevant) subnormal range starts.
"""

from __future__ import annotations

import torch

from llmesh.kernels.common import FLOAT_DTYPES

FP8_MAX = 448.0
"""Largest finite E4M3 value: quantized values saturate there."""
KV_FP8_DTYPE = torch.float8_e4m3fn
KV_SCALE_DTYPE = torch.uint8
KV_SCALE_BYTES = 1
"""Biased exponent of the power-of-two scale (E8M0): scale = 2^(e - 127)."""
MIN_EXP, MAX_EXP = 1, 253
"""Biased exponents kept: both the scale and its inverse are normal float32 powers of two
(an all-zero vector, padding, takes the smallest)."""

POOL_DTYPES = (*FLOAT_DTYPES, KV_FP8_DTYPE)
"""What a KV pool may hold."""


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == KV_FP8_DTYPE


def kv_scale_exponent_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [..., D] float → [...] int32 biased exponent e of the smallest power of two 2^(e-127)
    with absmax(x) / 2^(e-127) <= 448. Integer arithmetic on the float32 bits (no division, no
    log), so the Triton helper computes the same e."""
    amax = x.to(torch.float32).abs().amax(dim=-1)
    bits = amax.view(torch.int32)
    exp = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    # absmax = 1.m * 2^(exp-127) and 448 = 1.75 * 2^8: 1.m <= 1.75 needs 2^8 of headroom, else 2^7.
    e = exp - 8 + (mant > 0x600000).to(torch.int32)
    return e.clamp(MIN_EXP, MAX_EXP)


def exponent_to_scale_ref(e: torch.Tensor) -> torch.Tensor:
    """[...] biased exponents → [...] float32 scales 2^(e - 127), built from the bits (exact)."""
    return (e.to(torch.int32) << 23).view(torch.float32)


def quantize_kv_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H, D] float → (xq float8_e4m3fn [T, H, D], e uint8 [T, H]), x ≈ xq * 2^(e - 127)."""
    e = kv_scale_exponent_ref(x)
    inv = exponent_to_scale_ref(254 - e)  # 1 / scale, exact
    xq = (x.to(torch.float32) * inv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)
    return xq, e.to(KV_SCALE_DTYPE)


def dequantize_kv_ref(xq: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """xq: [..., D] float8_e4m3fn, e: [...] uint8 → [..., D] in dtype. Exact for float32 and
    bfloat16 (an E4M3 value times a power of two fits their exponent range); float16 is exact
    while the scale is at least 2^-15 (a vector's absmax above about 0.007), below that its
    smallest codes fall under float16's subnormal step, 2^-24, and round."""
    return (xq.to(torch.float32) * exponent_to_scale_ref(e)[..., None]).to(dtype)


def check_kv_scales(k_cache: torch.Tensor, k_scales: torch.Tensor | None, v_scales: torch.Tensor | None) -> bool:
    """Whether the pool is FP8; raises when its scale pools are missing or do not match it."""
    if not is_fp8(k_cache):
        if k_scales is not None or v_scales is not None:
            raise ValueError(f"KV scales were given for a {k_cache.dtype} pool; only an FP8 pool has them")
        return False
    want = tuple(k_cache.shape[:3])
    for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
        if s is None:
            raise ValueError(f"an FP8 KV pool needs {name} [num_blocks, block_size, H_kv] uint8 beside it")
        if tuple(s.shape) != want or s.dtype != KV_SCALE_DTYPE or s.device != k_cache.device:
            raise ValueError(f"{name} must be {KV_SCALE_DTYPE} {want} on {k_cache.device} (the pool's blocks, "
                             f"slots and KV heads), got {s.dtype} {tuple(s.shape)} on {s.device}")
        if not s.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {s.stride()}")
    return True
