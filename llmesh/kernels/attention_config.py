"""Tile shapes of the attention kernels, in tables that bench/attn_sweep.py's winners paste into.

Two kernels, two regimes:

- `PREFILL`: the causal tile kernel of prefill_attention.py (also the long-query half of
  unified_attention). Compute bound: BLOCK_M rows of (query token, query head of one KV
  group) against BLOCK_N keys per step, `tl.dot` on 16-bit operands (wgmma on Hopper), with
  num_stages K/V tiles in flight. Large tiles while the accumulator fits in registers.
  `UNIFIED_LONG` (per device) replaces it for that half where measured: mixed steps.
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

import os
from dataclasses import dataclass

from llmesh.kernels.common import cuda_device_tag, interpreting


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


# device tag -> {head_dim: config} of the long-query launch inside unified_attention, from
# bench/attn_sweep.py's "mixed" part. PREFILL is chosen for whole prompts of 1k-8k tokens,
# where thousands of programs fill the GPU; in a mixed step the long queries are one or two
# chunks of a few hundred tokens beside hundreds of decodes, so the launch has ~100 working
# programs, each walking its keys one tile after another (on the H200 at 255 decodes plus a
# 400-token chunk it took 34-37 us a layer, kernel_profile_h200_c400_*.json). A device or
# head_dim without an entry takes PREFILL's. On the H200 (attn_sweep_h200_mixed.json, three mixed
# shapes timed as CUDA-graph replays of the whole unified call) 64 x 64 tiles with 2 stages took
# the call 1.03-1.05x faster than PREFILL's 128 x 32 x 4 (255 decodes + 400: 0.127 against 0.133
# ms). The same file times the halves alone: the decodes take ~0.11 ms of that call and the
# chunk ~0.03, so the long-query tile is a small share of a mixed step's attention.
UNIFIED_LONG: dict[str, dict[int, PrefillConfig]] = {
    "h200": {128: PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)},
}


def unified_long_config(head_dim: int, device) -> PrefillConfig:
    if interpreting():
        return _INTERPRET_PREFILL
    table = UNIFIED_LONG.get(cuda_device_tag(device)) if device.type == "cuda" else None
    return _lookup(table, head_dim) if table else _lookup(PREFILL, head_dim)


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


# ---- paged decode attention's partition size (paged_decode_attention.py) --------------------
# device tag -> {(sequence, KV head) pairs bucket: partition size}, from
# bench/decode_partition_sweep.py. Under a CUDA graph the partition grid is fixed by the model's
# maximum length, so at small batches only the partitions holding tokens work, each walking its
# keys one tile after another; smaller partitions spread a short context over more programs.
DECODE_PARTITION: dict[str, dict[int, int]] = {}
# bench/results/decode_partition_h200.json (H200, 2026-11-30; 32 query heads, 8 or 4 KV heads,
# head_dim 128, contexts 128-2048, max_seq_len 2048): at batch 1 size 64 takes 12.9 us at
# context 512 against 23.3 us with 512 (1.56x over the contexts); from 256 pairs 512 wins.
DECODE_PARTITION["h200"] = {4: 64, 8: 64, 16: 64, 32: 128, 64: 128, 128: 256, 256: 512, 512: 512}
# bench/results/decode_partition_h100.json (H100, 2026-12-07, same sweep): 1.54x size 512 at 4 pairs, 1.47x at 8,
# 1.30x at 16, 1.14x at 32, within 3% from 64. In the batch-1 step (kernel_profile_h100_*_part_*.json, one call):
# Qwen3-30B-A3B 3.349 -> 3.232 ms with size 64 (3.307 with 128), Llama-3-8B INT4 2.612 -> 2.559 ms.
DECODE_PARTITION["h100"] = {4: 64, 8: 64, 16: 128, 32: 256, 64: 128, 128: 128, 256: 512, 512: 512}

DEFAULT_DECODE_PARTITION = 512
SINGLE_PARTITION_PAIRS = 1024
"""(sequence, KV head) pairs from which a decode batch runs one partition per sequence: the
programs alone fill the GPU several times over, so splitting a context buys no parallelism,
while the split launch's reduce kernel costs a pass over every head's partials (26 us a layer
at batch 256 on the 8B shape, kernel_profile_h200_b256.json). Only where the launch's length
bound is at most SINGLE_PARTITION_MAX_LEN: one program walks a whole context, and one long
context among short ones must not make the step wait on a single program for long."""
SINGLE_PARTITION_MAX_LEN = 4096
FOLD_ENV = "LLMESH_DECODE_FOLD"
"""For A/B runs: 0, a split launch always combines its partitions in a second (reduce) kernel;
1, always in the last partition program to finish; unset (or auto), by FOLD_MIN_PAIRS."""
FOLD_MIN_PAIRS = 512
"""(sequence, KV head) pairs from which a split decode launch folds the combine into its last
partition program (paged_decode_attention.py). Measured on the H200 (8B shape under CUDA graphs,
kernel_profile.py, results in bench/results/decode_fold/): at 512 pairs (batch 64) the step took
5.23 ms folded against 5.44 ms with the reduce kernel; at 8 pairs (batch 1) 4.31 against 4.12 ms
in two alternating runs each. The combine was then made the reduce kernel's own vectorised one
(bench/results/decode_fold/shared_combine/, 8fe95f5): batch 64 still gains (5.38 against 5.53 ms),
batch 1 still loses (4.44 against 4.13 ms), so the serial loads were not the cause: at 8 pairs
the folding launch itself runs longer (its arrival atomics and the partials' round trip through
L2 sit on the critical path of a launch of a few dozen programs). Pairs in between were not
measured: the reduce kernel runs below 512."""
MAX_DECODE_PARTITIONS = 64
"""Most partitions a sequence is split into: past this the dead programs of a long maximum
length (a grid of B x H_kv x max_len / size) and the reduce's loop cost more than a short
partition saves (the sweep measured up to 32)."""


PARTITION_ENV = "LLMESH_DECODE_PARTITION"
"""For A/B runs (bench/plans): a power of two >= 16 that every decode launch splits contexts by,
in place of the measured table's size (e.g. the old default against a new table in one call)."""


def forced_partition() -> int | None:
    """LLMESH_DECODE_PARTITION's size, or None where unset; a value the kernel cannot take is
    refused with the variable's name, before any launch."""
    raw = os.environ.get(PARTITION_ENV, "").strip()
    if not raw:
        return None
    size = int(raw) if raw.isdigit() else 0
    if size < 16 or size & (size - 1):
        raise ValueError(f"attention_config: {PARTITION_ENV}={raw!r} is not a power of two >= 16")
    return size


def decode_partition_size(device, pairs: int, max_seq_len: int) -> int:
    """Partition size for a decode batch of `pairs` (sequences x KV heads) whose launch is sized
    for `max_seq_len` keys: the measured table's entry for the smallest bucket >= pairs, raised
    until at most MAX_DECODE_PARTITIONS partitions cover max_seq_len (never past 512); 512 where
    there is no table; LLMESH_DECODE_PARTITION's size where it is set."""
    import torch

    forced = forced_partition()
    if forced is not None:
        return forced
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return DEFAULT_DECODE_PARTITION
    table = DECODE_PARTITION.get(cuda_device_tag(device))
    return pick_partition(table or {}, pairs, max_seq_len)


def decode_fold(pairs: int) -> bool:
    """Whether a split decode launch of ``pairs`` (sequences x KV heads) combines its partitions
    in its last partition program rather than in a reduce kernel."""
    forced = os.environ.get(FOLD_ENV, "auto")
    if forced in ("0", "1"):
        return forced == "1"
    return pairs >= FOLD_MIN_PAIRS


def pick_partition(table: dict[int, int], pairs: int, max_seq_len: int) -> int:
    """decode_partition_size's rule over one device's table (one partition covering
    max_seq_len for a batch of SINGLE_PARTITION_PAIRS pairs or more). The cap only raises a measured
    size smaller than the default back toward it: past MAX_DECODE_PARTITIONS partitions of the
    default (a very long maximum length) the launch is what it was before the table existed."""
    if pairs >= SINGLE_PARTITION_PAIRS and max_seq_len <= SINGLE_PARTITION_MAX_LEN:
        return max(DEFAULT_DECODE_PARTITION, 1 << max(0, max_seq_len - 1).bit_length())
    size = next((table[b] for b in sorted(table) if pairs <= b), DEFAULT_DECODE_PARTITION)
    while size < DEFAULT_DECODE_PARTITION and -(-max_seq_len // size) > MAX_DECODE_PARTITIONS:
        size *= 2
    return size


# ---- paged decode attention's tile (paged_decode_attention.py) ---------------------------------
@dataclass(frozen=True)
class PagedDecodeTile:
    block_n: int
    """Keys a loop step loads (capped by the partition size)."""
    num_warps: int
    num_stages: int
    """K/V tiles Triton's pipeliner keeps in flight (shared memory: 2 * block_n * head_dim * 2
    bytes a stage at 16 bits, which bounds the programs an SM holds)."""


DEFAULT_PAGED_DECODE_TILE = PagedDecodeTile(block_n=64, num_warps=4, num_stages=3)
_INTERPRET_PAGED_DECODE_TILE = PagedDecodeTile(block_n=64, num_warps=1, num_stages=1)
# device tag (":fp8" appended for FP8 pools) -> {(sequence, KV head) pairs bucket: tile}, from
# bench/decode_tile_sweep.py (--kv-dtype fp8 for FP8 pools): the
# smallest bucket >= the batch's pairs, the largest past it; at most half the smallest bucket
# (batches the sweep did not time) the default tile.
PAGED_DECODE_TILE: dict[str, dict[int, PagedDecodeTile]] = {}
# bench/results/decode_tile_h100.json (H100, 2026-12-07, c4e36fd; the same grid as the H200's):
# 1.02-1.08x the default tile by bucket (512 pairs: 66.1 us mean, 1.08x), the same tiles as the
# H200's but for the 512 bucket's deeper pipeline.
PAGED_DECODE_TILE["h100"] = {
    256: PagedDecodeTile(block_n=128, num_warps=4, num_stages=2),
    512: PagedDecodeTile(block_n=64, num_warps=2, num_stages=4),
    1024: PagedDecodeTile(block_n=128, num_warps=4, num_stages=3),
    2048: PagedDecodeTile(block_n=128, num_warps=4, num_stages=3),
}
# bench/results/decode_tile_h200.json (H200, 2026-12-04; 32 query heads, 8 or 4 KV heads, head_dim
# 128, batches 64-256, contexts around 128-1024, the engine's partition sizes): 1.05-1.09x the
# default tile by bucket, e.g. 256 sequences of ~256 tokens on 8 KV heads 86.7 -> 82.6 us.
PAGED_DECODE_TILE["h200"] = {
    256: PagedDecodeTile(block_n=128, num_warps=4, num_stages=2),
    512: PagedDecodeTile(block_n=64, num_warps=2, num_stages=3),
    1024: PagedDecodeTile(block_n=128, num_warps=4, num_stages=3),
    2048: PagedDecodeTile(block_n=128, num_warps=4, num_stages=3),
}

# bench/results/decode_tile_h200_fp8.json (H200, 2026-12-04; FP8 pools with the V tile widened
# in place, 8 KV heads, batches 64-256, contexts around 256 and 1024): 1.09-1.10x the default
# tile by bucket, e.g. 256 sequences of ~256 tokens 94.9 -> 85.5 us.
PAGED_DECODE_TILE["h200:fp8"] = {
    512: PagedDecodeTile(block_n=64, num_warps=2, num_stages=4),
    1024: PagedDecodeTile(block_n=128, num_warps=4, num_stages=3),
    2048: PagedDecodeTile(block_n=64, num_warps=2, num_stages=3),
}


def paged_decode_tile(device, pairs: int, fp8: bool = False) -> PagedDecodeTile:
    """The tile of a paged decode launch of `pairs` (sequences x KV heads) on `device`; an FP8
    pool's from the table under "<device tag>:fp8" (its tiles load half the bytes and widen the
    codes: another balance, swept apart with `--kv-dtype fp8`)."""
    import torch

    if interpreting():
        return _INTERPRET_PAGED_DECODE_TILE
    device = torch.device(device)
    key = cuda_device_tag(device) + (":fp8" if fp8 else "")
    table = PAGED_DECODE_TILE.get(key) if device.type == "cuda" else None
    return pick_tile(table or {}, pairs)


def pick_tile(table: dict[int, PagedDecodeTile], pairs: int) -> PagedDecodeTile:
    """`table`'s tile for `pairs` (see PAGED_DECODE_TILE); the default where it has none."""
    if not table or pairs <= min(table) // 2:
        return DEFAULT_PAGED_DECODE_TILE
    return next((table[b] for b in sorted(table) if pairs <= b), table[max(table)])

