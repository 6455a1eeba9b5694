"""Packed weights on the CPU through PyTorch's own CPU kernels, without expanding them.

The torch backend's reference for a packed weight dequantizes all of W every step: on the
CPU that reads four bytes per weight (more than a float32 model does) and spends the step
expanding it, so a quantized model ran slower than the float32 one it came from. PyTorch
ships CPU kernels that read the packed bytes directly and accumulate in float32:

- ``_weight_int8pack_mm``: INT8 with one scale per output channel (quantize-on-load INT8).
- ``_weight_int4pack_mm_for_cpu`` (the CPU twin of gpt-fast's tinygemm): 4-bit groups of
  32-256 with a scale and a zero point, ``w = (q - 8) * scale + zero``. Our Int4Weight
  stores ``w = q * s + m`` (every 4-bit source: INT4/AWQ/GPTQ, GGUF Q4_0/Q4_1), which is the
  same map with ``zero = m + 8 s``.

Both are vectorized for bfloat16 activations only (float32 ones take a scalar path several
times slower than a float32 dense GEMV), so float32 activations are rounded to bfloat16 for
the product and the result returned in float32: a relative error of about 2^-9 per term,
far below the weights' own quantization error.

Their layouts differ from ours (packed.py holds the GPU kernels' layout), so each weight is
repacked once, on first use, and the copy kept beside it. Weights
with 32-value INT8 groups (GGUF Q8_0) are expanded once to bfloat16. Weights these kernels
do not take (FP8, 4-bit groups under 32) return None and the caller keeps the dequantizing
reference.
"""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import Int4Weight, Int8Weight, QuantizedWeight

INT4_CPU_GROUPS = (32, 64, 128, 256)
"""Group sizes the CPU int4 kernel takes."""

_CACHE = "_cpu_pack"


def _int8_pack(w: Int8Weight, dtype: torch.dtype) -> tuple:
    if w.group_size != w.in_features:
        # Grouped (GGUF Q8_0, e.g. the demo's tied embedding / LM head): the int8 kernel takes
        # one scale per channel only, so keep W expanded to bfloat16 (half of float32's bytes,
        # and bfloat16 GEMMs are vectorized) rather than expanding it on every step.
        return ("dense", w.dequantize().t().to(dtype).contiguous())  # [N, K]
    return ("int8", w.qweight.t().contiguous(), w.scales[0].to(dtype).contiguous())  # [N, K], [N]


def _int4_pack(w: Int4Weight, dtype: torch.dtype) -> tuple | None:
    if w.group_size not in INT4_CPU_GROUPS:
        return None
    q = torch.cat([w.qweight & 0x0F, w.qweight >> 4], dim=0)  # [Kp, N] values 0..15
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 1)
    scales = w.scales.float()
    zeros = w.mins.float() + 8.0 * scales
    scale_zero = torch.stack([scales, zeros], dim=-1).to(dtype).contiguous()  # [Kp / G, N, 2]
    return ("int4", packed, scale_zero, w.padded_in_features)


def _pack(w: QuantizedWeight, dtype: torch.dtype) -> tuple | None:
    if isinstance(w, Int8Weight):
        return _int8_pack(w, dtype)
    if isinstance(w, Int4Weight):
        return _int4_pack(w, dtype)
    return None


def cpu_packed_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor | None:
    """x [M, K] (float32 or bfloat16, on the CPU) @ W → [M, N], or None when W's format has
    no CPU kernel here."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if _CACHE not in w.__dict__:
        w.__dict__[_CACHE] = _pack(w, torch.bfloat16)
    pack = w.__dict__[_CACHE]
    if pack is None:
        return None
    xb = x.to(torch.bfloat16).contiguous()
    if pack[0] == "dense":
        return torch.nn.functional.linear(xb, pack[1]).to(x.dtype)
    if pack[0] == "int8":
        return torch.ops.aten._weight_int8pack_mm(xb, pack[1], pack[2]).to(x.dtype)
    _, packed, scale_zero, kp = pack
    if isinstance(w, Int4Weight) and w.perm is not None:
        xb = xb.index_select(1, w.perm)  # act-order: W's rows are stored sorted by group
    if xb.shape[1] < kp:  # Kp's padding rows hold q = 0; zero activations make them add nothing
        xb = torch.nn.functional.pad(xb, (0, kp - xb.shape[1]))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, w.group_size, scale_zero).to(x.dtype)
