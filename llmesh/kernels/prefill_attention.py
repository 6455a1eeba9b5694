"""Prefill / extend attention over the paged KV pool.

The new tokens of S sequences are flattened into q: [T, H_q, D]; sequence s owns rows
query_start_loc[s]:query_start_loc[s+1] and has seq_lens[s] context tokens in all, its new
tokens last. Each new token attends causally to everything before it: the cached prefix (a
prefix-cache hit or earlier chunks of a chunked prefill) and the new tokens up to itself.
The new tokens' K/V are already in the pool (the KV write runs first), so every key is read
through the block table and the kernel never sees a dense per-request cache.

Layout of the work (FlashAttention-2 with the GQA group packed into the rows, as vLLM's
unified attention does):

- A program owns one KV head and BLOCK_Q = BLOCK_M // group consecutive query tokens of one
  sequence; its BLOCK_M tile rows are (token, query head of the group) pairs. Each K/V tile
  is loaded once for the whole group, and the causal diagonal spans BLOCK_Q keys, not BLOCK_M.
- The grid is flat over query blocks of all sequences: sequence s's blocks are numbered from
  query_start_loc[s] // BLOCK_Q + s, so T // BLOCK_Q + S programs per KV head cover any
  batch, and a program finds its sequence by binary search over query_start_loc. The grid
  depends on shapes only (CUDA-graph safe); programs past the last block exit at once. The
  blocks run longest first (reversed index) so the causal tail does not trail the grid.
- The key loop is split in two: keys before the block's first query position need no mask
  (every row sees them), then the diagonal tiles are masked. Softmax in float32 with exp2 on
  log2e-scaled scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.attention_config import PrefillConfig, prefill_config
from llmesh.kernels.common import (
    INDEX_DTYPES, check_out, check_paged_kv, check_size, check_tensor, dot_in_fp32, dot_precision, interpreting,
    next_power_of_2)
from llmesh.kernels.kv_quant import (
    exponent_to_scale, fp8_pv_operands, scale_carry_init, scale_carry_step, widen_e4m3)
from llmesh.kernels.kv_quant_ref import check_kv_scales
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref
from llmesh.kernels.triton_helpers import cast_rtne

LOG2E = 1.4426950408889634


@triton.jit
def find_seq(qsl_ptr, block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks (numbered from qsl[s] // BLOCK_Q + s) hold block_idx."""
    # An int32 scalar tensor whatever num_seqs is (Triton turns an argument equal to 1 into a
    # constant, which the loop could not carry).
    lo = tl.program_id(0) * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(qsl_ptr + mid) // BLOCK_Q + mid).to(tl.int32)
        if first <= block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, ks_codes, vs_codes, table, n, n_mask, kv_head, d, d_mask,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BLOCK_SIZE: tl.constexpr, MASK_N: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, FP8: tl.constexpr, Q_DTYPE: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """k: [BLOCK_D, BLOCK_N] (transposed for the dot), v: [BLOCK_N, BLOCK_D] of keys n, gathered
    through the block table, and (FP8 pool) their per-key scales ks, vs: [BLOCK_N] float32 from
    the scale codes the loop carried (kv_quant.scale_carry_step; 1.0 otherwise). MASK_N=False
    for tiles wholly inside the context (no predicates). An FP8 K tile is converted to the
    dot's dtype (exact: E4M3 fits fp16, bf16 and fp32; `widen_e4m3`), the V tile left as E4M3
    codes for `fp8_pv_operands`; both unscaled: `softmax_step` applies the scales per key
    column."""
    if MASK_N:
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        block = tl.load(table + n // BLOCK_SIZE).to(tl.int64)
    offset = n % BLOCK_SIZE
    k_ptrs = k_cache_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks + kv_head * stride_kh + d[:, None]
    v_ptrs = v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs + kv_head * stride_vh + d[None, :]
    if MASK_N:
        k = tl.load(k_ptrs, mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    if FP8:
        ks = exponent_to_scale(ks_codes)
        vs = exponent_to_scale(vs_codes)
        # v stays E4M3 codes until the P·V dot (fp8_pv_operands)
        if DOT_F32:
            k = k.to(tl.float32)
        else:
            k = widen_e4m3(k, Q_DTYPE, INTERPRET)
    else:
        ks = 1.0
        vs = 1.0
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
    return k, v, ks, vs


@triton.jit
def kv_tile_step(k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, n_mask,
                 end, kv_head, d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, MASK_N: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, FP8: tl.constexpr, Q_DTYPE: tl.constexpr,
                 INTERPRET: tl.constexpr):
    """One key tile of a loop over the pool: `load_kv_tile`, and on an FP8 pool the scale carry
    advanced (kv_quant.scale_carry_step; without FP8 the carry passes through untouched).
    Returns (k, v, ks, vs, ks_next, vs_next, blocks_next)."""
    if FP8:
        ks_codes, vs_codes, ks_next, vs_next, blocks_next = scale_carry_step(
            k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, end, kv_head,
            BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS)
    else:
        ks_codes = ks_next
        vs_codes = vs_next
    k, v, ks, vs = load_kv_tile(k_cache_ptr, v_cache_ptr, ks_codes, vs_codes, table, n, n_mask, kv_head, d, d_mask,
                                stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                BLOCK_SIZE, MASK_N, EVEN_D, DOT_F32, FP8, Q_DTYPE, INTERPRET)
    return k, v, ks, vs, ks_next, vs_next, blocks_next


@triton.jit
def kv_carry_init(k_scale_ptr, v_scale_ptr, table, n, end, kv_head, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  NUM_KV_HEADS: tl.constexpr, FP8: tl.constexpr):
    """The carry `kv_tile_step` starts from at keys n (zeros, unused, without FP8)."""
    if FP8:
        ks, vs, blocks = scale_carry_init(k_scale_ptr, v_scale_ptr, table, n, end, kv_head, BLOCK_N, BLOCK_SIZE,
                                          NUM_KV_HEADS)
    else:
        ks = tl.zeros([BLOCK_N], tl.uint8)
        vs = tl.zeros([BLOCK_N], tl.uint8)
        blocks = tl.zeros([BLOCK_N], tl.int32)
    return ks, vs, blocks


@triton.jit
def softmax_step(q, k, v, ks, vs, acc, l, m, scale_log2, valid, MASKED: tl.constexpr, FP8: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr):
    """One online-softmax step over a key tile. m is the running max in log2 units; with
    MASKED, `valid` [BLOCK_M, BLOCK_N] marks attended keys and a row with none so far keeps
    m = -inf without producing NaN (exp2 is taken against 0 instead). With FP8, the key
    scales ks [BLOCK_N] multiply the score columns and the value scales vs [BLOCK_N] the
    probability columns: the same numbers as dequantizing the tiles first (powers of two
    scale exactly), BLOCK_N multiplies instead of BLOCK_N x D; that P·V dot runs in bfloat16
    for 16-bit models (`fp8_pv_operands` says why)."""
    if FP8:
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * (ks * scale_log2)[None, :]  # [BLOCK_M, BLOCK_N]
    else:
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    if MASKED:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    alpha = tl.exp2(m - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if FP8:
        pv, v = fp8_pv_operands(p, vs, v, DOT_F32, INTERPRET)
    else:
        pv = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
    return acc, l, m_new


# The block table's width (stride_bt) and the sequence count change from step to step; Triton
# would compile a variant per value class (== 1, % 16 == 0), so a server's first steps of each
# class stalled on a compile (over a second each on the H200, bench/README.md).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2, num_seqs,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, MIN_QUERY_LEN: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, FP8: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):
    block_idx = tl.num_programs(0) - 1 - tl.program_id(0)  # longest blocks (highest index) first
    kv_head = tl.program_id(1)
    seq = find_seq(query_start_loc_ptr, block_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    q_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - q_start
    q_block = block_idx - (q_start // BLOCK_Q + seq)
    # Sequences shorter than MIN_QUERY_LEN belong to another kernel (unified_attention's
    # split-KV decode path); empty ones (padding) to none.
    if (q_len < MIN_QUERY_LEN) | (q_block * BLOCK_Q >= q_len):
        return
    ctx_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = ctx_len - q_len  # tokens cached before this step's

    r = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + r // GROUP  # [BLOCK_M] token of each row within the sequence
    heads = kv_head * GROUP + r % GROUP
    row_mask = (tok < q_len) & (r < BLOCK_Q * GROUP)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_pos = prefix + tok  # position of each row's token in its sequence
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
    first_pos = prefix + q_block * BLOCK_Q  # every row's position is at least this
    # Keys past the block's last position are masked for every row; stop there.
    hi = tl.minimum(ctx_len, first_pos + BLOCK_Q)
    diag = tl.maximum(first_pos, 0) // BLOCK_N * BLOCK_N
    n_range = tl.arange(0, BLOCK_N)
    ks_next, vs_next, blocks_next = kv_carry_init(k_scale_ptr, v_scale_ptr, table, n_range, hi, kv_head, BLOCK_N,
                                                  BLOCK_SIZE, NUM_KV_HEADS, FP8)
    for n0 in range(0, diag, BLOCK_N):  # off-diagonal: visible to every row, inside the context
        n = n0 + n_range
        k, v, ks, vs, ks_next, vs_next, blocks_next = kv_tile_step(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, n < hi, hi,
            kv_head, d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS, False, HEAD_DIM == BLOCK_D, DOT_F32, FP8, q_ptr.dtype.element_ty,
            INTERPRET)
        acc, l, m = softmax_step(q, k, v, ks, vs, acc, l, m, scale_log2, None, False, FP8, DOT_PRECISION,
                                 DOT_F32, INTERPRET)
    for n0 in range(diag, hi, BLOCK_N):  # the diagonal: causal mask
        n = n0 + n_range
        n_mask = n < hi
        k, v, ks, vs, ks_next, vs_next, blocks_next = kv_tile_step(
            k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, n_mask, hi,
            kv_head, d, d_mask, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS, True, HEAD_DIM == BLOCK_D, DOT_F32, FP8, q_ptr.dtype.element_ty,
            INTERPRET)
        valid = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        acc, l, m = softmax_step(q, k, v, ks, vs, acc, l, m, scale_log2, valid, True, FP8, DOT_PRECISION,
                                 DOT_F32, INTERPRET)

    o = acc / tl.where(l > 0, l, 1.0)[:, None]  # a row with no key (bad lengths) gives zeros
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
             cast_rtne(o, out_ptr.dtype.element_ty, INTERPRET), mask=row_mask[:, None] & d_mask[None, :])


def launch_prefill_kernel(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    *, min_query_len: int = 1, config: PrefillConfig | None = None,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> None:
    """Launch the causal tile kernel over every sequence with at least `min_query_len` new
    tokens (arguments already checked; scale pools given exactly for an FP8 pool). The grid
    depends on q's and the tables' shapes only."""
    t, h_q, d = q.shape
    s = block_tables.shape[0]
    block_size, h_kv = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    cfg = config or prefill_config(d)
    block_m = max(cfg.block_m, next_power_of_2(group))
    block_q = block_m // group
    grid = (t // block_q + s, h_kv)
    fp8 = k_scales is not None
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_scales if fp8 else k_cache, v_scales if fp8 else v_cache, out, block_tables,
        query_start_loc, seq_lens,
        scale * LOG2E, s,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=d, BLOCK_D=next_power_of_2(d), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, MIN_QUERY_LEN=max(1, min_query_len),
        NUM_KV_HEADS=h_kv, FP8=fp8,
        DOT_F32=dot_in_fp32(q.dtype), DOT_PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def check_varlen_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                       query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None) -> int:
    """Checks shared by the flattened-batch attention wrappers (an FP8 pool with its scale
    pools); returns S."""
    check_tensor("q", q, "[T, H_q, D]", 3)
    check_tensor("seq_lens", seq_lens, "[S]", 1, INDEX_DTYPES, device=q.device)
    s = seq_lens.shape[0]
    check_paged_kv(q, k_cache, v_cache, block_tables, s)
    check_tensor("query_start_loc", query_start_loc, "[S + 1]", 1, INDEX_DTYPES, device=q.device)
    check_size("query_start_loc", "S + 1", query_start_loc.shape[0], s + 1, "one start per sequence and the end")
    check_kv_scales(k_cache, k_scales, v_scales)
    return s


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
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens q: [T, H_q, D] over their sequences' paged context.

    k_cache, v_cache: [num_blocks, block_size, H_kv, D] holding every context token,
    the new ones included (an FP8 pool with k_scales, v_scales [num_blocks, block_size, H_kv]);
    block_tables: [S, max_blocks]; query_start_loc: [S + 1];
    seq_lens: [S] context lengths including the new tokens (seq_lens[s] must be at least
    sequence s's new-token count). The launch depends on shapes only, so the call never
    syncs; `max_query_len` = 0 (a batch without new tokens) skips it. Returns (or fills
    `out`) [T, H_q, D]; rows past query_start_loc[S] are left as they are.
    """
    s = check_varlen_paged(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, k_scales,
                           v_scales)
    out = check_out("out", out, tuple(q.shape), q.dtype, q.device)
    if q.shape[0] == 0 or s == 0 or max_query_len == 0:
        return out
    launch_prefill_kernel(q, k_cache, v_cache, out, block_tables, query_start_loc.contiguous(),
                          seq_lens.contiguous(), scale, k_scales=k_scales, v_scales=v_scales)
    return out


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The prefill path of `paged_attention_ref`, taken by every sequence."""
    qsl = [int(x) for x in query_start_loc]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=q.device), block_tables=block_tables,
        seq_lens=seq_lens, query_start_loc=query_start_loc,
        max_query_len=max(qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1)), max_seq_len=int(seq_lens.max()),
        host_query_start_loc=qsl, host_seq_lens=[int(n) for n in seq_lens])
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, k_scales, v_scales)
