"""The align step of the fused MoE layer: (token, slot) pairs sorted by expert, each expert's
run padded to BLOCK_M, so every BLOCK_M block of the sorted list belongs to one expert.

Four implementations of one contract (``moe_align_block_size``), the path picked by size:

- ``moe_align_block_size_ref``: torch ops (a histogram, cumulative sums, a stable argsort,
  scatters, a searchsorted): the reference, and the CPU's path;
- ``_moe_align_kernel``: one Triton program. In a decode step's CUDA graph the torch version
  is about twenty small kernels per MoE layer (a stable sort alone is several), each a few
  microseconds however few the pairs, which at batch 1 is comparable to the layer's two GEMMs
  (vLLM and SGLang have a CUDA kernel for this step for the same reason). One program walks
  the pairs in chunks: a histogram by comparison against the expert ids, the padded run
  starts by a cumulative sum, then each chunk's pairs placed at their expert's running write
  position plus their rank among the chunk's pairs of that expert (a [CHUNK, CHUNK] lower
  triangle), which keeps the sort stable. Its cost grows with the pairs on one SM, so it runs
  up to ALIGN_KERNEL_MAX_PAIRS and the chunked kernels beyond.
- the chunked kernels, for large batches (a prefill of 4k tokens is 32k pairs at top-8, where
  the torch ops' argsort and scatters took 143 us on the H200, these 55): the pairs in
  chunks of CHUNK_PAIRS, one program each, in three launches: each chunk's count per bucket
  (and its share of the padding fill); one program scans those counts, down the chunks for
  each chunk's offset inside its bucket's run and across the buckets for the runs' padded
  starts; then each chunk places its pairs at run start + chunk offset + rank, the rank
  counted as in the one-program kernel. Stable too, and no atomics: the output does not
  depend on scheduling.
- the "sorted" path: the chunked kernels without their serial steps of _CHUNK pairs. On the
  H200 the chunked kernels took 28 us for 8 pairs: each program walks its 256 pairs 32 at a
  time, each step a [32, E + 1] comparison against every bucket, a chain of dependent steps
  however few the pairs. Here a chunk's counts are one ``tl.histogram``; its placement one
  ``tl.sort`` of (bucket, index) keys, a pair's rank in its bucket then being its sorted
  position less the chunk's pairs of lower buckets (a ``tl.gather`` of their cumulative
  count); and the block experts, the scan program's serial loop over every block, are found by
  the place programs, a share each. Same outputs, stable, no atomics. On CUDA it takes every
  size past ``ALIGN_PROGRAM_MAX_PAIRS_SORTED`` (``ALIGN_SORTED_ON_CUDA``, measured below).

All four give identical outputs (tests/kernels/test_moe_align.py): no host read, CUDA-graph
safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import interpreting, next_power_of_2, pdl_launch
from llmesh.kernels.triton_helpers import pdl_enter

ALIGN_KERNEL_MAX_PAIRS = 512
"""Pairs (tokens x top-k) up to which the one-program kernel aligns; the chunked kernels above.
On the H200 (moe_h200_align.json, 128 experts, top-8, 628393d) the one program took 7.8 us for
8 pairs and 31.7 us for 512, the chunked kernels 28.0 and 36.3; at 1,024 pairs 56.3 against
38.9 (the one program's time grows with the pairs on one SM, the chunks spread them). Past it
the chunked kernels beat the torch ops at every size measured: 38.9 / 40.4 / 46.4 / 54.9 us at
1,024 / 2,048 / 8,192 / 32,768 pairs against 96.9 / 98.3 / 146.9 / 143.1 (the Qwen3-30B-A3B layer
at a 4,096-token prefill: 0.942 ms against 0.995)."""

ALIGN_KERNEL_ON_CUDA = True
"""Measured on the H200 (bench/moe_gpu.py, moe_h200.json): the Qwen3-30B-A3B-shaped layer in a
CUDA graph took 0.043 ms with the kernel against 0.102 ms with the torch ops at batch 1, and
0.324 against 0.387 ms at batch 64; tests/kernels/test_moe_align.py passes there
(gpu_tests_h200.json)."""

ALIGN_SORTED_ON_CUDA = True
"""Whether the sorted path replaces the chunked kernels on CUDA, and the one program past
ALIGN_PROGRAM_MAX_PAIRS_SORTED. On the H100 (moe_h100_sorted.json, 78a1272; 128 experts, top-8)
it took 10.2 / 12.6 / 11.8 / 11.1 / 12.6 / 20.8 us at 8 / 512 / 1,024 / 2,048 / 8,192 / 32,768
pairs, where the chunked kernels took 28.0 / 37.5 / 38.0 / 41.0 / 46.6 / 61.3 and the one
program 7.9 / 32.5 / 55.3 / 101.7 / 378 / 1,827; the Qwen3-30B-A3B layer at batch 64 0.427 ms
against 0.447 with the one program, at a 4,096-token prefill 1.014 against 1.053 chunked."""

ALIGN_PROGRAM_MAX_PAIRS_SORTED = 64
"""Pairs up to which the one program still aligns while the sorted path is on: its time grows
~0.05 us a pair from 7.9 us (8 pairs), the sorted path's stays ~10-12 us, so they cross near 64
(batch 8 at top-8; moe_gpu.py's align part times 32, 64 and 128 pairs to place it)."""

ALIGN_PATHS = ("torch", "program", "chunks", "sorted")

CHUNK_PAIRS = 256
"""Pairs per program of the chunked kernels (a loop of _CHUNK-pair steps)."""

_CHUNK = 32
_SCAN_ROWS = 16


def padded_length_bound(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Most entries the sorted, padded list can need: each hit expert (and the run of pairs
    held elsewhere, id -1) pads < BLOCK_M rows, and at most min(E + 1, T * k) runs exist."""
    return num_pairs + min(num_experts + 1, num_pairs) * (block_m - 1)


def _length(n: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(padded_length_bound(n, num_experts, block_m), block_m) * block_m


def moe_align_block_size_ref(topk_ids: torch.Tensor, block_m: int, num_experts: int
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align_block_size in torch ops."""
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)  # [N]
    flat = torch.where(flat < 0, num_experts, flat)  # bucket E: pairs of other ranks' experts
    n = flat.numel()
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))  # [E + 1]
    padded = (counts + block_m - 1) // block_m * block_m  # [E + 1]
    ends = torch.cumsum(padded, 0)  # [E + 1]
    starts = ends - padded
    first_pair = torch.cumsum(counts, 0) - counts  # [E + 1] where each run's pairs begin, unpadded
    order = torch.argsort(flat, stable=True)  # [N]
    expert_of = flat[order]
    dest = starts[expert_of] + torch.arange(n, device=device) - first_pair[expert_of]  # [N]
    length = _length(n, num_experts, block_m)
    sorted_ids = torch.full((length,), n, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, length, block_m, device=device)  # [P / BLOCK_M]
    expert_ids = torch.searchsorted(ends, block_starts, right=True)
    expert_ids = torch.where(expert_ids < num_experts, expert_ids, -1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit
def _experts_of(ids_ptr, i, N, E):
    """The bucket of pairs i (E for -1, another rank's expert) and which of them exist."""
    valid = i < N
    e = tl.load(ids_ptr + i, mask=valid, other=0).to(tl.int32)
    return tl.where(e < 0, E, e), valid


# Specialised on its sizes, unlike the kernels that run in eager steps of any size: it runs for
# at most ALIGN_KERNEL_MAX_PAIRS pairs, i.e. in decode steps, whose sizes the CUDA graphs compile
# at capture, and specialising is worth it there (31 us at T = 64 on the H200 against 52 us
# with N, LENGTH and NUM_BLOCKS unspecialised; moe_align_t64_kernel_us in moe_h200.json).
@triton.jit
def _moe_align_kernel(ids_ptr, sorted_ptr, expert_ids_ptr, num_post_ptr, next_ptr,
                      N, E, LENGTH, NUM_BLOCKS,
                      BLOCK_M: tl.constexpr, E_P2: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    r = tl.arange(0, CHUNK)
    bins = tl.arange(0, E_P2)  # experts 0..E-1, then bucket E; bins past E stay empty
    # 1. pairs per bucket
    counts = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, N, CHUNK):
        e, valid = _experts_of(ids_ptr, c0 + r, N, E)
        counts += tl.sum(((e[:, None] == bins[None, :]) & valid[:, None]).to(tl.int32), axis=0)
    # 2. each bucket's run, padded to BLOCK_M, in bucket order
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(next_ptr + bins, ends - padded)  # the running write position of each bucket
    tl.store(num_post_ptr, tl.sum(padded, axis=0))
    for p0 in range(0, LENGTH, CHUNK):  # padding slots hold N
        p = p0 + r
        tl.store(sorted_ptr + p, tl.full([CHUNK], 0, tl.int32) + N, mask=p < LENGTH)
    tl.debug_barrier()
    # 3. pairs placed in order: rank among the chunk's earlier pairs of the same bucket
    earlier = r[None, :] < r[:, None]  # [CHUNK, CHUNK]: j < i
    for c0 in range(0, N, CHUNK):
        i = c0 + r
        e, valid = _experts_of(ids_ptr, i, N, E)
        same = (e[:, None] == e[None, :]) & earlier & valid[None, :]
        rank = tl.sum(same.to(tl.int32), axis=1)
        pos = tl.load(next_ptr + e, mask=valid, other=0) + rank
        tl.store(sorted_ptr + pos, i, mask=valid)
        tl.debug_barrier()  # every position read before the running positions move on
        moved = tl.sum(((e[:, None] == bins[None, :]) & valid[:, None]).to(tl.int32), axis=0)
        tl.store(next_ptr + bins, tl.load(next_ptr + bins) + moved)
        tl.debug_barrier()
    # 4. each block's expert: how many runs end at or before its start (searchsorted, right)
    ends_live = tl.where(bins <= E, ends, 2147483647)
    for b0 in range(0, NUM_BLOCKS, CHUNK):
        b = b0 + r
        owner = tl.sum((ends_live[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + b, tl.where(owner < E, owner, -1), mask=b < NUM_BLOCKS)


@triton.jit
def _bucket_onehot(e, valid, bins):
    return ((e[:, None] == bins[None, :]) & valid[:, None]).to(tl.int32)  # [_CHUNK, E_P2]


@triton.jit(do_not_specialize=["N", "LENGTH", "FILL"])
def _chunk_counts_kernel(ids_ptr, counts_ptr, sorted_ptr, N, E, LENGTH, FILL,
                         E_P2: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr, HIST: tl.constexpr,
                         PDL: tl.constexpr):
    """counts[c, b] = chunk c's pairs in bucket b; sorted_ids[c * FILL, (c + 1) * FILL) = N.
    HIST: the chunk's SPAN pairs in one tl.histogram, else CHUNK at a time against every bucket."""
    pdl_enter(PDL)
    c = tl.program_id(0)
    r = tl.arange(0, CHUNK)
    bins = tl.arange(0, E_P2)
    if HIST:
        e, valid = _experts_of(ids_ptr, c * SPAN + tl.arange(0, SPAN), N, E)
        counts = tl.histogram(e, E_P2, mask=valid)
    else:
        counts = tl.zeros([E_P2], dtype=tl.int32)
        for s0 in range(0, SPAN, CHUNK):
            e, valid = _experts_of(ids_ptr, c * SPAN + s0 + r, N, E)
            counts += tl.sum(_bucket_onehot(e, valid, bins), axis=0)
    tl.store(counts_ptr + c * E_P2 + bins, counts)
    fill_end = tl.minimum((c + 1) * FILL, LENGTH)
    for p0 in range(c * FILL, fill_end, CHUNK):  # padding slots hold N; placed pairs overwrite theirs
        p = p0 + r
        tl.store(sorted_ptr + p, tl.full([CHUNK], 0, tl.int32) + N, mask=p < fill_end)


@triton.jit(do_not_specialize=["C", "NUM_BLOCKS"])
def _chunk_scan_kernel(counts_ptr, base_ptr, expert_ids_ptr, num_post_ptr, ends_ptr, C, E, NUM_BLOCKS,
                       BLOCK_M: tl.constexpr, E_P2: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr,
                       OWNERS: tl.constexpr, PDL: tl.constexpr):
    """base[c, b] = where chunk c's pairs of bucket b begin in sorted_ids (the bucket's padded run
    start plus the bucket's pairs in chunks before c); the padded length; the block experts
    (OWNERS), or the runs' ends for the place programs to find them (ends_ptr [E_P2])."""
    pdl_enter(PDL)
    bins = tl.arange(0, E_P2)
    rows = tl.arange(0, ROWS)
    total = tl.zeros([E_P2], dtype=tl.int32)
    for c0 in range(0, C, ROWS):
        cr = c0 + rows
        total += tl.sum(tl.load(counts_ptr + cr[:, None] * E_P2 + bins[None, :], mask=(cr < C)[:, None], other=0),
                        axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    tl.store(num_post_ptr, tl.sum(padded, axis=0))
    running = ends - padded  # each bucket's run start, then moved past each chunk's pairs
    for c0 in range(0, C, ROWS):
        cr = c0 + rows
        at = cr[:, None] * E_P2 + bins[None, :]
        tile = tl.load(counts_ptr + at, mask=(cr < C)[:, None], other=0)
        tl.store(base_ptr + at, running[None, :] + tl.cumsum(tile, axis=0) - tile, mask=(cr < C)[:, None])
        running += tl.sum(tile, axis=0)
    ends_live = tl.where(bins <= E, ends, 2147483647)
    if OWNERS:
        _block_owners(ends_live, expert_ids_ptr, 0, NUM_BLOCKS, E, BLOCK_M, CHUNK)
    else:
        tl.store(ends_ptr + bins, ends_live)


@triton.jit
def _block_owners(ends_live, expert_ids_ptr, first, last, E, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """expert_ids[first:last]: each block's expert, the runs ending at or before its start
    counted (searchsorted, right), as in _moe_align_kernel; -1 past the experts."""
    r = tl.arange(0, CHUNK)
    for b0 in range(first, last, CHUNK):
        b = b0 + r
        owner = tl.sum((ends_live[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + b, tl.where(owner < E, owner, -1), mask=b < last)


@triton.jit(do_not_specialize=["N", "NUM_BLOCKS", "BLOCKS_EACH"])
def _sorted_place_kernel(ids_ptr, counts_ptr, base_ptr, ends_ptr, sorted_ptr, expert_ids_ptr, N, E, NUM_BLOCKS,
                         BLOCKS_EACH, BLOCK_M: tl.constexpr, E_P2: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr,
                         PDL: tl.constexpr):
    """_chunk_place_kernel's placement without its CHUNK-pair steps: the chunk's SPAN pairs
    sorted once by (bucket, index), so a pair's rank in its bucket is its sorted position less
    the chunk's pairs of lower buckets; then this program's BLOCKS_EACH of the block experts."""
    pdl_enter(PDL)
    c = tl.program_id(0)
    r = tl.arange(0, SPAN)
    bins = tl.arange(0, E_P2)
    e, valid = _experts_of(ids_ptr, c * SPAN + r, N, E)
    counts = tl.load(counts_ptr + c * E_P2 + bins)  # the count kernel's histogram of this chunk
    first = tl.cumsum(counts, axis=0) - counts  # the chunk's pairs in lower buckets
    key = tl.sort(tl.where(valid, e, E_P2) * SPAN + r)  # missing pairs (past N) sort last
    bucket = key // SPAN
    placed = bucket < E_P2
    bucket = tl.where(placed, bucket, 0)
    rank = r - tl.gather(first, bucket, 0)
    pos = tl.load(base_ptr + c * E_P2 + bucket, mask=placed, other=0) + rank
    tl.store(sorted_ptr + pos, c * SPAN + key % SPAN, mask=placed)
    ends_live = tl.load(ends_ptr + bins)
    _block_owners(ends_live, expert_ids_ptr, c * BLOCKS_EACH, tl.minimum((c + 1) * BLOCKS_EACH, NUM_BLOCKS),
                  E, BLOCK_M, CHUNK)


@triton.jit(do_not_specialize=["N"])
def _chunk_place_kernel(ids_ptr, base_ptr, sorted_ptr, N, E,
                        E_P2: tl.constexpr, SPAN: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """Chunk c's pairs at base[c, bucket] + the bucket's pairs placed before them in the chunk."""
    pdl_enter(PDL)
    c = tl.program_id(0)
    r = tl.arange(0, CHUNK)
    bins = tl.arange(0, E_P2)
    earlier = r[None, :] < r[:, None]  # [CHUNK, CHUNK]: j < i
    seen = tl.zeros([E_P2], dtype=tl.int32)  # this chunk's pairs placed so far, per bucket
    for s0 in range(0, SPAN, CHUNK):
        i = c * SPAN + s0 + r
        e, valid = _experts_of(ids_ptr, i, N, E)
        onehot = _bucket_onehot(e, valid, bins)
        rank = tl.sum(((e[:, None] == e[None, :]) & earlier & valid[None, :]).to(tl.int32), axis=1)
        before = tl.sum(onehot * seen[None, :], axis=1)
        pos = tl.load(base_ptr + c * E_P2 + e, mask=valid, other=0) + before + rank
        tl.store(sorted_ptr + pos, i, mask=valid)
        seen += tl.sum(onehot, axis=0)


def _align_chunks(flat: torch.Tensor, block_m: int, num_experts: int, sorted_ids: torch.Tensor,
                  expert_ids: torch.Tensor, num_post: torch.Tensor, sort: bool = False) -> None:
    """The chunked kernels; ``sort``: the "sorted" path's (histograms, one sort a chunk, the
    block experts found by the place programs instead of the scan's one)."""
    n, length = flat.numel(), sorted_ids.numel()
    e_p2 = next_power_of_2(num_experts + 1)
    chunks = triton.cdiv(n, CHUNK_PAIRS)
    counts = torch.empty(chunks, e_p2, dtype=torch.int32, device=flat.device)
    base = torch.empty_like(counts)
    ends = torch.empty(e_p2, dtype=torch.int32, device=flat.device) if sort else counts
    blocks = length // block_m
    pdl = pdl_launch(flat.device)
    _chunk_counts_kernel[(chunks,)](flat, counts, sorted_ids, n, num_experts, length, triton.cdiv(length, chunks),
                                    E_P2=e_p2, SPAN=CHUNK_PAIRS, CHUNK=_CHUNK, HIST=sort, num_warps=4, **pdl)
    _chunk_scan_kernel[(1,)](counts, base, expert_ids, num_post, ends, chunks, num_experts, blocks,
                             BLOCK_M=block_m, E_P2=e_p2, ROWS=_SCAN_ROWS, CHUNK=_CHUNK, OWNERS=not sort,
                             num_warps=4, **pdl)
    if sort:
        _sorted_place_kernel[(chunks,)](flat, counts, base, ends, sorted_ids, expert_ids, n, num_experts, blocks,
                                        triton.cdiv(blocks, chunks), BLOCK_M=block_m, E_P2=e_p2,
                                        SPAN=CHUNK_PAIRS, CHUNK=_CHUNK, num_warps=4, **pdl)
    else:
        _chunk_place_kernel[(chunks,)](flat, base, sorted_ids, n, num_experts,
                                       E_P2=e_p2, SPAN=CHUNK_PAIRS, CHUNK=_CHUNK, num_warps=4, **pdl)


def default_align_path(topk_ids: torch.Tensor) -> str:
    """The path moe_align_block_size takes for these ids: under the interpreter and on CUDA,
    the one-program kernel up to ALIGN_KERNEL_MAX_PAIRS pairs (on CUDA while
    ALIGN_KERNEL_ON_CUDA) and the chunked kernels past it; on CUDA while ALIGN_SORTED_ON_CUDA the
    one program up to ALIGN_PROGRAM_MAX_PAIRS_SORTED and the sorted path past it; the torch ops on
    the CPU."""
    n = topk_ids.numel()
    if n == 0 or not (interpreting() or topk_ids.is_cuda):
        return "torch"
    sort = ALIGN_SORTED_ON_CUDA and not interpreting()
    if n <= (ALIGN_PROGRAM_MAX_PAIRS_SORTED if sort else ALIGN_KERNEL_MAX_PAIRS):
        return "program" if interpreting() or ALIGN_KERNEL_ON_CUDA else "torch"
    return "sorted" if sort else "chunks"


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, num_experts: int, *, path: str | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort (token, slot) pairs by expert, each expert's run padded to BLOCK_M.

    topk_ids [T, k] (ids in [0, E), or -1: an expert held by another rank) → (sorted_ids
    int32 [P]: flat pair index t * k + j, or T * k for padding; expert_ids int32 [P / BLOCK_M]:
    the expert of each block, -1 for the run of id -1 pairs (after every expert's) and past
    the end; num_tokens_post_padded int32 [1], that run included). P is
    ``padded_length_bound`` rounded up to BLOCK_M. Pairs of one expert keep their token order
    (a stable sort). ``path`` (one of ALIGN_PATHS) forces an implementation (tests, the
    benchmark); by default `default_align_path` picks one by size and device.
    """
    n = topk_ids.numel()
    path = path or default_align_path(topk_ids)
    if path not in ALIGN_PATHS:
        raise ValueError(f"path must be one of {ALIGN_PATHS}, got {path!r}")
    if path == "torch" or n == 0:
        return moe_align_block_size_ref(topk_ids, block_m, num_experts)
    device = topk_ids.device
    length = _length(n, num_experts, block_m)
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    expert_ids = torch.empty(length // block_m, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)
    if path in ("chunks", "sorted"):
        _align_chunks(topk_ids.reshape(-1), block_m, num_experts, sorted_ids, expert_ids, num_post,
                      sort=path == "sorted")
        return sorted_ids, expert_ids, num_post
    e_p2 = next_power_of_2(num_experts + 1)
    next_pos = torch.empty(e_p2, dtype=torch.int32, device=device)
    _moe_align_kernel[(1,)](topk_ids.reshape(-1), sorted_ids, expert_ids, num_post, next_pos,
                            n, num_experts, length, length // block_m,
                            BLOCK_M=block_m, E_P2=e_p2, CHUNK=_CHUNK, num_warps=4, **pdl_launch(device))
    return sorted_ids, expert_ids, num_post
