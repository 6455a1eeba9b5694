"""Paged decode attention: one new query token per sequence over its paged KV context.

Flash-decoding layout. A program owns one (sequence, KV head, context partition): it loads
the query heads of that KV head's group as the rows of one tile (padded to 16 rows for
tl.dot), so each K/V tile is read once per group rather than once per query head, and runs
an online softmax in float32 over the partition's tokens, BLOCK_N at a time, gathered
through the block table. With one partition the program writes the output; with several
(long contexts, where a single program per head would leave most of the GPU idle) each
writes its running max, sum and unnormalised output, and the last of a (sequence, KV head)'s
partition programs to finish (an arrival counter per pair, llmesh/kernels/common.arrival_counters)
rescales and combines them, in partition order; a sequence whose context fits one partition
is written directly. Below attention_config.FOLD_MIN_PAIRS pairs (measured), or with `fold=False`
(LLMESH_DECODE_FOLD=0; =1 folds at every size), a second, reduce kernel combines them instead.

An FP8 pool (llmesh/kernels/kv_quant.py) is converted to the dot's dtype (exact) and its per-(token,
head) power-of-two scales applied per key column: to the scores for K, to the probabilities
for V (whose P·V dot runs in bfloat16 for 16-bit models, see `fp8_pv_operands`), which equals
dequantizing the tiles first at BLOCK_N multiplies a tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmesh.kernels.attention_config import (PagedDecodeTile, decode_fold,
                                             paged_decode_tile)
from llmesh.kernels.common import (
    INDEX_DTYPES, arrival_counters, check_out, check_paged_kv, check_size, check_tensor, dot_in_fp32, dot_precision,
    interpreting, next_power_of_2, pdl_launch)
from llmesh.kernels.kv_quant import (
    exponent_to_scale, fp8_pv_operands, scale_carry_init, scale_carry_step, widen_e4m3)
from llmesh.kernels.kv_quant_ref import check_kv_scales
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref
from llmesh.kernels.triton_helpers import cast_rtne, pdl_enter

_LOG2E = 1.4426950408889634
FOLD_BLOCK_P = tl.constexpr(16)
"""Partials a folded combine loads at once (fixed: the partition count is not specialised)."""


# The partition count (from the step's longest context in eager steps) and the block table's
# width change from step to step: not specialised, so no step stalls on a compile (see
# prefill_attention).
@triton.jit(do_not_specialize=["num_partitions", "stride_bt"])
def _decode_partition_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, lock_ptr,
    scale_log2, num_partitions,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, SPLIT: tl.constexpr,
    FOLD: tl.constexpr, NUM_KV_HEADS: tl.constexpr, FP8: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    start = part * PARTITION
    if (part > 0) & (start >= seq_len):
        return  # the reduce reads only partitions that hold tokens
    end = tl.minimum(start + PARTITION, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    # q: [BLOCK_G, BLOCK_D], the group's query heads (rows past GROUP are zeros)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores (log2 units)
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + b * stride_bt
    if FP8:  # the scale codes are carried a step ahead (kv_quant.scale_carry_init says why)
        ks_next, vs_next, blocks_next = scale_carry_init(k_scale_ptr, v_scale_ptr, table, start + tl.arange(0, BLOCK_N),
                                                         end, kv_head, BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        block = tl.load(table + n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        offset = n % BLOCK_SIZE
        if FP8:
            ks_codes, vs_codes, ks_next, vs_next, blocks_next = scale_carry_step(
                k_scale_ptr, v_scale_ptr, table, ks_next, vs_next, blocks_next, n, end, kv_head,
                BLOCK_N, BLOCK_SIZE, NUM_KV_HEADS)
        kv_mask = n_mask[None, :] & d_mask[:, None]
        # k: [BLOCK_D, BLOCK_N] (transposed for the dot); v: [BLOCK_N, BLOCK_D]
        k = tl.load(k_cache_ptr + block[None, :] * stride_kb + offset[None, :] * stride_ks
                    + kv_head * stride_kh + d[:, None], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vs
                    + kv_head * stride_vh + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if FP8:
            # scales: uint8 exponents → [BLOCK_N] float32 (0 past the context: masked anyway)
            ks = exponent_to_scale(ks_codes) * scale_log2
            vs = exponent_to_scale(vs_codes)
            # v stays E4M3 codes until the P·V dot (fp8_pv_operands)
            if DOT_F32:
                k = k.to(tl.float32)
            else:
                k = widen_e4m3(k, q_ptr.dtype.element_ty, INTERPRET)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * ks[None, :]  # [BLOCK_G, BLOCK_N]
        else:
            if DOT_F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if FP8:
            pv, v = fp8_pv_operands(p, vs, v, DOT_F32, INTERPRET)
        else:
            pv = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
        m = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    out_tile = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
    used = tl.cdiv(seq_len, PARTITION)  # the partitions holding tokens (0 for an empty context)
    if SPLIT:
        split_here = used > 1
    else:
        split_here = False  # one partition covers max_seq_len: always the direct path
    if split_here:
        base = (b * NUM_KV_HEADS * GROUP + heads) * num_partitions  # [BLOCK_G]
        tl.store(part_m_ptr + base + part, m, mask=g_mask)
        tl.store(part_l_ptr + base + part, l, mask=g_mask)
        tl.store(part_acc_ptr + (base + part)[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        if FOLD:
            # The last partition of this (sequence, KV head) to finish combines them all, in
            # partition order (deterministic): no reduce kernel. Its counter is reset for the
            # next launch on this stream.
            tl.debug_barrier()  # every thread's partials are stored before the release below
            counter = lock_ptr + b * NUM_KV_HEADS + kv_head
            if tl.atomic_add(counter, 1, sem="acq_rel") == used - 1:
                for gi in tl.static_range(GROUP):  # the reduce kernel's combine, per head of the group
                    head = kv_head * GROUP + gi
                    _combine_head(out_ptr + b * stride_ob + head * stride_oh, part_m_ptr, part_l_ptr, part_acc_ptr,
                                  (b * NUM_KV_HEADS * GROUP + head) * num_partitions, used, d, d_mask,
                                  HEAD_DIM, BLOCK_D, FOLD_BLOCK_P, INTERPRET)
                tl.atomic_xchg(counter, 0)
    else:
        # One partition holds the whole context: the output directly, the reduce skips it.
        o = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty context gives zeros
        tl.store(out_tile, cast_rtne(o, out_ptr.dtype.element_ty, INTERPRET), mask=out_mask)


@triton.jit
def _combine_head(out_row, part_m_ptr, part_l_ptr, part_acc_ptr, base, used, d, d_mask,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, INTERPRET: tl.constexpr):
    """One head's output from its ``used`` partitions' (max, sum, unnormalised output) at rows
    base..base+used-1, BLOCK_P partitions a load, in partition order (deterministic). Read past
    L1 (.cg): in a folded launch other programs of the same launch wrote them."""
    m_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, used, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + base + p, mask=p < used, other=float("-inf"),
                                          cache_modifier=".cg"))
    m_all = tl.max(m_max, axis=0)
    l_sum = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    for p0 in range(0, used, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < used
        w = tl.exp2(tl.load(part_m_ptr + base + p, mask=p_mask, other=float("-inf"), cache_modifier=".cg") - m_all)
        l_sum += w * tl.load(part_l_ptr + base + p, mask=p_mask, other=0.0, cache_modifier=".cg")
        acc += w[:, None] * tl.load(part_acc_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :],
                                    mask=p_mask[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
    total = tl.sum(l_sum, axis=0)
    # An empty context (a padded batch entry) gives zeros rather than 0/0.
    o = tl.sum(acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_row + d, cast_rtne(o, out_row.dtype.element_ty, INTERPRET), mask=d_mask)


@triton.jit(do_not_specialize=["num_partitions"])
def _decode_reduce_kernel(
    out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, seq_lens_ptr,
    num_partitions, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PARTITION: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    used = tl.cdiv(seq_len, PARTITION)  # partitions past the context wrote nothing
    if used <= 1:
        return  # partition 0 wrote the output itself
    d = tl.arange(0, BLOCK_D)
    _combine_head(out_ptr + b * stride_ob + head * stride_oh, part_m_ptr, part_l_ptr, part_acc_ptr,
                  (b * tl.num_programs(1) + head) * num_partitions, used, d, d < HEAD_DIM,
                  HEAD_DIM, BLOCK_D, BLOCK_P, INTERPRET)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    partition_size: int = 512,
    out: torch.Tensor | None = None,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
    fold: bool | None = None,
    tile: PagedDecodeTile | None = None,
) -> torch.Tensor:
    """Attention of q: [B, H_q, D] (one token per sequence) over each sequence's paged context.

    k_cache, v_cache: [num_blocks, block_size, H_kv, D] with the new token's K/V already
    written; block_tables: [B, max_blocks]; seq_lens: [B] context lengths including the new
    token (0 gives a zero output, for padded batches). `max_seq_len` must bound seq_lens; it
    sets the number of partitions. Pass it to avoid a device sync (and, as the model's
    maximum length, to keep the launch fixed under CUDA graphs: partitions past a sequence's
    end exit at once). `partition_size` (a power of two >= 16) is the split-K chunk. An FP8
    pool comes with its scale pools k_scales, v_scales: [num_blocks, block_size, H_kv] uint8.
    `fold` (default: `attention_config.decode_fold`, from FOLD_MIN_PAIRS (sequence, KV head)
    pairs on; LLMESH_DECODE_FOLD=0 / 1 forces it off / on): the last partition program of a sequence and KV head to finish
    combines the partitions, instead of a reduce kernel. `tile` (default: the measured table,
    attention_config.paged_decode_tile, for 16-bit pools) sets BLOCK_N, warps and pipeline stages.
    """
    check_tensor("q", q, "[B, H_q, D]", 3)
    b, h_q, _ = q.shape
    block_size, h_kv, d = check_paged_kv(q, k_cache, v_cache, block_tables, b)
    fp8 = check_kv_scales(k_cache, k_scales, v_scales)
    check_tensor("seq_lens", seq_lens, "[B]", 1, INDEX_DTYPES, device=q.device)
    check_size("seq_lens", "B", seq_lens.shape[0], b, "one length per sequence")
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    out = check_out("out", out, (b, h_q, d), q.dtype, q.device)
    if b == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
        if max_seq_len > block_tables.shape[1] * block_size:
            raise ValueError(f"a sequence of {max_seq_len} tokens does not fit its block table of "
                             f"{block_tables.shape[1]} blocks x {block_size}")
    seq_lens = seq_lens.contiguous()
    group = h_q // h_kv
    num_partitions = max(1, triton.cdiv(max_seq_len, partition_size))
    split = num_partitions > 1
    if split:
        part_m = torch.empty(b, h_q, num_partitions, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(b, h_q, num_partitions, d, dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # unused by the kernel
    block_d = next_power_of_2(d)
    pdl = pdl_launch(q.device)
    fold = split and (decode_fold(b * h_kv) if fold is None else fold)
    counters = arrival_counters("paged_decode_attention", q.device, b * h_kv) if fold else seq_lens
    tile = tile or paged_decode_tile(q.device, b * h_kv, fp8)
    _decode_partition_kernel[(b, h_kv, num_partitions)](
        q, k_cache, v_cache, k_scales if fp8 else k_cache, v_scales if fp8 else v_cache, block_tables, seq_lens,
        out, part_m, part_l, part_acc, counters,
        scale * _LOG2E, num_partitions,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, next_power_of_2(group)), HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=min(tile.block_n, partition_size), PARTITION=partition_size, SPLIT=split,
        FOLD=fold, NUM_KV_HEADS=h_kv, FP8=fp8,
        DOT_F32=dot_in_fp32(q.dtype), DOT_PRECISION=dot_precision(q.dtype), INTERPRET=interpreting(),
        num_warps=tile.num_warps, num_stages=tile.num_stages, **pdl
    )
    if split and not fold:
        _decode_reduce_kernel[(b, h_q)](
            out, part_m, part_l, part_acc, seq_lens, num_partitions, out.stride(0), out.stride(1),
            HEAD_DIM=d, BLOCK_D=block_d, PARTITION=partition_size,
            BLOCK_P=min(16, next_power_of_2(num_partitions)), INTERPRET=interpreting(), **pdl
        )
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decode path of `paged_attention_ref` (sequences with seq_len >= 1)."""
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=q.device), block_tables=block_tables,
        seq_lens=seq_lens, query_start_loc=None, max_query_len=1, max_seq_len=int(seq_lens.max()))
    return paged_attention_ref(q, k_cache, v_cache, meta, scale, k_scales, v_scales)
