"""Prefill / extend attention over the paged KV pool.

The new tokens of S sequences are flattened into q: [T, H_q, D]; sequence s owns rows
query_start_loc[s]:query_start_loc[s+1] and has seq_lens[s] context tokens in all, its new
tokens last. Each new token attends causally to everything before it: the cached prefix (a
prefix-cache hit or earlier chunks of a chunked prefill) and the new tokens up to itself.
The new tokens' K/V are already in the pool (the KV write runs first), so every key is read
through the block table and the kernel never sees a dense per-request cache.

A program owns BLOCK_M query rows of one sequence and one query head and runs a
FlashAttention-2 loop: tl.dot tiles of BLOCK_M x BLOCK_N scores, online softmax in float32,
key tiles gathered through the block table, stopping at the causal bound of its last row.
Grouped-query heads share K/V through kv_head = head // group (each query head reads its K/V
tiles itself; prefill is bound by the dot products, not by those reads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.common import (
    INDEX_DTYPES, check_out, check_paged_kv, check_size, check_tensor, dot_in_fp32, dot_precision, interpreting,
    next_power_of_2)
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref
from llmesh.kernels.triton_helpers import cast_rtne

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    if m_block * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = ctx_len - q_len  # tokens cached before this step's

    i = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_mask = i < q_len
    d_mask = d < HEAD_DIM
    q_pos = prefix + i  # [BLOCK_M] position of each query row in its sequence
    rows = q_start + i
    # q: [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=i_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    kv_head = head // GROUP

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    # Keys past the last row's position are masked for every row; stop there.
    hi = tl.minimum(ctx_len, prefix + (m_block + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offset = n % BLOCK_SIZE
        kv_mask = n_mask[None, :] & d_mask[:, None]
        # k: [BLOCK_D, BLOCK_N] (transposed for the dot); v: [BLOCK_N, BLOCK_D]
        k = tl.load(k_cache_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks
                    + kv_head * stride_kh + d[:, None], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs
                    + kv_head * stride_vh + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        # Every row keeps key 0 (q_pos >= 0), so no row of the first tile is all -inf.
        causal = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        s = tl.where(causal, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    o = acc / l[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + d[None, :],
             cast_rtne(o, out_ptr.dtype.element_ty, INTERPRET), mask=i_mask[:, None] & d_mask[None, :])


def _tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a head_dim: large tiles while they fit in registers."""
    if d <= 64:
        return 128, 64, 4
    if d <= 128:
        return 128, 64, 8
    return 64, 32, 8


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens q: [T, H_q, D] over their sequences' paged context.

    k_cache, v_cache: [num_blocks, block_size, H_kv, D] holding every context token,
    the new ones included; block_tables: [S, max_blocks]; query_start_loc: [S + 1];
    seq_lens: [S] context lengths including the new tokens (seq_lens[s] must be at least
    sequence s's new-token count). `max_query_len` bounds the new tokens per sequence and
    sizes the grid; pass it to avoid a device sync. Returns (or fills `out`) [T, H_q, D].
    """
    check_tensor("q", q, "[T, H_q, D]", 3)
    t, h_q, _ = q.shape
    check_tensor("seq_lens", seq_lens, "[S]", 1, INDEX_DTYPES, device=q.device)
    s = seq_lens.shape[0]
    block_size, h_kv, d = check_paged_kv(q, k_cache, v_cache, block_tables, s)
    check_tensor("query_start_loc", query_start_loc, "[S + 1]", 1, INDEX_DTYPES, device=q.device)
    check_size("query_start_loc", "S + 1", query_start_loc.shape[0], s + 1, "one start per sequence and the end")
    out = check_out("out", out, (t, h_q, d), q.dtype, q.device)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if s else 0
    if t == 0 or s == 0 or max_query_len == 0:
        return out
    block_m, block_n, num_warps = _tiles(d)
    grid = (s, triton.cdiv(max_query_len, block_m), h_q)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc.contiguous(), seq_lens.contiguous(),
        scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=h_q // h_kv, HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_F32=dot_in_fp32(q.dtype), DOT_PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(),
        num_warps=num_warps,
    )
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The prefill path of `paged_attention_ref`, taken by every sequence."""
    qsl = [int(x) for x in query_start_loc]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=q.device), block_tables=block_tables,
        seq_lens=seq_lens, query_start_loc=query_start_loc,
        max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)), max_seq_len=int(seq_lens.max()),
        host_query_start_loc=qsl, host_seq_lens=[int(n) for n in seq_lens])
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
