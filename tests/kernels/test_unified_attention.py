"""unified_attention on flattened mixed batches matches paged_attention_ref; padded layouts and
CUDA-graph replay (the launch depends on shapes only) give the same answers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.attention_config import DecodeConfig, PrefillConfig  # noqa: E402
from llmesh.kernels.unified_attention import unified_attention, unified_attention_ref  # noqa: E402
from tests.kernels.cuda_graphs import capture  # noqa: E402

TOL = {torch.float32: 1e-3 if torch.cuda.is_available() else 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (cached tokens, new tokens): decodes at block boundaries, a 3-token speculative step, a fresh
# prefill chunk, an extend after a cached prefix, a later chunk of a chunked prefill
MIXED = [(15, 1), (0, 1), (40, 1), (7, 3), (0, 21), (16, 9), (48, 17), (90, 1)]


def _batch(paged_kv, seqs, h_q, h_kv, d, block_size, dtype, seed, pad_seqs=0, pad_rows=0):
    """Random pool and q for `seqs`, plus `pad_seqs` empty sequences and `pad_rows` unowned rows."""
    gen = torch.Generator().manual_seed(seed)
    kv = paged_kv([c + n for c, n in seqs] + [0] * pad_seqs, h_kv, d, block_size, dtype, gen)
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    qsl += [qsl[-1]] * pad_seqs
    q = torch.randn(qsl[-1] + pad_rows, h_q, d, generator=gen).to(dtype)
    return kv, q, torch.tensor(qsl, dtype=torch.int32)


def _run(device, kv, q, qsl, scale, max_query_len, max_seq_len, **kw):
    out = torch.full_like(q, float("nan"), device=device)
    got = unified_attention(q.to(device), kv.k_cache, kv.v_cache, kv.block_tables.to(device),
                            kv.seq_lens.to(device), qsl.to(device), scale, max_query_len=max_query_len,
                            max_seq_len=max_seq_len, out=out, **kw)
    assert got is out
    return got.cpu()


@pytest.mark.parametrize("h_q,h_kv", [(4, 4), (8, 2), (8, 1), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("segments", [None, 3], ids=["auto", "split3"])
def test_mixed_batch_matches_reference(device, paged_kv, h_q, h_kv, dtype, segments):
    d, bs = 64, 16
    kv, q, qsl = _batch(paged_kv, MIXED, h_q, h_kv, d, bs, dtype, seed=h_q * 10 + h_kv + (segments or 0))
    scale = d ** -0.5
    ref = unified_attention_ref(q, kv.k_ref, kv.v_ref, kv.block_tables, kv.seq_lens, qsl, scale)
    got = _run(device, kv, q, qsl, scale, max_query_len=32, max_seq_len=128, num_segments=segments)
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("seqs,h_q,h_kv,d,block_size,dtype", [
    ([(0, 1)], 4, 4, 64, 16, torch.float32),  # a single one-token prompt
    ([(33, 1), (70, 1), (5, 1)], 16, 2, 128, 8, torch.bfloat16),  # decodes only, block_size 8
    ([(0, 40)], 8, 2, 64, 32, torch.float16),  # one prefill chunk, several query blocks
    ([(20, 5), (3, 4)], 4, 1, 80, 16, torch.float32),  # 4-token queries at the short/long boundary, d 80
])
def test_edge_cases_match_reference(device, paged_kv, seqs, h_q, h_kv, d, block_size, dtype):
    kv, q, qsl = _batch(paged_kv, seqs, h_q, h_kv, d, block_size, dtype, seed=len(seqs) * 7 + d)
    scale = d ** -0.5
    ref = unified_attention_ref(q, kv.k_ref, kv.v_ref, kv.block_tables, kv.seq_lens, qsl, scale)
    got = _run(device, kv, q, qsl, scale, max_query_len=max(n for _, n in seqs), max_seq_len=112)
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("segments", [1, 4])
def test_padded_layout(device, paged_kv, segments):
    """Empty padding sequences and unowned rows past query_start_loc[S] (a batch padded to a
    captured graph's shapes): real rows match, padding rows are not written."""
    seqs = [(10, 1), (0, 12), (30, 1), (5, 6)]
    kv, q, qsl = _batch(paged_kv, seqs, 8, 2, 64, 16, torch.bfloat16, seed=5, pad_seqs=3, pad_rows=7)
    real = int(qsl[-1])
    ref = unified_attention_ref(q, kv.k_ref, kv.v_ref, kv.block_tables, kv.seq_lens, qsl, 0.125)
    got = _run(device, kv, q, qsl, 0.125, max_query_len=q.shape[0], max_seq_len=256, num_segments=segments)
    torch.testing.assert_close(got[:real].float(), ref[:real].float(), rtol=1e-2, atol=1e-2)
    assert torch.isnan(got[real:]).all()


def test_explicit_configs(device, paged_kv):
    """The sweep's overrides (other tile shapes, split sizes) give the same answers."""
    kv, q, qsl = _batch(paged_kv, MIXED[:6], 8, 2, 64, 16, torch.float32, seed=9)
    ref = unified_attention_ref(q, kv.k_ref, kv.v_ref, kv.block_tables, kv.seq_lens, qsl, 0.125)
    got = _run(device, kv, q, qsl, 0.125, max_query_len=32, max_seq_len=64, num_segments=2,
               decode_cfg=DecodeConfig(block_n=32, num_warps=2, num_stages=1, min_segment=32, programs_per_sm=1),
               prefill_cfg=PrefillConfig(block_m=16, block_n=32, num_warps=2, num_stages=1))
    torch.testing.assert_close(got, ref, rtol=TOL[torch.float32], atol=TOL[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replay(paged_kv):
    """Captured once on one batch, replayed on others of the same shapes (different lengths,
    mixes and padding) without re-capture."""
    device = torch.device("cuda")
    h_q, h_kv, d, bs, t_cap, s_cap, max_blocks = 8, 2, 128, 16, 48, 6, 16
    batches = [
        [(15, 1), (0, 20), (100, 1), (33, 9)],
        [(200, 1)] * 6,
        [(0, 48)],
        [(7, 1), (60, 3), (0, 30), (10, 1), (120, 1)],
    ]
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.randn(s_cap * max_blocks + 1, bs, h_kv, d, generator=gen).to(device, torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.zeros(t_cap, h_q, d, device=device, dtype=torch.bfloat16)
    tables = torch.zeros(s_cap, max_blocks, dtype=torch.int32, device=device)
    seq_lens = torch.zeros(s_cap, dtype=torch.int32, device=device)
    qsl = torch.zeros(s_cap + 1, dtype=torch.int32, device=device)
    out = torch.zeros_like(q)

    def load(seqs):
        perm = torch.randperm(k_cache.shape[0], generator=gen)[: s_cap * max_blocks].view(s_cap, max_blocks)
        starts, lens = [0], []
        for c, n in seqs:
            starts.append(starts[-1] + n)
            lens.append(c + n)
        starts += [starts[-1]] * (s_cap - len(seqs))
        lens += [0] * (s_cap - len(seqs))
        tables.copy_(perm.to(torch.int32))
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        qsl.copy_(torch.tensor(starts, dtype=torch.int32))
        q.copy_(torch.randn(t_cap, h_q, d, generator=gen))
        return starts[len(seqs)]

    def step():
        unified_attention(q, k_cache, v_cache, tables, seq_lens, qsl, d ** -0.5, max_query_len=t_cap,
                          max_seq_len=max_blocks * bs, out=out)

    load(batches[0])
    graph, _ = capture(step)
    for seqs in batches:
        real = load(seqs)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = unified_attention_ref(q, k_cache, v_cache, tables, seq_lens, qsl, d ** -0.5)
        torch.testing.assert_close(out[:real].float(), ref[:real].float(), rtol=1e-2, atol=1e-2)


def test_rejects_bad_inputs(device):
    q = torch.randn(5, 4, 64, device=device)
    cache = torch.randn(4, 16, 2, 64, device=device)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    lens = torch.tensor([3, 4], device=device)
    kw = dict(max_query_len=4, max_seq_len=32)
    with pytest.raises(ValueError, match="query_start_loc has S \\+ 1=2"):
        unified_attention(q, cache, cache, tables, lens, torch.tensor([0, 5], device=device), 0.1, **kw)
    with pytest.raises(ValueError, match="not a multiple"):
        unified_attention(q[:, :3], cache, cache, tables, lens, torch.tensor([0, 2, 5], device=device), 0.1, **kw)
    with pytest.raises(ValueError, match="seq_lens"):
        unified_attention(q, cache, cache, tables, lens.float(), torch.tensor([0, 2, 5], device=device), 0.1, **kw)
