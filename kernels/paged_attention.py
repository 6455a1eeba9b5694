"""Paged attention over a block-table KV pool: the torch reference.

The KV pool of one layer is ``k_cache, v_cache: [num_blocks, block_size, H_kv, D]``.
A sequence's keys live in the blocks its block table lists, in order; token ``p`` of a
sequence sits in slot ``block_table[p // block_size] * block_size + p % block_size``.

This reference gathers through the block table (never a dense per-request cache) and
handles a mixed batch: sequences with one new token (decodes) in one batched op, the
others (prefill chunks, extends after a prefix hit) one by one with a causal mask offset
by the tokens already cached. It is the torch backend's attention and the oracle the
Triton kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedAttentionMetadata:
    """Where each sequence of a batch is, in the flat token dimension and in the pool."""

    slot_mapping: torch.Tensor
    """[T] int64: the pool slot each new token's K/V is written to."""
    query_start_loc: list[int]
    """[S + 1] host ints: sequence s owns new tokens query_start_loc[s]:query_start_loc[s+1]."""
    seq_lens: list[int]
    """[S] host ints: context length of each sequence after this step's tokens."""
    block_tables: torch.Tensor
    """[S, max_blocks] int64, padded with 0 past each sequence's table."""
    decode_seq_idx: torch.Tensor
    """[S_d] int64: sequences with exactly one new token."""
    decode_token_idx: torch.Tensor
    """[S_d] int64: their token index in the flat batch."""
    decode_seq_lens: torch.Tensor
    """[S_d] int64: their context lengths."""
    prefill_seq_idx: list[int]
    """Host ints: the other sequences (prefill chunks and extends)."""


def write_kv_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values into their slots. k, v: [T, H_kv, D]; slot_mapping: [T]."""
    num_blocks, block_size, h_kv, d = k_cache.shape
    k_cache.view(num_blocks * block_size, h_kv, d)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, h_kv, d)[slot_mapping] = v.to(v_cache.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [B, H_q, L, D]; k, v: [B, H_kv, C, D]; mask: [B, 1, L, C] (True = attend)
    # SDPA's fused CPU/GPU kernels, grouped-query heads without materialising repeats.
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the batch's new tokens over each sequence's paged context.

    q: [T, H_q, D] (H_q a multiple of H_kv: grouped-query attention). Returns [T, H_q, D].
    The new tokens' K/V must already be written to the pool.
    """
    _, block_size, h_kv, d = k_cache.shape
    t, h_q, _ = q.shape
    out = torch.empty_like(q)

    if meta.decode_seq_idx.numel():
        tables = meta.block_tables[meta.decode_seq_idx]  # [B, NB]
        max_ctx = int(tables.shape[1]) * block_size
        k = k_cache[tables].reshape(len(tables), max_ctx, h_kv, d).transpose(1, 2)  # [B, H_kv, C, D]
        v = v_cache[tables].reshape(len(tables), max_ctx, h_kv, d).transpose(1, 2)
        qd = q[meta.decode_token_idx].unsqueeze(2)  # [B, H_q, 1, D]
        ctx = torch.arange(max_ctx, device=q.device)
        mask = (ctx[None, :] < meta.decode_seq_lens[:, None]).view(-1, 1, 1, max_ctx)
        out[meta.decode_token_idx] = _attend(qd, k, v, mask, scale).squeeze(2)

    for s in meta.prefill_seq_idx:
        start, end = meta.query_start_loc[s], meta.query_start_loc[s + 1]
        n_new, ctx_len = end - start, meta.seq_lens[s]
        n_blocks = -(-ctx_len // block_size)
        table = meta.block_tables[s, :n_blocks]
        k = k_cache[table].reshape(-1, h_kv, d)[:ctx_len].transpose(0, 1)  # [H_kv, C, D]
        v = v_cache[table].reshape(-1, h_kv, d)[:ctx_len].transpose(0, 1)
        qs = q[start:end].transpose(0, 1)  # [H_q, L, D]
        q_pos = torch.arange(ctx_len - n_new, ctx_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(ctx_len, device=q.device)[None, :]  # [L, C]
        o = _attend(qs[None], k[None], v[None], mask[None, None], scale)[0]  # [H_q, L, D]
        out[start:end] = o.transpose(0, 1)
    return out
