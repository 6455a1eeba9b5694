"""extend_attention (prefill chunks after a cached prefix): gather_kv copies each context out of
the pool exactly, every backend it can dispatch to matches the prefill path of
paged_attention_ref, and its dispatch rule picks as documented."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels import extend_attention as ext  # noqa: E402
from llmesh.kernels import fa3  # noqa: E402
from llmesh.kernels.extend_attention import extend_attention, gather_kv, gather_kv_ref  # noqa: E402
from llmesh.kernels.prefill_attention import prefill_attention_ref  # noqa: E402

TOL = {torch.float32: 1e-3 if torch.cuda.is_available() else 2e-5, torch.bfloat16: 1e-2}
# (cached tokens, new tokens): a prefix hit, a chunk over a block boundary, a decode-like step,
# a long prefix, a sequence with no new token, a fresh prompt
SEQS = [(16, 9), (5, 40), (15, 1), (300, 33), (20, 0), (0, 12)]


BACKENDS = ["triton"] + (["fa3"] if fa3.fa3_runs_here() else [])


def _cu(lens):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,h_kv,d", [(8, 2, 64), (16, 2, 64), (16, 3, 80)])
def test_gather_copies_each_context_exactly(device, paged_kv, dtype, block_size, h_kv, d):
    lens = [c + n for c, n in SEQS]
    kv = paged_kv(lens, h_kv, d, block_size, dtype, torch.Generator().manual_seed(block_size + d))
    cu = torch.tensor(_cu(lens), dtype=torch.int32, device=device)
    k, v = gather_kv(kv.k_cache, kv.v_cache, kv.block_tables.to(device), cu, sum(lens), max(lens))
    want_k, want_v = gather_kv_ref(kv.k_ref, kv.v_ref, kv.block_tables, lens)
    assert k.shape == (sum(lens), h_kv, d) and k.dtype == dtype
    assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)  # no NaN: nothing past a context read


def test_gather_rejects_a_pool_without_contiguous_token_rows(device):
    pool = torch.zeros(4, 16, 64, 2, device=device).transpose(2, 3)  # [4, 16, 2, 64], D not contiguous
    tables = torch.zeros(1, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="contiguously"):
        gather_kv(pool, pool, tables, torch.tensor([0, 5], dtype=torch.int32, device=device), 5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        gather_kv(pool.contiguous(), pool.contiguous(), tables, torch.tensor([0, 5], device=device), 5, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h_q,h_kv,d,dtype", [(8, 2, 64, torch.bfloat16), (4, 4, 128, torch.bfloat16),
                                              (8, 1, 64, torch.float32)])
def test_matches_reference(device, paged_kv, backend, h_q, h_kv, d, dtype):
    if backend == "fa3" and dtype != torch.bfloat16:
        pytest.skip("the fa3-fwd build has bfloat16 kernels only")
    gen = torch.Generator().manual_seed(h_q * 7 + h_kv + d)
    lens = [c + n for c, n in SEQS]
    kv = paged_kv(lens, h_kv, d, 16, dtype, gen)
    qsl = _cu([n for _, n in SEQS])
    q = torch.randn(qsl[-1] + 2, h_q, d, generator=gen).to(dtype)  # two rows no sequence owns
    scale = d ** -0.5
    ref = prefill_attention_ref(q[:qsl[-1]], kv.k_ref, kv.v_ref, kv.block_tables, torch.tensor(qsl), kv.seq_lens,
                                scale)
    out = torch.full_like(q, float("nan"), device=device)
    got = extend_attention(q.to(device), kv.k_cache, kv.v_cache, kv.block_tables.to(device),
                           torch.tensor(qsl, dtype=torch.int32, device=device), kv.seq_lens.to(device), scale,
                           host_query_start_loc=qsl, host_seq_lens=lens, out=out, backend=backend).cpu()
    torch.testing.assert_close(got[:qsl[-1]].float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.isnan(got[qsl[-1]:]).all()  # rows past the last offset are left as they were


def test_dispatch_rule(monkeypatch):
    """The Triton kernel off CUDA, below LIBRARY_MIN_TOKENS new tokens and where
    EXTEND_BACKEND's bucket of the mean new tokens does not say "fa3"; FA3 where it does and runs."""
    cpu_q = torch.zeros(4, 8, 128, dtype=torch.bfloat16)
    monkeypatch.setitem(ext.EXTEND_BACKEND, "cpu", {1 << 20: "fa3"})
    assert ext.choose_backend(cpu_q, 4, [2048, 2048]) == "triton"
    if not torch.cuda.is_available():
        return
    from llmesh.kernels.common import cuda_device_tag

    q = cpu_q.cuda()
    monkeypatch.setitem(ext.EXTEND_BACKEND, cuda_device_tag(q.device), {256: "triton", 8192: "fa3"})
    assert ext.choose_backend(q, 4, [128] * 8) == "triton"  # mean 128: the first bucket
    assert ext.choose_backend(q, 4, [2048, 2048]) == ("fa3" if fa3.fa3_usable(q, 4) else "triton")
    assert ext.choose_backend(q, 4, [100, 100]) == "triton"  # too few tokens


def test_rejects_bad_inputs(device, paged_kv):
    kv = paged_kv([10, 6], 2, 64, 16, torch.float32, torch.Generator().manual_seed(3))
    q = torch.randn(7, 4, 64, device=device)
    args = (q, kv.k_cache, kv.v_cache, kv.block_tables.to(device),
            torch.tensor([0, 4, 7], dtype=torch.int32, device=device), kv.seq_lens.to(device), 0.125)
    with pytest.raises(ValueError, match="host_seq_lens"):
        extend_attention(*args, host_query_start_loc=[0, 4, 7], host_seq_lens=[10])
    with pytest.raises(ValueError, match="hold its new tokens"):
        extend_attention(*args, host_query_start_loc=[0, 4, 7], host_seq_lens=[3, 6])
    with pytest.raises(ValueError, match="backend"):
        extend_attention(*args, host_query_start_loc=[0, 4, 7], host_seq_lens=[10, 6], backend="cudnn")
    with pytest.raises(ValueError, match="fa3-fwd"):  # float32: no FA3 kernels, on any device
        extend_attention(*args, host_query_start_loc=[0, 4, 7], host_seq_lens=[10, 6], backend="fa3")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_pool_is_gathered_dequantized_and_attends_as_the_reference(fp8_device, backend):
    """An FP8 pool's contexts come out as their exact values (codes times scales), and attention
    over them equals the reference over the same FP8 pool."""
    from tests.kernels.test_kv_fp8_attention import Fp8Pool

    gen = torch.Generator().manual_seed(5)
    h_q, h_kv, d = 8, 2, 64
    seqs = [(20, 20), (7, 40), (1, 9), (33, 70)]  # (new, context): a fresh prompt, extends, a decode
    pool = Fp8Pool([c for _, c in seqs], h_kv, d, 16, gen)
    k8, v8, ks, vs = pool.fp8(fp8_device)
    lens = [c for _, c in seqs]
    cu = torch.tensor(_cu(lens), dtype=torch.int32, device=fp8_device)
    k, v = gather_kv(k8, v8, pool.tables.to(fp8_device), cu, sum(lens), max(lens), k_scales=ks, v_scales=vs,
                     dtype=torch.bfloat16)
    want_k, want_v = gather_kv_ref(pool.k8, pool.v8, pool.tables, lens, pool.ks, pool.vs, torch.bfloat16)
    assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)
    with pytest.raises(ValueError, match="float dtype"):
        gather_kv(k8, v8, pool.tables.to(fp8_device), cu, sum(lens), max(lens), k_scales=ks, v_scales=vs)

    qsl = _cu([n for n, _ in seqs])
    q = torch.randn(qsl[-1], h_q, d, generator=gen).bfloat16()
    ref = prefill_attention_ref(q.float(), pool.k8, pool.v8, pool.tables, torch.tensor(qsl), pool.lens, d ** -0.5,
                                pool.ks, pool.vs)
    got = extend_attention(q.to(fp8_device), k8, v8, pool.tables.to(fp8_device),
                           torch.tensor(qsl, dtype=torch.int32, device=fp8_device), pool.lens.to(fp8_device), d ** -0.5,
                           host_query_start_loc=qsl, host_seq_lens=lens, backend=backend, k_scales=ks, v_scales=vs)
    torch.testing.assert_close(got.cpu().float(), ref, rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])
