"""Dequantization of GGUF tensor data (ggml block formats) into float32 torch tensors.

Written in torch, block-vectorised, so the same code runs on the CPU at load time and, later,
on a GPU when weights are kept quantized and expanded on the device. The arithmetic follows
ggml's reference order (scale products first, then the quant) so results match
``gguf.quants.dequantize`` bit for bit.

Block layouts (bytes, little-endian), from ggml-common.h:
    Q8_0  [d:f16][qs:int8 x32]                                   32 values, 34 bytes
    Q4_0  [d:f16][qs:u8 x16]            x = d * (q - 8)          32 values, 18 bytes
    Q4_1  [d:f16][m:f16][qs:u8 x16]     x = d * q + m            32 values, 20 bytes
    Q4_K  [d:f16][dmin:f16][scales:u8 x12][qs:u8 x128]           256 values, 144 bytes
    Q6_K  [ql:u8 x128][qh:u8 x64][scales:int8 x16][d:f16]        256 values, 210 bytes
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmesh.engine.errors import UnsupportedModelError

QK_K = 256
"""Values per K-quant super-block."""


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The f16 stored at byte ``start`` of each block, as float32. blocks: [N, B] → [N, 1]."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Low nibbles of every byte, then high nibbles (ggml's order). packed: [..., K] → [..., 2K]."""
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: [N, 34] → [N, 32]
    d = _f16(blocks, 0)
    qs = blocks[:, 2:].contiguous().view(torch.int8).float()
    return qs * d


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: [N, 18] → [N, 32]
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).to(torch.int8) - 8
    return d * q.float()


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: [N, 20] → [N, 32]
    d = _f16(blocks, 0)
    m = _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).float()
    return d * q + m


def _k4_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 8 six-bit scales and 8 six-bit mins of a Q4_K block.

    scales: [N, 12] bytes laid out as three rows of four: rows 0/1 hold the low 6 bits of
    scales/mins 0-3 (their top 2 bits are the high bits of scales/mins 4-7); row 2 holds
    the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    rows = scales.reshape(-1, 3, 4)  # [N, 3, 4]
    s_lo, m_lo, mixed = rows[:, 0], rows[:, 1], rows[:, 2]
    sc = torch.cat([s_lo & 0x3F, (mixed & 0x0F) | ((s_lo >> 2) & 0x30)], dim=-1)  # [N, 8]
    mn = torch.cat([m_lo & 0x3F, (mixed >> 4) | ((m_lo >> 2) & 0x30)], dim=-1)  # [N, 8]
    return sc, mn


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: [N, 144] → [N, 256]
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    dmin = _f16(blocks, 2)
    sc, mn = _k4_scales_mins(blocks[:, 4:16])
    scale = (d * sc.float()).reshape(n, 8, 1)  # [N, 8, 1]
    offset = (dmin * mn.float()).reshape(n, 8, 1)  # [N, 8, 1]
    # Each 32-byte chunk of qs holds two sub-blocks: low nibbles, then high nibbles.
    qs = blocks[:, 16:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, 32).float()  # [N, 8, 32]
    return (scale * q - offset).reshape(n, QK_K)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # blocks: [N, 210] → [N, 256]
    n = blocks.shape[0]
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [N, 16]
    d = _f16(blocks, 208)
    scale = (d * sc).reshape(n, 16, 1)  # [N, 16, 1]
    # Each half (128 values) takes 64 ql bytes (low nibbles, then high) and 32 qh bytes
    # (2 bits per value, shifts 0, 2, 4, 6 for its four 32-value quarters).
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(n, 8, 32)
    high = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()  # [N, 16, 16]
    return (scale * q).reshape(n, QK_K)


_BLOCK_DEQUANT: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
}

SUPPORTED_GGML_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.BF16,
    *_BLOCK_DEQUANT,
)


def check_supported(ggml_type: int, tensor_name: str) -> GGMLQuantizationType:
    """The type as an enum; raises UnsupportedModelError naming the type and tensor if llmesh
    cannot dequantize it (checked for every tensor before any is loaded)."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        qtype = None
    if qtype not in SUPPORTED_GGML_TYPES:
        type_name = qtype.name if qtype is not None else f"#{ggml_type}"
        supported = ", ".join(t.name for t in SUPPORTED_GGML_TYPES)
        raise UnsupportedModelError(
            f"GGUF tensor {tensor_name!r} has type {type_name}, which llmesh cannot load "
            f"(supported: {supported}); re-quantize the model to one of those types")
    return qtype


def dequantize(raw: torch.Tensor, ggml_type: int, shape: Sequence[int],
               tensor_name: str = "tensor") -> torch.Tensor:
    """Expand one tensor's raw bytes into float32.

    raw: [nbytes] uint8, the tensor's data as stored in the file (any device).
    shape: the row-major (numpy / torch) shape, i.e. GGUF's ``ne`` reversed.
    Returns a float32 tensor of ``shape`` on raw's device.
    """
    qtype = check_supported(ggml_type, tensor_name)
    raw = raw.reshape(-1)
    numel = 1
    for dim in shape:
        numel *= int(dim)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if raw.numel() * block_size != numel * type_size:
        raise UnsupportedModelError(
            f"GGUF tensor {tensor_name!r}: {raw.numel()} bytes do not hold {numel} {qtype.name} "
            f"values; the file is truncated or corrupt")
    if qtype == GGMLQuantizationType.F32:
        out = raw.view(torch.float32)
    elif qtype == GGMLQuantizationType.F16:
        out = raw.view(torch.float16).float()
    elif qtype == GGMLQuantizationType.BF16:
        out = raw.view(torch.bfloat16).float()
    else:
        out = _BLOCK_DEQUANT[qtype](raw.reshape(-1, type_size))
    return out.reshape(tuple(int(d) for d in shape))
