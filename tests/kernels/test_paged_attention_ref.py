"""The torch paged-attention reference equals dense causal attention on random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref, write_kv_ref


def _dense(q, k, v, n_ctx_before, scale):
    # q: [L, Hq, D]; k, v: [C, Hkv, D] with C = n_ctx_before + L
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("lhd,chd->hlc", q.double(), k.double()) * scale
    pos = torch.arange(n_ctx_before, n_ctx_before + q.shape[0])
    s = s.masked_fill(pos[:, None] < torch.arange(k.shape[0])[None, :], float("-inf"))
    return torch.einsum("hlc,chd->lhd", s.softmax(-1), v.double())


@pytest.mark.parametrize("h_q,h_kv,d", [(4, 4, 64), (8, 2, 32), (16, 2, 128)])
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("host_lists", [True, False])
def test_mixed_batch_matches_dense(h_q, h_kv, d, block_size, host_lists):
    rng = random.Random(h_q * 1000 + d + block_size)
    torch.manual_seed(rng.randrange(1 << 30))
    num_blocks = 200
    k_cache = torch.randn(num_blocks, block_size, h_kv, d)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d)
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (cached tokens, new tokens): decodes, a fresh prefill, an extend after a prefix hit
    seqs = [(37, 1), (0, 23), (16, 9), (64, 1), (5, 1)]
    q_all, slots, qsl, lens, tables, ctx_k, ctx_v = [], [], [0], [], [], [], []
    for cached, new in seqs:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        k = torch.randn(total, h_kv, d)
        v = torch.randn(total, h_kv, d)
        for p in range(cached):  # the cached prefix is already in the pool
            k_cache[table[p // block_size], p % block_size] = k[p]
            v_cache[table[p // block_size], p % block_size] = v[p]
        ctx_k.append(k), ctx_v.append(v)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, total)]
        q_all.append(torch.randn(new, h_q, d))
        qsl.append(qsl[-1] + new)
        lens.append(total)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=bt, seq_lens=torch.tensor(lens, dtype=torch.int32),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens), host_query_start_loc=qsl if host_lists else None,
        host_seq_lens=lens if host_lists else None)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(ctx_k, seqs)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(ctx_v, seqs)])
    write_kv_ref(k_cache, v_cache, new_k, new_v, meta.slot_mapping)
    q = torch.cat(q_all)
    out = paged_attention_ref(q, k_cache, v_cache, meta, d ** -0.5)
    for i, (cached, new) in enumerate(seqs):
        ref = _dense(q_all[i], ctx_k[i], ctx_v[i], cached, d ** -0.5)
        got = out[qsl[i]:qsl[i + 1]].double()
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (i, float((got - ref).abs().max()))


@pytest.mark.parametrize("lens", [[9, 40, 17], [33, 33], [21]])
@pytest.mark.parametrize("host_lists", [True, False])
def test_decode_only_batch_matches_dense(lens, host_lists):
    """query_start_loc None: sequence s owns token s; tables wider than the context (as under
    CUDA graphs) and a max_seq_len above every length are read only as far as needed."""
    torch.manual_seed(len(lens) * 100 + lens[0])
    h_q, h_kv, d, block_size, num_blocks = 8, 2, 32, 16, 64
    k_cache = torch.randn(num_blocks, block_size, h_kv, d)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d)
    perm = torch.randperm(num_blocks)
    width = 8  # blocks per table: more than any sequence uses
    tables = perm[: len(lens) * width].view(len(lens), width).to(torch.int32)
    q = torch.randn(len(lens), h_q, d)
    meta = AttentionMetadata(
        slot_mapping=torch.full((len(lens),), -1), block_tables=tables,
        seq_lens=torch.tensor(lens, dtype=torch.int32), query_start_loc=None, max_query_len=1,
        max_seq_len=width * block_size, host_seq_lens=lens if host_lists else None)
    out = paged_attention_ref(q, k_cache, v_cache, meta, d ** -0.5)
    for s, n in enumerate(lens):
        slots = [int(tables[s, p // block_size]) * block_size + p % block_size for p in range(n)]
        k = k_cache.view(-1, h_kv, d)[slots]
        v = v_cache.view(-1, h_kv, d)[slots]
        ref = _dense(q[s:s + 1], k, v, n - 1, d ** -0.5)
        assert torch.allclose(out[s:s + 1].double(), ref, atol=1e-5, rtol=1e-5), s
