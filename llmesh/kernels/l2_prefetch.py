"""Bring a tensor's bytes into the GPU's L2 cache ahead of the kernel that will read them.

At batch 1 a decode layer alternates weight streams (the GEMVs, which keep HBM busy) with
kernels that read almost nothing from it (RoPE and the K/V write, the decode attention and its
reduce, the norms): for those microseconds the memory system idles. A weight the next GEMV
reads can be fetched into L2 in that window (an H100/H200 L2 holds 50 MB; the 8B model's o_proj
is 8.4 MB in INT4, Qwen3-30B-A3B's 16.8 MB in bf16), so the GEMV then reads it at L2 speed and
latency instead of HBM's. The engine launches this on a side stream (model/prefetch.py) once the
qkv projection (and its RoPE and K/V write) is queued; nothing waits for it, and it changes no
value anywhere.

A program (one warp) owns BLOCK chunks of CHUNK bytes; each thread issues one
``cp.async.bulk.prefetch.L2.global`` for its chunk (sm90+: an asynchronous bulk request the
memory system completes on its own, no registers or shared memory held, so the kernel exits at
once). Small chunks and one-warp programs spread a weight's requests over many SMs' copy
engines (about 70 programs for the 8B shape's INT4 o_proj, 8.9 MB with its scales) rather than
queueing them on a few. The instruction needs a 16-byte-aligned address and a size that is a multiple of 16, so
the range is the tensor's bytes widened to 16-byte boundaries inside its storage (`byte_span`).
With ``record`` the kernel also writes each chunk's (offset, size) — what the tests compare with
`chunk_plan`, the reference, under Triton's interpreter, which has no inline assembly and so
prefetches nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import interpreting

CHUNK = 4096
"""Bytes a prefetch instruction asks for (a multiple of 16; the PTX ISA states no maximum)."""
BLOCK = 32
"""Chunks a program issues: one a thread of its one warp."""


@triton.jit
def _l2_prefetch_kernel(base_ptr, nbytes, record_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        RECORD: tl.constexpr, INTERPRET: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start = idx.to(tl.int64) * CHUNK
    live = start < nbytes
    size = tl.where(live, tl.minimum(nbytes - start, CHUNK), 0).to(tl.int32)
    if not INTERPRET:
        # a dead chunk (size 0) issues nothing; the 0 the asm returns is stored nowhere, but a
        # store the compiler cannot prove dead keeps the asm (it has no output of its own); without
        # a record, record_ptr is the prefetched bytes themselves, never written
        zero = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [base_ptr + start, size], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(record_ptr + 2 * idx, zero.to(tl.int64), mask=live & (zero != 0))
    if RECORD:
        tl.store(record_ptr + 2 * idx, start, mask=live)
        tl.store(record_ptr + 2 * idx + 1, size.to(tl.int64), mask=live)


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte, bytes) of t's range widened to 16-byte boundaries, as offsets into its
    storage (the allocator aligns storages, so the widened range stays inside the allocation;
    its end is clipped to the storage's size, where the last partial 16 bytes are left out)."""
    if not t.is_contiguous():
        raise ValueError("l2_prefetch takes contiguous tensors (a weight): this one has strides "
                         f"{tuple(t.stride())} for shape {tuple(t.shape)}")
    first = t.storage_offset() * t.element_size()
    end = first + t.numel() * t.element_size()
    lo = first - first % 16
    hi = min(end + (-end) % 16, t.untyped_storage().nbytes())
    hi -= (hi - lo) % 16
    return lo, max(hi - lo, 0)


def chunk_plan(nbytes: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """The reference: the (offset, size) of each prefetch over ``nbytes`` bytes."""
    return [(off, min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]


def l2_prefetch(t: torch.Tensor, *, max_bytes: int | None = None, record: torch.Tensor | None = None) -> int:
    """Ask for t's bytes in L2 (asynchronously, on the current stream), at most its first
    ``max_bytes`` (rounded down to 16); returns the bytes asked for. A no-op on the CPU (0)
    unless Triton's interpreter runs it with ``record`` (int64 [2 * chunks], the tests'). Values
    never change: a prefetch is a hint."""
    lo, nbytes = byte_span(t)
    if max_bytes is not None:
        nbytes = min(nbytes, max(0, max_bytes) // 16 * 16)
    if nbytes == 0 or not (t.is_cuda or interpreting()):
        return 0
    chunks = triton.cdiv(nbytes, CHUNK)
    if record is not None and record.numel() < 2 * chunks:
        raise ValueError(f"record has {record.numel()} entries; {2 * chunks} needed for {chunks} chunks")
    data = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage(), lo, (nbytes,), (1,))
    if data.data_ptr() % 16:  # a storage the caching allocator did not align: the instruction would fault
        return 0
    rec = record if record is not None else data  # the guarded store's target, never taken
    _l2_prefetch_kernel[(triton.cdiv(chunks, BLOCK),)](
        data, nbytes, rec, CHUNK=CHUNK, BLOCK=BLOCK, RECORD=record is not None, INTERPRET=interpreting(),
        num_warps=BLOCK // 32)
    return nbytes
