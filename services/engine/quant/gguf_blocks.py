"""GGUF Q8_0 / Q4_0 / Q4_1 blocks ↔ our packed layouts (packed.py).

GGUF stores an nn.Linear weight [N, K] as N rows of K/32 blocks (layouts in
loader/gguf_dequant.py's docstring). ``rows_to_weight`` repacks those rows, unchanged in
value, into the layouts our GEMMs read (W = weight^T, [K, N]):

    Q8_0 → Int8Weight  q as stored, scales d                        (group 32)
    Q4_0 → Int4Weight  q = nibble, scales d, mins -8d                (group 32)
    Q4_1 → Int4Weight  q = nibble, scales d, mins m                  (group 32)

so ``dequantize()`` reproduces ggml's values bit for bit: d and m are float16 in both, the
products d*q and 8d are exact in float32, and q*d + m rounds once exactly as ggml's
d*q + m does (for Q4_0, q*d - 8d = d*(q - 8) exactly). -8d is exact in float16 unless
|d| > 8188, i.e. weights beyond float16's range, which GGUF files do not hold.

``quantize_rows`` is a torch port of the gguf package's numpy quantizers (gguf/quants.py),
op for op in float32 so that its bytes are identical: the same divisions, reciprocals,
round-half-away-from-zero (np_roundf) for Q8_0 and trunc(x + 0.5) for Q4_*, and the first
index of the largest |x| as Q4_0's signed maximum. It lets tests and tools build GGUF
blocks on any device without numpy.
"""

from __future__ import annotations

import torch

from llmesh.engine.quant.packed import GGUF_GROUP, Int4Weight, Int8Weight, pack_int4

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
"""Bytes per 32-value block."""


def _check_qtype(qtype: str) -> None:
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"qtype must be one of {sorted(BLOCK_BYTES)}, got {qtype!r}")


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [B, 1] → its float16 (round to nearest even) as little-endian bytes [B, 2]."""
    return v.to(torch.float16).contiguous().view(torch.uint8)


def _reciprocal_or_zero(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d == 0 (an all-zero block quantizes to q = 0, or 8 for Q4_0)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """gguf's np_roundf, the same ops: sign(v) * (floor|v| + floor(2 * frac|v|))."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes [B, 32] in 0..15 → bytes [B, 16]: values 0..15 in low nibbles, 16..31 in high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _quantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    # b: [B, 32] → [B, 34]
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    qs = _round_half_away(b * _reciprocal_or_zero(d))
    return torch.cat([_f16_bytes(d), qs.to(torch.int8).view(torch.uint8)], dim=-1)


def _quantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    # b: [B, 32] → [B, 18]. d maps the signed value of largest magnitude to -8.
    imax = b.abs().argmax(dim=-1, keepdim=True)  # first index on ties, as numpy
    d = b.gather(-1, imax) / -8
    q = torch.trunc(b * _reciprocal_or_zero(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=-1)


def _quantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    # b: [B, 32] → [B, 20]
    hi = b.amax(dim=-1, keepdim=True)
    lo = b.amin(dim=-1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((b - lo) * _reciprocal_or_zero(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([_f16_bytes(d), _f16_bytes(lo), _pack_nibbles(q)], dim=-1)


_QUANTIZE = {"Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0, "Q4_1": _quantize_q4_1}


def quantize_rows(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks of x, byte-identical to ``gguf.quants.quantize(x.numpy(), qtype)``.

    x: [N, K] (computed in float32; K a multiple of 32). Returns uint8 [N, K/32 * bytes].
    """
    _check_qtype(qtype)
    if x.dim() != 2 or x.shape[1] % GGUF_GROUP:
        raise ValueError(f"x must be [N, K] with K a multiple of {GGUF_GROUP}, got {tuple(x.shape)}")
    n, k = x.shape
    blocks = x.to(torch.float32).reshape(-1, GGUF_GROUP)             # [N*K/32, 32]
    return _QUANTIZE[qtype](blocks).reshape(n, k // GGUF_GROUP * BLOCK_BYTES[qtype])


def _block_f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at byte ``start`` of every block. blocks: [N, B, bytes] → [N, B]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).squeeze(-1)


def rows_to_weight(data: torch.Tensor, qtype: str, in_features: int) -> Int8Weight | Int4Weight:
    """Repack raw GGUF rows of an [N, K] matrix (K = in_features) into W = [K, N] layouts.

    data: uint8 [N, K/32 * bytes] on any device (or the flat tensor data, [N * K/32 * bytes]);
    the result lives on data's device. See the module docstring for the mapping.
    """
    _check_qtype(qtype)
    k = in_features
    if k <= 0 or k % GGUF_GROUP:
        raise ValueError(f"in_features must be a positive multiple of {GGUF_GROUP}, got {k}")
    if data.dtype != torch.uint8:
        raise ValueError(f"data must be uint8 GGUF blocks, got {data.dtype}")
    nb, bb = k // GGUF_GROUP, BLOCK_BYTES[qtype]
    if data.numel() % (nb * bb):
        raise ValueError(f"data has {data.numel()} bytes, not a whole number of {qtype} rows of "
                         f"{k} values ({nb * bb} bytes each)")
    blocks = data.reshape(-1, nb, bb)                                   # [N, K/32, bytes]
    n = blocks.shape[0]
    d = _block_f16(blocks, 0)                                           # [N, K/32]
    if qtype == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k)  # [N, K]
        return Int8Weight(q.t().contiguous(), d.t().contiguous(), GGUF_GROUP, format="q8_0")
    qs = blocks[..., 4:] if qtype == "Q4_1" else blocks[..., 2:]        # [N, K/32, 16]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, k)           # [N, K] in ggml order
    mins = _block_f16(blocks, 2) if qtype == "Q4_1" else d * -8         # [N, K/32] float16
    return pack_int4(q.t(), d.t(), mins.t(), GGUF_GROUP, fmt=qtype.lower())
