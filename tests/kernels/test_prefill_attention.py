"""The Triton prefill/extend attention matches the prefill path of paged_attention_ref."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.prefill_attention import prefill_attention, prefill_attention_ref  # noqa: E402

# float32 is exact up to summation order on the CPU interpreter; a GPU's dot units and exp2
# leave more room. 16-bit tolerances cover one rounding of the output.
TOL = {torch.float32: 1e-3 if torch.cuda.is_available() else 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

HEADS = [(4, 4), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8
# (cached tokens, new tokens): a one-token prompt, a fresh prefill over a block boundary, an
# extend after a prefix hit, a decode-like step, a long prefix hit, a sequence with no new token
MIXED = [(0, 1), (0, 17), (16, 9), (15, 1), (1000, 33), (20, 0)]


def _check(device, paged_kv, seqs, h_q, h_kv, d, block_size, dtype, table_dtype):
    gen = torch.Generator().manual_seed(sum(c + n for c, n in seqs) * 13 + h_q * 3 + h_kv + d + block_size)
    kv = paged_kv([c + n for c, n in seqs], h_kv, d, block_size, dtype, gen, table_dtype=table_dtype)
    qsl = [0]
    for _, n in seqs:
        qsl.append(qsl[-1] + n)
    query_start_loc = torch.tensor(qsl, dtype=torch.int32)
    q = torch.randn(qsl[-1], h_q, d, generator=gen).to(dtype)
    scale = d ** -0.5
    ref = prefill_attention_ref(q, kv.k_ref, kv.v_ref, kv.block_tables, query_start_loc, kv.seq_lens, scale)

    out = torch.full_like(q, float("nan"), device=device)  # every element must be written
    got = prefill_attention(
        q.to(device), kv.k_cache, kv.v_cache, kv.block_tables.to(device), query_start_loc.to(device),
        kv.seq_lens.to(device), scale, out=out)
    assert got is out
    tol = TOL[dtype]
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("h_q,h_kv", HEADS)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_reference(device, paged_kv, h_q, h_kv, d, dtype):
    _check(device, paged_kv, MIXED, h_q, h_kv, d, 16, dtype, torch.int32)


@pytest.mark.parametrize("seqs,h_q,h_kv,d,block_size,dtype", [
    ([(0, 1)], 4, 4, 64, 16, torch.float32),  # a single one-token prompt
    ([(0, 33)], 8, 2, 128, 16, torch.bfloat16),  # a single fresh prompt
    ([(15, 1), (16, 16), (1, 16)], 8, 1, 64, 8, torch.bfloat16),  # block_size 8, block boundaries
    ([(5, 150), (0, 40)], 6, 2, 64, 32, torch.float16),  # several query tiles, block_size 32
    ([(64, 20)], 3, 3, 80, 16, torch.float32),  # head_dim not a power of two
])
def test_edge_cases_match_reference(device, paged_kv, seqs, h_q, h_kv, d, block_size, dtype):
    _check(device, paged_kv, seqs, h_q, h_kv, d, block_size, dtype, torch.int64)


def test_rejects_bad_inputs(device):
    q = torch.randn(5, 4, 64, device=device)
    cache = torch.randn(4, 16, 2, 64, device=device)
    tables = torch.zeros(2, 2, dtype=torch.int32, device=device)
    lens = torch.tensor([3, 4], device=device)
    with pytest.raises(ValueError, match="query_start_loc has S \\+ 1=2"):
        prefill_attention(q, cache, cache, tables, torch.tensor([0, 5], device=device), lens, 0.1)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention(q[..., :8], cache[..., :8], cache[..., :8], tables, torch.tensor([0, 2, 5], device=device),
                          lens, 0.1)
    with pytest.raises(ValueError, match="v_cache"):
        prefill_attention(q, cache, cache[:2], tables, torch.tensor([0, 2, 5], device=device), lens, 0.1)
