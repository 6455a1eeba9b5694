"""Row argmax of a logits batch: the greedy sampler's one op on the GPU.

torch's argmax reduces a row in one thread block, so at batch 1 the 128k-entry row of a
Llama 3 vocabulary takes ~27 µs, about as long as one of the step's GEMVs
(bench/kernel_profile.py). Here the row is split into chunks, one program each, and a second
kernel reduces the chunks' (max, index) pairs: the whole GPU reads the row.

Ties go to the lowest index, as torch's argmax (and so greedy decoding reproduces between the
two). NaN counts as larger than every number, as in torch; among NaNs the first wins.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import FLOAT_DTYPES, check_last_dim_contiguous, check_tensor, next_power_of_2, pdl_launch
from llmesh.kernels.triton_helpers import pdl_enter

CHUNK = 2048
"""Entries a first-stage program reduces: 63 programs for a 128k row."""

_MAX_INDEX = 2**31 - 1
_BIG = tl.constexpr(_MAX_INDEX)  # the index of "no entry": above every real one


@triton.jit
def _max_first(vals, idx, valid):
    """(max, lowest index holding it) over `valid` lanes, NaN above +inf: the key is a float
    where NaN becomes +inf, and a NaN lane beats a +inf one by a flag."""
    nan = vals != vals
    key = tl.where(nan, float("inf"), vals)
    key = tl.where(valid, key, float("-inf"))
    best = tl.max(key, axis=0)
    any_nan = tl.max((nan & valid).to(tl.int32), axis=0)
    hit = valid & (key == best) & ((any_nan == 0) | nan)
    return best, any_nan, tl.min(tl.where(hit, idx, _BIG), axis=0)


@triton.jit
def _argmax_chunk_kernel(x_ptr, key_ptr, nan_ptr, idx_ptr, V, stride_x, NUM_CHUNKS,
                         CHUNK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < V
    x = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
    best, any_nan, first = _max_first(x, offs, valid)
    out = row * NUM_CHUNKS + chunk
    tl.store(key_ptr + out, best)
    tl.store(nan_ptr + out, any_nan)
    tl.store(idx_ptr + out, first)


@triton.jit
def _argmax_final_kernel(key_ptr, nan_ptr, idx_ptr, out_ptr, NUM_CHUNKS, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    valid = c < NUM_CHUNKS
    key = tl.load(key_ptr + row * NUM_CHUNKS + c, mask=valid, other=float("-inf"))
    nan = tl.load(nan_ptr + row * NUM_CHUNKS + c, mask=valid, other=0) != 0
    idx = tl.load(idx_ptr + row * NUM_CHUNKS + c, mask=valid, other=_BIG)
    best = tl.max(key, axis=0)
    any_nan = tl.max(nan.to(tl.int32), axis=0)
    # a chunk's index is the first of its best: chunks are in index order, so the lowest
    # index among the chunks that hold the row's best is the row's first
    hit = valid & (key == best) & ((any_nan == 0) | nan)
    tl.store(out_ptr + row, tl.min(tl.where(hit, idx, _BIG), axis=0).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] (float16 / bfloat16 / float32, rows contiguous) → [N] int64, the index of
    each row's largest entry (the first one on ties; NaN counts as largest)."""
    check_tensor("logits", logits, "[N, V]", 2, FLOAT_DTYPES)
    check_last_dim_contiguous("logits", logits)
    n, v = logits.shape
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return out
    if v == 0:
        raise ValueError("logits must have at least one column (V = 0)")
    if v > _MAX_INDEX - CHUNK:  # the last chunk's int32 offsets must not wrap
        raise ValueError(f"logits has V = {v} columns; indices must fit int32")
    chunks = triton.cdiv(v, CHUNK)
    key = torch.empty(n, chunks, dtype=torch.float32, device=logits.device)
    nan = torch.empty(n, chunks, dtype=torch.int32, device=logits.device)
    idx = torch.empty(n, chunks, dtype=torch.int32, device=logits.device)
    pdl = pdl_launch(logits.device)
    _argmax_chunk_kernel[(n, chunks)](logits, key, nan, idx, v, logits.stride(0), chunks, CHUNK=CHUNK,
                                      num_warps=4, **pdl)
    _argmax_final_kernel[(n,)](key, nan, idx, out, chunks, BLOCK_C=next_power_of_2(chunks), num_warps=1, **pdl)
    return out


def argmax_rows_ref(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)
