"""Unified paged attention: one call for a flattened mixed batch, CUDA-graph capturable.

q: [T, H_q, D] holds the new tokens of S sequences (decodes, chunked prefills, extends after
a cached prefix); sequence s owns rows query_start_loc[s]:query_start_loc[s+1] and has
seq_lens[s] context tokens after this step, its new tokens last, their K/V already in the
pool. Every launch's grid depends on shapes (T, S) and the static bounds passed
(max_query_len, max_seq_len) only, never on tensor values, so one captured graph replays any
batch of the same shapes: padding sequences (empty query range, seq_lens 0) exit at once,
and rows past query_start_loc[S] are neither read as keys nor written.

Two kernels split the batch by query length, each in the regime it is built for:

- Short queries (at most BLOCK_Q = 16 // group tokens: decodes, speculative steps) go to a
  split-KV kernel: grid (S, H_kv, segments); one program packs the sequence's tokens times
  its GQA group into one 16-row tile, so a K/V tile is read once per KV head. When S x H_kv
  programs would leave SMs idle (few sequences, long contexts), each context is cut into
  up to `segments` tile-aligned pieces (the count fixed by shapes and max_seq_len, each
  sequence's piece length by its own length), and a reduce kernel merges the pieces'
  (max, sum, unnormalised output) triples.
- Longer queries go to prefill_attention's causal tile kernel (flat grid over query blocks,
  large GQA-packed tiles, masked diagonal only), launched only when max_query_len says a
  sequence may need it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.attention_config import (
    DecodeConfig, PrefillConfig, decode_config, sm_count, unified_long_config)
from llmesh.kernels.common import check_out, dot_in_fp32, dot_precision, interpreting, next_power_of_2, pdl_launch
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref
from llmesh.kernels.prefill_attention import (
    LOG2E, check_varlen_paged, kv_carry_init, kv_tile_step, launch_prefill_kernel, softmax_step)
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter


@triton.jit
def _segment_len(ctx_len, NUM_SEGMENTS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SEGMENT: tl.constexpr):
    """Keys per split-KV segment of a context: an even, tile-aligned share, at least MIN_SEGMENT."""
    share = tl.cdiv(tl.cdiv(ctx_len, NUM_SEGMENTS), BLOCK_N) * BLOCK_N
    return tl.maximum(share, MIN_SEGMENT)


@triton.jit
def _short_query_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr,
    seq_lens_ptr,
    part_m_ptr, part_l_ptr, part_acc_ptr,
    scale_log2,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, MIN_SEGMENT: tl.constexpr, NUM_KV_HEADS: tl.constexpr, FP8: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    if (q_len <= 0) | (q_len > BLOCK_Q):
        return  # padding, or a sequence for the long-query kernel
    ctx_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = ctx_len - q_len
    if NUM_SEGMENTS > 1:
        seg_len = _segment_len(ctx_len, NUM_SEGMENTS, BLOCK_N, MIN_SEGMENT)
        start = segment * seg_len
        if (segment > 0) & (start >= ctx_len):
            return  # the reduce reads only segments that hold keys
        end = tl.minimum(start + seg_len, ctx_len)
    else:
        start = 0
        end = ctx_len

    r = tl.arange(0, BLOCK_M)
    tok = r // GROUP  # [BLOCK_M] token of each row within the sequence
    heads = kv_head * GROUP + r % GROUP
    row_mask = (tok < q_len) & (r < BLOCK_Q * GROUP)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_pos = prefix + tok
    rows = (q_start + tok).to(tl.int64)
    # q: [BLOCK_M, BLOCK_D]
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Keys up to the first token's position are visible to every row: whole tiles of them
    # need no mask; the rest (the causal tail and the segment's ragged end) do.
    open_end = start + tl.maximum(tl.minimum(end, prefix + 1) - start, 0) // BLOCK_N * BLOCK_N
    n_range = tl.arange(0, BLOCK_N)
    ks_next, vs_next, blocks_next = kv_carry_init(k_scale_ptr, v_scale_ptr, table, start + n_range, end, kv_head,
                                                  BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS, FP8)
    for n0 in range(start, open_end, BLOCK_N):
        n = n0 + n_range
        k, v, ks, vs, ks_next, vs_next, blocks_next = kv_tile_step(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, n < end, end,
            kv_head, d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS, False, HEAD_DIM == BLOCK_D, DOT_F32, FP8, q_ptr.dtype.element_ty,
            INTERPRET)
        acc, l, m = softmax_step(q, k, v, ks, vs, acc, l, m, scale_log2, None, False, FP8, DOT_PRECISION,
                                 DOT_F32, INTERPRET)
    for n0 in range(open_end, end, BLOCK_N):
        n = n0 + n_range
        n_mask = n < end
        k, v, ks, vs, ks_next, vs_next, blocks_next = kv_tile_step(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, n_mask, end,
            kv_head, d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS, True, HEAD_DIM == BLOCK_D, DOT_F32, FP8, q_ptr.dtype.element_ty,
            INTERPRET)
        valid = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        acc, l, m = softmax_step(q, k, v, ks, vs, acc, l, m, scale_log2, valid, True, FP8, DOT_PRECISION,
                                 DOT_F32, INTERPRET)

    if NUM_SEGMENTS > 1:
        # partials: [S, H_kv, NUM_SEGMENTS, BLOCK_M] (m, l) and [..., BLOCK_D] (acc)
        part = ((seq * tl.num_programs(1) + kv_head) * NUM_SEGMENTS + segment).to(tl.int64) * BLOCK_M + r
        tl.store(part_m_ptr + part, m)
        tl.store(part_l_ptr + part, l)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc)
    else:
        o = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context gives zeros
        tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 cast_rtne(o, out_ptr.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _short_query_reduce_kernel(
    out_ptr, query_start_loc_ptr, seq_lens_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SEGMENTS: tl.constexpr, MIN_SEGMENT: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    if (q_len <= 0) | (q_len > BLOCK_Q):
        return
    ctx_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    used = tl.cdiv(ctx_len, _segment_len(ctx_len, NUM_SEGMENTS, BLOCK_N, MIN_SEGMENT))

    r = tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    base = ((seq * tl.num_programs(1) + kv_head) * NUM_SEGMENTS).to(tl.int64) * BLOCK_M
    for sgm in range(0, used):
        part = base + sgm * BLOCK_M + r
        m_s = tl.load(part_m_ptr + part)
        m_new = tl.maximum(m, m_s)
        # A row may see no key in a segment (its causal bound lies before it): m_s = -inf there.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_ref)
        b = tl.exp2(m_s - m_ref)
        l = l * a + tl.load(part_l_ptr + part) * b
        acc = acc * a[:, None] + tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :]) * b[:, None]
        m = m_new

    tok = r // GROUP
    heads = kv_head * GROUP + r % GROUP
    row_mask = (tok < q_len) & (r < BLOCK_Q * GROUP)
    rows = (q_start + tok).to(tl.int64)
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             cast_rtne(o, out_ptr.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & (d[None, :] < HEAD_DIM))


def short_query_tile(h_q: int, h_kv: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q) of the short-query kernel: 16 rows (tl.dot's minimum) or one group."""
    group = h_q // h_kv
    block_m = max(16, next_power_of_2(group))
    return block_m, block_m // group


def num_segments_for(num_seqs: int, h_kv: int, max_seq_len: int, cfg: DecodeConfig, device: torch.device) -> int:
    """Split-KV segments per sequence, from shapes and the static length bound only: enough to
    give every SM `programs_per_sm` programs, no more than max_seq_len / min_segment."""
    if max_seq_len <= cfg.min_segment:
        return 1
    want = triton.cdiv(cfg.programs_per_sm * sm_count(device), max(1, num_seqs * h_kv))
    return max(1, min(want, triton.cdiv(max_seq_len, cfg.min_segment)))


def unified_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    decode_cfg: DecodeConfig | None = None,
    prefill_cfg: PrefillConfig | None = None,
    num_segments: int | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a flattened mixed batch q: [T, H_q, D] over the paged pool.

    k_cache, v_cache: [num_blocks, block_size, H_kv, D] with this step's K/V written (an FP8
    pool with k_scales, v_scales [num_blocks, block_size, H_kv]);
    block_tables: [S, max_blocks]; seq_lens: [S] context lengths after this step (0 for a
    padding sequence); query_start_loc: [S + 1], non-decreasing. `max_query_len` and
    `max_seq_len` are static bounds (>= every sequence's new tokens / context), e.g. the
    captured token count and the model's maximum length under CUDA graphs; nothing here
    reads a tensor value on the host. Returns (or fills `out`) [T, H_q, D]; rows past
    query_start_loc[S] are not written. The *_cfg / num_segments overrides are for
    bench/attn_sweep.py; the tables in attention_config.py are the defaults (DECODE, and
    UNIFIED_LONG or PREFILL for the long queries).
    """
    s = check_varlen_paged(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scales, v_scales)
    fp8 = k_scales is not None
    out = check_out("out", out, tuple(q.shape), q.dtype, q.device)
    t, h_q, d = q.shape
    if t == 0 or s == 0 or max_query_len <= 0:
        return out
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    query_start_loc, seq_lens = query_start_loc.contiguous(), seq_lens.contiguous()
    cfg = decode_cfg or decode_config(d)
    block_m, block_q = short_query_tile(h_q, h_kv)
    segments = num_segments or num_segments_for(s, h_kv, max_seq_len, cfg, q.device)
    block_d = next_power_of_2(d)
    if segments > 1:
        part_m = torch.empty(s, h_kv, segments, block_m, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(s, h_kv, segments, block_m, block_d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused by the kernel
    common = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n,
                  NUM_SEGMENTS=segments, MIN_SEGMENT=cfg.min_segment, INTERPRET=interpreting(),
                  **pdl_launch(q.device))
    _short_query_kernel[(s, h_kv, segments)](
        q, k_cache, v_cache, k_scales if fp8 else k_cache, v_scales if fp8 else v_cache, out, block_tables,
        query_start_loc, seq_lens, part_m, part_l, part_acc,
        scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, NUM_KV_HEADS=h_kv, FP8=fp8, DOT_F32=dot_in_fp32(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common,
    )
    if segments > 1:
        _short_query_reduce_kernel[(s, h_kv)](
            out, query_start_loc, seq_lens, part_m, part_l, part_acc, out.stride(0), out.stride(1),
            num_warps=4, **common,
        )
    if max_query_len > block_q:
        launch_prefill_kernel(q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, scale,
                              min_query_len=block_q + 1, config=prefill_cfg or unified_long_config(d, q.device),
                              k_scales=k_scales, v_scales=v_scales)
    return out


def unified_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention_ref` on the batch's non-empty sequences (one-token ones as decodes);
    rows no sequence owns are zeros."""
    qsl = [int(x) for x in query_start_loc]
    lens = [int(n) for n in seq_lens]
    live = [i for i in range(len(lens)) if qsl[i + 1] > qsl[i] and lens[i] > 0]
    rows = torch.cat([torch.arange(qsl[i], qsl[i + 1], device=q.device) for i in live]) if live else None
    out = torch.zeros_like(q)
    if rows is None:
        return out
    sub_qsl = [0]
    for i in live:
        sub_qsl.append(sub_qsl[-1] + qsl[i + 1] - qsl[i])
    sub_lens = [lens[i] for i in live]
    idx = torch.tensor(live, dtype=torch.long, device=q.device)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=q.device), block_tables=block_tables[idx],
        seq_lens=seq_lens[idx], query_start_loc=torch.tensor(sub_qsl, dtype=torch.int32, device=q.device),
        max_query_len=max(b - a for a, b in zip(sub_qsl, sub_qsl[1:])), max_seq_len=max(sub_lens),
        host_query_start_loc=sub_qsl, host_seq_lens=sub_lens)
    out[rows] = paged_attention_ref(q[rows], k_cache, v_cache, meta, scale, k_scales, v_scales)
    return out
