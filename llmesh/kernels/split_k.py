"""Split-K with the reduction inside the same launch, for the weight-only quantized kernels.

A decode-size GEMM splits K across programs so that a layer with few output tiles still keeps
every SM loading. The partial sums must then be added. Summing them with torch (`part.sum(0)`
and a cast into the output) costs two more launches: on the H200 at 4096x14336, M = 16, they
took 5-7 us beside a 31 us W4A16 kernel. Here every split stores its float32 partial
[SPLITS, M, N], and the last split of an output tile to arrive (one arrival counter per tile,
common.arrival_counters) sums the partials in split order and writes the output:

- one launch, no host synchronisation, CUDA-graph safe (the counters are one fixed buffer per
  kernel and stream, and the last arrival resets its own to zero);
- deterministic: the sum's order is the split order, whichever split finished last.

quant_gemv.py (the no-dot GEMV), the tl.dot kernels (w4a16_gemm.py, w8a16_gemm.py), the
fused MoE's gate/up GEMM at decode sizes (fused_moe.py, whose last split runs the SiLU epilogue
on the sums), the dense skinny GEMV (skinny_gemm.py, fused_skinny.py: the bias added after the
sum) and the MoE entry's router (moe_norm_router.py: its last program makes the top-k choice)
share it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import arrival_counters
from llmesh.kernels.triton_helpers import cast_rtne


@triton.jit
def store_out(acc, out_ptr, rm, cols, mask, stride_om, INTERPRET: tl.constexpr):
    """y's tile [len(rm), len(cols)] in out's dtype."""
    out = out_ptr + rm.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, cast_rtne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def store_part(acc, part_ptr, pid_k, rm, cols, mask, M, N):
    """This split's float32 partial of the tile (part: [SPLITS, M, N])."""
    tl.store(part_ptr + pid_k.to(tl.int64) * M * N + (rm[:, None] * N + cols[None, :]).to(tl.int64), acc, mask=mask)


@triton.jit
def arrive(lock_ptr, tile):
    """This split's arrival at its output tile; the last one to arrive sees SPLITS - 1."""
    tl.debug_barrier()  # every thread's partial is stored before the release below
    return tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")


@triton.jit
def load_sum(part_ptr, rm, cols, mask, M, N, splits, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile's partials summed in split order (float32)."""
    tile = (rm[:, None] * N + cols[None, :]).to(tl.int64)
    total = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for s in range(splits):
        total += tl.load(part_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def store_sum(part_ptr, out_ptr, rm, cols, mask, M, N, stride_om, splits, BLOCK_M: tl.constexpr,
              BLOCK_C: tl.constexpr, INTERPRET: tl.constexpr):
    """y = the tile's partials summed in split order."""
    total = load_sum(part_ptr, rm, cols, mask, M, N, splits, BLOCK_M, BLOCK_C)
    store_out(total, out_ptr, rm, cols, mask, stride_om, INTERPRET)


@triton.jit
def add_bias(acc, bias_ptr, cols, N, HAS_BIAS: tl.constexpr):
    """acc + bias[cols] in float32 where HAS_BIAS (after the split sum: y is rounded once)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def finish(acc, part_ptr, lock_ptr, out_ptr, rm, rn, mask, tile, pid_k, M, N, stride_om, splits,
           SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
           bias_ptr=None, HAS_BIAS: tl.constexpr = False):
    """Write y's tile (SPLIT false), or this split's partial, the last split to arrive at
    ``tile`` then summing all of them into y and resetting the tile's counter; the bias (HAS_BIAS)
    added to the whole sum before the one rounding."""
    if not SPLIT:
        store_out(add_bias(acc, bias_ptr, rn, N, HAS_BIAS), out_ptr, rm, rn, mask, stride_om, INTERPRET)
    else:
        store_part(acc, part_ptr, pid_k, rm, rn, mask, M, N)
        if arrive(lock_ptr, tile) == splits - 1:
            total = load_sum(part_ptr, rm, rn, mask, M, N, splits, BLOCK_M, BLOCK_N)
            store_out(add_bias(total, bias_ptr, rn, N, HAS_BIAS), out_ptr, rm, rn, mask, stride_om, INTERPRET)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch on this stream


@triton.jit
def finish_words(y0, y1, y2, y3, part_ptr, lock_ptr, out_ptr, rm, rc, mask, tile, pid_k, M, N, stride_om,
                 splits, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """finish for the four column classes of an int32-word tile (y_b: columns 4c + b, for the
    BLOCK_C words rc of one tile). The partials are stored by class (every fourth column), but
    summed over the tile's 4 * BLOCK_C contiguous columns at once: read by class, the sum took
    a quarter of each sector it loaded (at M = 16, 9 splits: 45 us where torch's sum gave 37)."""
    if not SPLIT:
        store_out(y0, out_ptr, rm, 4 * rc, mask, stride_om, INTERPRET)
        store_out(y1, out_ptr, rm, 4 * rc + 1, mask, stride_om, INTERPRET)
        store_out(y2, out_ptr, rm, 4 * rc + 2, mask, stride_om, INTERPRET)
        store_out(y3, out_ptr, rm, 4 * rc + 3, mask, stride_om, INTERPRET)
    else:
        store_part(y0, part_ptr, pid_k, rm, 4 * rc, mask, M, N)
        store_part(y1, part_ptr, pid_k, rm, 4 * rc + 1, mask, M, N)
        store_part(y2, part_ptr, pid_k, rm, 4 * rc + 2, mask, M, N)
        store_part(y3, part_ptr, pid_k, rm, 4 * rc + 3, mask, M, N)
        if arrive(lock_ptr, tile) == splits - 1:
            cols = 4 * tl.min(rc, axis=0) + tl.arange(0, 4 * BLOCK_C)
            store_sum(part_ptr, out_ptr, rm, cols, (rm < M)[:, None] & (cols < N)[None, :], M, N, stride_om, splits,
                      BLOCK_M, 4 * BLOCK_C, INTERPRET)
            tl.atomic_xchg(lock_ptr + tile, 0)


def split_buffers(kernel: str, x: torch.Tensor, m: int, n: int, splits: int, tiles: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partials [splits, m, n], the kernel's arrival counters) for a launch of
    ``tiles`` output tiles; with one split neither is used (x stands in for both pointers)."""
    if splits == 1:
        return x, x
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    return part, arrival_counters(kernel, x.device, tiles)
