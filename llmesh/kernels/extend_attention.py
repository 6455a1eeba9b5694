"""Causal attention of prefill chunks after a cached prefix (prefix-cache hits, the later chunks of
a chunked prompt), dispatched to the faster backend by measurement.

The paged Triton prefill kernel (prefill_attention.py) reads every key through the block table,
tile by tile. FlashAttention-3's build we carry (fa3.py) has no paged K/V, but its varlen kernel
takes more keys than queries per sequence, the mask aligned to the last key, which is an
extend's causal mask. So the "fa3" path first copies each sequence's context rows out of the pool
into one contiguous [sum(seq_lens), H_kv, D] pair (`gather_kv`: the context's K and V read once
and written once, a small share of a long chunk's attention time) and runs FA3 on that.

An FP8 pool is dequantized as it is gathered (E4M3 codes times their power-of-two scales, exact
in bfloat16), so FA3 sees the values the paged kernels and the torch reference compute with: for
an FP8 pool this path also takes fresh prompts, whose keys must be the stored ones too (the
dense path, over the unquantized new K/V, is for 16-bit pools).

Dispatch rule (backend="auto"): the Triton kernel below `LIBRARY_MIN_TOKENS` new tokens, off a
CUDA device and where the device's `EXTEND_BACKEND` entry for the batch's mean new tokens per
sequence does not say "fa3" (bench/kernels_gpu.py --parts causal measures both on a 16-bit
pool and prints the table); FA3 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from llmesh.kernels import fa3
from llmesh.kernels.common import FLOAT_DTYPES, INDEX_DTYPES, check_size, check_tensor, measured_bucket, next_power_of_2
from llmesh.kernels.dense_causal_attention import LIBRARY_MIN_TOKENS
from llmesh.kernels.kv_quant import exponent_to_scale
from llmesh.kernels.kv_quant_ref import check_kv_scales, dequantize_kv_ref
from llmesh.kernels.prefill_attention import check_varlen_paged, prefill_attention

BACKENDS = ("auto", "fa3", "triton")

EXTEND_BACKEND: dict[str, dict[int, str]] = {}
"""Per device tag: {largest mean new tokens per sequence of a bucket: "fa3" or "triton", the faster
bench/kernels_gpu.py measured there (chunks after a cached prefix)}. A device without an entry
runs the Triton kernel."""
EXTEND_BACKEND["h200"] = {128: "fa3", 1024: "fa3", 4096: "fa3"}
EXTEND_BACKEND["h100"] = {128: "triton", 1024: "fa3", 4096: "fa3"}


@triton.jit
def _gather_rows(cache_ptr, scale_ptr, out_ptr, block, t, h, d, rows, mask, stride_b, stride_t, stride_o,
                 stride_sb, stride_st, HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
    """One block's [BLOCK_SIZE, H, D] tile of a pool copied to its rows of the output."""
    row = h[None, :, None] * HEAD_DIM + d[None, None, :]
    x = tl.load(cache_ptr + block * stride_b + t[:, None, None] * stride_t + row, mask=mask)
    if FP8:  # E4M3 codes times their (token, head) power of two: exact in float32 and bfloat16
        e = tl.load(scale_ptr + block * stride_sb + t[:, None] * stride_st + h[None, :],
                    mask=tl.max(mask.to(tl.int32), axis=2) > 0, other=127)
        x = (x.to(tl.float32) * exponent_to_scale(e)[:, :, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None, None] * stride_o + row, x, mask=mask)


@triton.jit
def _gather_kv_kernel(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_out_ptr, v_out_ptr, tables_ptr, cu_k_ptr,
                      stride_kb, stride_kt, stride_vb, stride_vt, stride_sb, stride_st, stride_tab, stride_ko,
                      stride_vo, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr):
    """Program (s, b) copies block b of sequence s's context: its tokens' [H_kv, D] rows
    (contiguous in the pool) to rows cu_k[s] + b * BLOCK_SIZE + t of the outputs; an FP8 pool's
    rows dequantized by their scales ([num_blocks, block_size, H_kv] exponents)."""
    s = tl.program_id(0)
    b = tl.program_id(1)
    start = tl.load(cu_k_ptr + s)
    n = tl.load(cu_k_ptr + s + 1) - start
    if b * BLOCK_SIZE < n:
        block = tl.load(tables_ptr + s * stride_tab + b).to(tl.int64)
        t = tl.arange(0, BLOCK_SIZE)
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        mask = (((b * BLOCK_SIZE + t) < n)[:, None, None] & (h < NUM_HEADS)[None, :, None]
                & (d < HEAD_DIM)[None, None, :])
        rows = (start + b * BLOCK_SIZE + t).to(tl.int64)
        _gather_rows(k_cache_ptr, k_scale_ptr, k_out_ptr, block, t, h, d, rows, mask, stride_kb, stride_kt, stride_ko,
                     stride_sb, stride_st, HEAD_DIM, FP8)
        _gather_rows(v_cache_ptr, v_scale_ptr, v_out_ptr, block, t, h, d, rows, mask, stride_vb, stride_vt, stride_vo,
                     stride_sb, stride_st, HEAD_DIM, FP8)


def _check_token_rows(name: str, cache: torch.Tensor) -> None:
    _, _, h, d = cache.shape
    if cache.stride(3) != 1 or cache.stride(2) != d:
        raise ValueError(f"{name} must hold each token's [H_kv={h}, D={d}] row contiguously, "
                         f"got strides {tuple(cache.stride())}")


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              cu_seqlens_k: torch.Tensor, total: int, max_seq_len: int, *, k_scales: torch.Tensor | None = None,
              v_scales: torch.Tensor | None = None, dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's context rows copied out of the pool: k_cache, v_cache [num_blocks,
    block_size, H_kv, D]; block_tables [S, max_blocks]; cu_seqlens_k [S + 1] int32, sequence s's
    context at rows cu_seqlens_k[s]:[s+1] of the outputs; total = cu_seqlens_k[S] and max_seq_len
    the longest context (host ints: they size the outputs and the grid). An FP8 pool comes with
    its scales and is dequantized into `dtype` (exact for bfloat16 and float32). Returns k, v
    [total, H_kv, D] in `dtype` (default: the pool's)."""
    check_tensor("cu_seqlens_k", cu_seqlens_k, "[S + 1]", 1, (torch.int32,), device=k_cache.device)
    check_tensor("block_tables", block_tables, "[S, max_blocks]", 2, INDEX_DTYPES, device=k_cache.device)
    check_size("cu_seqlens_k", "S + 1", cu_seqlens_k.shape[0], block_tables.shape[0] + 1, "block_tables' S + 1")
    _check_token_rows("k_cache", k_cache)
    _check_token_rows("v_cache", v_cache)
    fp8 = check_kv_scales(k_cache, k_scales, v_scales)
    if fp8 and dtype not in FLOAT_DTYPES:
        raise ValueError(f"an FP8 pool is gathered into a float dtype (the model's), got {dtype}")
    _, block_size, h, d = k_cache.shape
    k = torch.empty(total, h, d, dtype=dtype or k_cache.dtype, device=k_cache.device)
    v = torch.empty_like(k)
    blocks = -(-max_seq_len // block_size)
    if total and blocks:
        scales = (k_scales, v_scales) if fp8 else (k_cache, v_cache)  # unread without FP8
        _gather_kv_kernel[(block_tables.shape[0], blocks)](
            k_cache, v_cache, *scales, k, v, block_tables, cu_seqlens_k, k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), block_size * h, h, block_tables.stride(0), k.stride(0),
            v.stride(0), NUM_HEADS=h, HEAD_DIM=d, BLOCK_H=next_power_of_2(h), BLOCK_D=next_power_of_2(d),
            BLOCK_SIZE=block_size, FP8=fp8, num_warps=4)
    return k, v


def gather_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: Sequence[int], k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gather_kv by indexing, a sequence at a time (an FP8 pool dequantized by dequantize_kv_ref)."""
    block_size = k_cache.shape[1]
    ks, vs = [], []
    for s, n in enumerate(int(x) for x in seq_lens):
        pos = torch.arange(n, device=k_cache.device)
        at = (block_tables[s, pos // block_size].long(), pos % block_size)
        if k_scales is None:
            ks.append(k_cache[at])
            vs.append(v_cache[at])
        else:
            ks.append(dequantize_kv_ref(k_cache[at], k_scales[at], dtype))
            vs.append(dequantize_kv_ref(v_cache[at], v_scales[at], dtype))
    return torch.cat(ks), torch.cat(vs)


def choose_backend(q: torch.Tensor, group: int, new_tokens: Sequence[int]) -> str:
    """The backend="auto" choice for sequences with these numbers of new tokens."""
    total = sum(new_tokens)
    if not q.is_cuda or total < LIBRARY_MIN_TOKENS:
        return "triton"
    measured = measured_bucket(EXTEND_BACKEND, q.device, total // max(1, len(new_tokens)))
    return "fa3" if measured == "fa3" and fa3.fa3_usable(q, group) else "triton"


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    host_query_start_loc: Sequence[int],
    host_seq_lens: Sequence[int],
    out: torch.Tensor | None = None,
    backend: str = "auto",
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """prefill_attention's contract (the new tokens q [T, H_q, D] over their sequences' paged
    context, the new tokens' K/V already in the pool), with the offsets and context lengths also
    as host lists (they size FA3's gather). backend "auto" follows the module's rule; "fa3" and
    "triton" force one. Returns (or fills `out`) [T, H_q, D]."""
    s = check_varlen_paged(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scales, v_scales)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    qsl, lens = [int(x) for x in host_query_start_loc], [int(x) for x in host_seq_lens]
    check_size("host_query_start_loc", "S + 1", len(qsl), s + 1, "query_start_loc's entries")
    check_size("host_seq_lens", "S", len(lens), s, "seq_lens' entries")
    new = [b - a for a, b in zip(qsl[:-1], qsl[1:])]
    if any(n > c for n, c in zip(new, lens)):
        raise ValueError("every sequence's context (seq_lens) must hold its new tokens")
    group = q.shape[1] // k_cache.shape[2]
    choice = choose_backend(q, group, new) if backend == "auto" else backend
    if choice == "fa3" and s and max(new, default=0):
        if not fa3.fa3_usable(q, group):
            if backend != "auto":
                raise ValueError("backend 'fa3' needs a Hopper GPU, bfloat16, head_dim <= 256 and the fa3-fwd package")
        else:
            try:
                return _run_fa3(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, new, lens, out,
                                k_scales, v_scales)
            except RuntimeError:
                if backend != "auto":
                    raise
                fa3.refusals.add((q.dtype, q.shape[-1], group))
    return prefill_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                             max_query_len=max(new, default=0), out=out, k_scales=k_scales, v_scales=v_scales)


def _run_fa3(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float, new: list[int],
             lens: list[int], out: torch.Tensor | None, k_scales, v_scales) -> torch.Tensor:
    cu_k = torch.zeros(len(lens) + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(seq_lens, 0, dtype=torch.int32, out=cu_k[1:])
    k, v = gather_kv(k_cache, v_cache, block_tables, cu_k, sum(lens), max(lens), k_scales=k_scales,
                     v_scales=v_scales, dtype=q.dtype)
    return fa3.fa3_varlen(q, k, v, query_start_loc.to(torch.int32), cu_k, max(new), max(lens), scale, out=out)
