"""Tile shapes of the attention kernels, in tables that bench/attn_sweep.py's winners paste into.

Two kernels, two regimes:

- `PREFILL`: the causal tile kernel of prefill_attention.py (also the long-query half of
  unified_attention). Compute bound: BLOCK_M rows of (query token, query head of one KV
  group) against BLOCK_N keys per step, `tl.dot` on 16-bit operands (wgmma on Hopper), with
  num_stages K/V tiles in flight. Large tiles while the accumulator fits in registers.
- `DECODE`: the short-query split-KV kernel of unified_attention.py (decodes, speculative
  steps). Memory bound: one 16-row tile (tl.dot's minimum) holds a sequence's few query
  tokens times its GQA group, so each K/V tile is read once per KV head; the context is
  split into segments until the grid has `programs_per_sm` programs per SM, each segment
  at least `min_segment` keys (shorter ones cost more in the reduce than they save).

Keyed by head_dim; a head_dim not in a table takes the next larger entry. The defaults
are the usual Hopper FlashAttention-2 shapes until a sweep on the target GPU replaces them
(bench/attn_sweep.py prints the rows to paste).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmesh.kernels.common import interpreting


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    """Rows of a tile: block_m // group query tokens times the group's query heads."""
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    num_warps: int
    num_stages: int
    min_segment: int
    """Fewest keys a split-KV segment gets (a multiple of block_n)."""
    programs_per_sm: int
    """Split the context until (sequences x KV heads x segments) reaches this many per SM."""


# head_dim -> config; head_dim 128 from bench/attn_sweep.py on the H200 (2026-11-29:
# bench/results/attn_sweep_h200.json), the others Hopper defaults
PREFILL: dict[int, PrefillConfig] = {
    64: PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3),
    128: PrefillConfig(block_m=128, block_n=32, num_warps=4, num_stages=4),
    256: PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2),
}
DECODE: dict[int, DecodeConfig] = {
    64: DecodeConfig(block_n=64, num_warps=4, num_stages=3, min_segment=256, programs_per_sm=4),
    128: DecodeConfig(block_n=64, num_warps=2, num_stages=2, min_segment=256, programs_per_sm=4),
    256: DecodeConfig(block_n=32, num_warps=4, num_stages=2, min_segment=256, programs_per_sm=4),
}

# The interpreter runs tiles as NumPy arrays: small ones keep the CPU tests fast and still
# cover several tiles, segments and causal blocks per sequence.
_INTERPRET_PREFILL = PrefillConfig(block_m=32, block_n=16, num_warps=1, num_stages=1)
_INTERPRET_DECODE = DecodeConfig(block_n=16, num_warps=1, num_stages=1, min_segment=32, programs_per_sm=4)

_DEFAULT_SMS = 132  # H100/H200; the CPU interpreter has no SM count


def _lookup(table: dict, head_dim: int):
    for d in sorted(table):
        if head_dim <= d:
            return table[d]
    return table[max(table)]


def prefill_config(head_dim: int) -> PrefillConfig:
    return _INTERPRET_PREFILL if interpreting() else _lookup(PREFILL, head_dim)


def decode_config(head_dim: int) -> DecodeConfig:
    return _INTERPRET_DECODE if interpreting() else _lookup(DECODE, head_dim)


_sm_counts: dict[int, int] = {}


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (cached: the query is slow and not capturable)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return _DEFAULT_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_counts:
        _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _sm_counts[idx]
