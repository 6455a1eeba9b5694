"""Paged attention over a block-table KV pool: the metadata every backend reads, and the
torch reference.

The KV pool of one layer is ``k_cache, v_cache: [num_blocks, block_size, H_kv, D]``.
A sequence's keys live in the blocks its block table lists, in order; token ``p`` of a
sequence sits in slot ``block_table[p // block_size] * block_size + p % block_size``.

The reference gathers through the block table (never a dense per-request cache) and
handles a mixed batch: sequences with one new token (decodes) in one batched op, the
others (prefill chunks, extends after a prefix hit) one by one with a causal mask offset
by the tokens already cached. It is the torch backend's attention and the oracle the
Triton kernels are tested against.

An FP8 pool (llmesh/kernels/kv_quant.py) comes with its per-(token, head) scale pools: the reference
quantizes on write and dequantizes what it gathers to q's dtype before attending.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmesh.kernels.kv_quant_ref import dequantize_kv_ref, is_fp8, quantize_kv_ref


@dataclass
class AttentionMetadata:
    """Where each sequence of a batch is, in the flat token dimension and in the pool.

    Device tensors are what the kernels read (built per step, or kept static under CUDA
    graphs); the host lists are optional copies the torch reference loops over, filled by a
    host-side builder so the reference never syncs to read them back.
    """

    slot_mapping: torch.Tensor
    """[T] int64: the pool slot each new token's K/V is written to; -1 = padding (not written)."""
    block_tables: torch.Tensor
    """[S, max_blocks] int32, padded with 0 past each sequence's table."""
    seq_lens: torch.Tensor
    """[S] int32: context length of each sequence after this step's tokens (0 = padding)."""
    query_start_loc: torch.Tensor | None
    """[S + 1] int32: sequence s owns new tokens query_start_loc[s]:query_start_loc[s+1].
    None for a decode-only batch, where sequence s owns exactly token s."""
    max_query_len: int
    """Bound on new tokens per sequence (1 for decode-only batches)."""
    max_seq_len: int
    """Bound on seq_lens (fixed, not tight, under CUDA graphs)."""
    host_query_start_loc: list[int] | None = None
    """query_start_loc as host ints (None: read back from the device when needed)."""
    host_seq_lens: list[int] | None = None
    """seq_lens as host ints (None: read back from the device when needed)."""
    unified: bool = False
    """Attention through the unified kernel, whose launch grid depends on shapes only: a
    mixed batch replayed from a CUDA graph, its lengths in the static buffers it reads."""
    _rows: tuple[int, int] | bool | None = field(default=None, repr=False, compare=False)
    """one_sequence_rows' answer, read once a step (None: not read yet)."""

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def query_starts(self) -> list[int]:
        """[S + 1] host ints (a decode-only batch: 0..S)."""
        if self.host_query_start_loc is None:
            self.host_query_start_loc = (list(range(self.num_seqs + 1)) if self.query_start_loc is None
                                         else self.query_start_loc.tolist())
        return self.host_query_start_loc

    def context_lens(self) -> list[int]:
        """[S] host ints."""
        if self.host_seq_lens is None:
            self.host_seq_lens = self.seq_lens.tolist()
        return self.host_seq_lens

    def one_sequence_rows(self, block_size: int) -> tuple[int, int] | None:
        """A batch of one sequence whose table is on the host: (first slot, context length)
        when its blocks are consecutive in the pool, so its keys are the flat pool's rows
        start:start + length, a view; None otherwise. A CPU decode step reads it once and its
        layers reuse it (one sequence decoding alone keeps consecutive blocks as it grows
        unless other requests took the blocks between)."""
        if self._rows is None:
            self._rows = False
            if self.num_seqs == 1 and self.block_tables.device.type == "cpu":
                n = self.context_lens()[0]
                nb = -(-n // block_size)
                blocks = self.block_tables[0, :nb].tolist()
                if n > 0 and blocks == list(range(blocks[0], blocks[0] + nb)):
                    self._rows = (blocks[0] * block_size, n)
        return self._rows or None


def write_kv_ref(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scales: torch.Tensor | None = None, v_scales: torch.Tensor | None = None,
) -> None:
    """Store new keys/values into their slots. k, v: [T, H_kv, D]; slot_mapping: [T], every
    slot valid (callers drop -1 padding first: torch would wrap it to the last slot). An FP8
    pool stores them quantized, their scale exponents into k_scales, v_scales [num_blocks, block_size, H_kv]."""
    num_blocks, block_size, h_kv, d = k_cache.shape
    if is_fp8(k_cache):
        (k, ke), (v, ve) = quantize_kv_ref(k), quantize_kv_ref(v)
        k_scales.view(num_blocks * block_size, h_kv).index_copy_(0, slot_mapping, ke)
        v_scales.view(num_blocks * block_size, h_kv).index_copy_(0, slot_mapping, ve)
        # index_copy_ has no float8 kernel on the CPU: copy the bytes.
        k_cache, v_cache, k, v = (x.view(torch.uint8) for x in (k_cache, v_cache, k, v))
    # index_copy_ rather than advanced indexing: a plain loop over T rows, where index_put
    # pays for a parallel region per call (most of a CPU decode step's attention time).
    k_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slot_mapping, _as(k, k_cache.dtype))
    v_cache.view(num_blocks * block_size, h_kv, d).index_copy_(0, slot_mapping, _as(v, v_cache.dtype))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A same-dtype .to() still costs a dispatch; a CPU decode step makes hundreds of them.
    return x if x.dtype == dtype else x.to(dtype)


def _gather(cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, dtype: torch.dtype
            ) -> torch.Tensor:
    """Blocks [N] of a pool → [N, block_size, H_kv, D] in dtype (an FP8 pool dequantized)."""
    if not is_fp8(cache):
        return cache.index_select(0, blocks)
    # index_select has no float8 kernel on CUDA in older PyTorch: gather the bytes.
    x = cache.view(torch.uint8).index_select(0, blocks).view(cache.dtype)
    return dequantize_kv_ref(x, scales.index_select(0, blocks), dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    # q: [B, H_q, L, D]; k, v: [B, H_kv, C, D]; mask: [B, 1, L, C] (True = attend) or None
    # SDPA's fused CPU/GPU kernels, grouped-query heads without materialising repeats.
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                lens: torch.Tensor, max_len: int, scale: float, one_len: int | None,
                k_scales: torch.Tensor | None, v_scales: torch.Tensor | None) -> torch.Tensor:
    """One new token per sequence. q: [B, H_q, D]; tables: [B, NB]; lens: [B] → [B, H_q, D].
    Only the first ceil(max_len / block_size) blocks of each table are gathered."""
    _, block_size, h_kv, d = k_cache.shape
    b = q.shape[0]
    nb = min(max(1, -(-max_len // block_size)), tables.shape[1])
    blocks = tables[:, :nb].reshape(-1).long()
    ctx = nb * block_size
    k = _gather(k_cache, k_scales, blocks, q.dtype).view(b, ctx, h_kv, d)
    v = _gather(v_cache, v_scales, blocks, q.dtype).view(b, ctx, h_kv, d)
    if one_len is not None:  # every sequence this long: no mask, the padding sliced off
        k, v = k[:, :one_len], v[:, :one_len]
    # Two small batched matmuls rather than SDPA: for one query row the CPU SDPA kernel's
    # parallel region costs more than the arithmetic (48 us on one thread, 6 ms on two
    # threads of a busy machine, against 0.1-0.4 ms here).
    h_q, out_dtype = q.shape[1], q.dtype
    if q.device.type == "cpu" and q.dtype != torch.float32:
        # A CPU without bfloat16 FMA runs a half-precision matmul several times slower than
        # float32 (the demo's bf16 decode spent more time here than in its GEMVs), and
        # rounding the scores to half is what SDPA's CPU kernel avoids anyway: attend in float32.
        q, k, v = q.float(), k.float(), v.float()
    qg = q.reshape(b, h_kv, h_q // h_kv, d)                                  # [B, H_kv, G, D]
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale                 # [B, H_kv, G, C]
    if one_len is None:
        # Padding rows (length 0) attend to slot 0 rather than to nothing, which would be NaN.
        pos = torch.arange(ctx, device=q.device)
        keep = (pos[None, :] < lens.clamp_min(1)[:, None]).view(b, 1, 1, ctx)
        scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.matmul(scores.softmax(-1), v.transpose(1, 2))                # [B, H_kv, G, D]
    return _as(out.reshape(b, h_q, d), out_dtype)


def _decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: tuple[int, int],
                 scale: float) -> torch.Tensor:
    """_decode_ref for one sequence whose keys are the pool rows start:start + n: the same
    matmuls over the same strides (the same bits), on views instead of gathered copies.
    q: [1, H_q, D] → [1, H_q, D]."""
    start, n = rows
    _, _, h_kv, d = k_cache.shape
    h_q, out_dtype = q.shape[1], q.dtype
    k = k_cache.view(-1, h_kv, d)[start:start + n]  # [C, H_kv, D]
    v = v_cache.view(-1, h_kv, d)[start:start + n]
    if q.device.type == "cpu" and q.dtype != torch.float32:  # as _decode_ref: attend in float32
        q, k, v = q.float(), k.float(), v.float()
    qg = q.reshape(h_kv, h_q // h_kv, d)                               # [H_kv, G, D]
    # bmm is what matmul calls for these 3-D operands (the same bits) without its shape logic;
    # the in-place scale saves an allocation: ~5 us a layer after a GEMV stream has cooled the caches.
    scores = torch.bmm(qg, k.permute(1, 2, 0)).mul_(scale)              # [H_kv, G, C]
    out = torch.bmm(scores.softmax(-1), v.transpose(0, 1))              # [H_kv, G, D]
    return _as(out.reshape(1, h_q, d), out_dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scales: torch.Tensor | None = None,
    v_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the batch's new tokens over each sequence's paged context.

    q: [T, H_q, D] (H_q a multiple of H_kv: grouped-query attention). Returns [T, H_q, D].
    The new tokens' K/V must already be written to the pool (an FP8 one with its scales).
    """
    _, block_size, h_kv, d = k_cache.shape
    if meta.query_start_loc is None:
        if q.shape[0] == 1 and k_scales is None and (rows := meta.one_sequence_rows(block_size)) is not None:
            return _decode_rows(q, k_cache, v_cache, rows, scale)
        lens = meta.context_lens() if meta.host_seq_lens is not None or q.shape[0] == 1 else None
        one = lens[0] if lens is not None and min(lens) == max(lens) > 0 else None
        return _decode_ref(q, k_cache, v_cache, meta.block_tables[: q.shape[0]], meta.seq_lens[: q.shape[0]],
                           meta.max_seq_len, scale, one, k_scales, v_scales)

    qsl, seq_lens = meta.query_starts(), meta.context_lens()
    out = torch.empty_like(q)
    decodes = [s for s in range(len(seq_lens)) if qsl[s + 1] - qsl[s] == 1]
    if decodes:
        lens = [seq_lens[s] for s in decodes]
        one = lens[0] if min(lens) == max(lens) else None
        if len(decodes) == len(seq_lens):
            out[:] = _decode_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, max(lens), scale, one,
                                 k_scales, v_scales)
            return out
        seq_idx = torch.tensor(decodes, device=q.device)
        tok_idx = torch.tensor([qsl[s] for s in decodes], device=q.device)
        out[tok_idx] = _decode_ref(q[tok_idx], k_cache, v_cache, meta.block_tables[seq_idx],
                                   meta.seq_lens[seq_idx], max(lens), scale, one, k_scales, v_scales)

    for s in range(len(seq_lens)):
        start, end = qsl[s], qsl[s + 1]
        n_new, ctx_len = end - start, seq_lens[s]
        if n_new <= 1:
            continue
        n_blocks = -(-ctx_len // block_size)
        table = meta.block_tables[s, :n_blocks].long()
        k = _gather(k_cache, k_scales, table, q.dtype).view(-1, h_kv, d)[:ctx_len].transpose(0, 1)  # [H_kv, C, D]
        v = _gather(v_cache, v_scales, table, q.dtype).view(-1, h_kv, d)[:ctx_len].transpose(0, 1)
        qs = q[start:end].transpose(0, 1)  # [H_q, L, D]
        q_pos = torch.arange(ctx_len - n_new, ctx_len, device=q.device)
        mask = q_pos[:, None] >= torch.arange(ctx_len, device=q.device)[None, :]  # [L, C]
        o = _attend(qs[None], k[None], v[None], mask[None, None], scale)[0]  # [H_q, L, D]
        out[start:end] = o.transpose(0, 1)
    return out
