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

Their layouts differ from ours (packed.py holds the GPU kernels' layout), so each weight is
repacked once, on first use, and the copy kept beside it (per activation dtype). Weights
these kernels do not take (GGUF Q8_0's 32-value groups, FP8, odd group sizes) return None
and the caller keeps the dequantizing reference.
"""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import Int4Weight, Int8Weight, QuantizedWeight

INT4_CPU_GROUPS = (32, 64, 128, 256)
"""Group sizes the CPU int4 kernel takes."""

_CACHE = "_cpu_pack"


def _int8_pack(w: Int8Weight, dtype: torch.dtype) -> tuple | None:
    if w.group_size != w.in_features:  # grouped (Q8_0): one scale per channel only
        return None
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
    cache: dict = w.__dict__.setdefault(_CACHE, {})
    if x.dtype not in cache:
        cache[x.dtype] = _pack(w, x.dtype)
    pack = cache[x.dtype]
    if pack is None:
        return None
    if pack[0] == "int8":
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), pack[1], pack[2])
    _, packed, scale_zero, kp = pack
    if isinstance(w, Int4Weight) and w.perm is not None:
        x = x.index_select(1, w.perm)  # act-order: W's rows are stored sorted by group
    if x.shape[1] < kp:  # Kp's padding rows hold q = 0; zero activations make them add nothing
        x = torch.nn.functional.pad(x, (0, kp - x.shape[1]))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, w.group_size, scale_zero)
