"""The fragment-order kernel's L2 prefetch before its PDL wait (LLMESH_MMA_L2PF): the budget's
form on the CPU, and on a GPU the same result with it as without, alone and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from llmesh.kernels.quant_ref import w4a16_gemm_ref
from llmesh.kernels.w4a16_mma import L2PF_ENV, MmaConfig, l2pf_budget, pack_codes, pack_scales, w4a16_mma


def test_the_budget_reads_bytes_with_a_k_or_m_suffix(monkeypatch):
    monkeypatch.delenv(L2PF_ENV, raising=False)
    assert l2pf_budget() == 0
    for text, want in (("16M", 16 << 20), ("512k", 512 << 10), ("4096", 4096), ("0", 0)):
        monkeypatch.setenv(L2PF_ENV, text)
        assert l2pf_budget() == want, text
    monkeypatch.setenv(L2PF_ENV, "lots")
    with pytest.raises(ValueError, match="byte count"):
        l2pf_budget()


@pytest.mark.parametrize("config", [MmaConfig(1, 8, 2, 1, 8), MmaConfig(4, 4, 4, 1, 0, 0, 1), MmaConfig(2, 8, 4, 4, 4)])
def test_the_prefetch_changes_no_result_on_gpu(monkeypatch, config, int4_weight):
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    if config.bulk and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies need Hopper")
    gen = torch.Generator().manual_seed(2)
    w = int4_weight(2048, 1024, 128, gen)
    x = torch.randn(1, 2048, generator=gen).to(torch.bfloat16).cuda()
    codes, scales = pack_codes(w.codes()).cuda(), pack_scales(w.scales, w.mins).cuda()
    monkeypatch.delenv(L2PF_ENV, raising=False)
    plain = w4a16_mma(x, codes, scales, 128, config=config)
    for budget in ("64K", "16M"):  # part of each warp's run, then all of it
        monkeypatch.setenv(L2PF_ENV, budget)
        torch.testing.assert_close(w4a16_mma(x, codes, scales, 128, config=config), plain, rtol=0, atol=0)
        out = torch.empty_like(plain)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            w4a16_mma(x, codes, scales, 128, config=config, out=out)
        graph.replay()
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
    ref = w4a16_gemm_ref(x.cpu().float(), w.qweight, w.scales, w.mins, 128)
    torch.testing.assert_close(plain.cpu().float(), ref, rtol=1e-2, atol=1e-2)
