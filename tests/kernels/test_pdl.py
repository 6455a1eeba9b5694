"""Programmatic dependent launch (llmesh/kernels/common.pdl_launch): off where it cannot work, and on
a Hopper GPU a chain of dependent kernels captured in a CUDA graph gives every bit with PDL
that it gives without (a kernel reading before its wait would race with its producer)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.common import PDL_ENV, pdl_launch, pdl_off  # noqa: E402
from tests.kernels.cuda_graphs import capture  # noqa: E402

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] >= 9


def test_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    assert pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl_launch(torch.device("cuda", 0)) == {"PDL": False}  # no device query under the interpreter


@pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper (sm90) or newer GPU")
def test_on_for_hopper_unless_the_environment_says_no(monkeypatch):
    dev = torch.device("cuda", torch.cuda.current_device())
    assert pdl_launch(dev) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setenv(PDL_ENV, "0")
    assert pdl_launch(dev) == {"PDL": False}


def test_pdl_off_turns_it_off_inside_and_restores_the_environment(monkeypatch):
    import os

    monkeypatch.delenv(PDL_ENV, raising=False)
    with pdl_off():
        assert os.environ[PDL_ENV] == "0" and pdl_launch(torch.device("cuda", 0)) == {"PDL": False}
    assert PDL_ENV not in os.environ
    monkeypatch.setenv(PDL_ENV, "1")
    with pytest.raises(RuntimeError), pdl_off():
        raise RuntimeError("a benchmark's failure inside")
    assert os.environ[PDL_ENV] == "1"


def _layer(x, res, g, w_qkv, w_down, positions, cos_sin, k_cache, v_cache, slots, meta_args):
    """A decoder layer's dependent kernels at decode size: every kernel reads what the one
    before it wrote (fused norm+GEMV, RoPE + KV write, paged attention, GEMV, norm, argmax)."""
    from llmesh.kernels.argmax import argmax_rows
    from llmesh.kernels.fused_skinny import rmsnorm_linear
    from llmesh.kernels.paged_decode_attention import paged_decode_attention
    from llmesh.kernels.rmsnorm import rmsnorm
    from llmesh.kernels.rope_kv_write import rope_kv_write
    from llmesh.kernels.skinny_gemm import skinny_gemm
    from llmesh.kernels.skinny_gemm_config import SkinnyConfig

    block_tables, seq_lens = meta_args
    h_q, h_kv, d = 8, 2, 64
    qkv, res = rmsnorm_linear(x, res, g, 1e-5, w_qkv, config=SkinnyConfig(1, 16, 128, 2, 4, 2, False))
    q, k, v = qkv.split([h_q * d, h_kv * d, h_kv * d], dim=-1)
    q, k = rope_kv_write(positions, q.view(-1, h_q, d), k.view(-1, h_kv, d), v.view(-1, h_kv, d), cos_sin,
                         k_cache, v_cache, slots)
    attn = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, d ** -0.5, partition_size=64,
                                  max_seq_len=block_tables.shape[1] * k_cache.shape[1])  # no sync in a capture
    y = skinny_gemm(attn.reshape(x.shape[0], -1), w_down, config=SkinnyConfig(1, 16, 128, 1, 4, 2, False))
    normed, res = rmsnorm(y, g, 1e-5, residual=res)
    return argmax_rows(normed), normed, res


@pytest.mark.skipif(not HOPPER, reason="PDL needs a Hopper (sm90) or newer GPU")
def test_graph_with_pdl_gives_every_bit_of_the_graph_without(monkeypatch):
    from llmesh.kernels.rope import rope_cos_sin_cache

    gen = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    b, hidden, d, h_q, h_kv, block = 2, 512, 64, 8, 2, 16
    ctx = 300
    nb = -(-(ctx + 1) // block)
    pool = b * nb + 1

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(torch.bfloat16).to(dev)

    x, res, g = rand(b, hidden), rand(b, hidden), 1 + rand(hidden, s=0.1)
    w_qkv, w_down = rand((h_q + 2 * h_kv) * d, hidden, s=0.05), rand(hidden, h_q * d, s=0.05)
    k0, v0 = rand(pool, block, h_kv, d), rand(pool, block, h_kv, d)
    tables = torch.arange(b * nb, device=dev, dtype=torch.int32).view(b, nb)
    seq_lens = torch.full((b,), ctx + 1, device=dev, dtype=torch.int32)
    positions = torch.full((b,), ctx, device=dev, dtype=torch.int64)
    slots = (tables[:, ctx // block] * block + ctx % block).to(torch.int64)
    cos_sin = rope_cos_sin_cache(d, 10000.0, None, 4096, device=dev)

    def run(pdl: str):
        monkeypatch.setenv(PDL_ENV, pdl)
        k_cache, v_cache = k0.clone(), v0.clone()
        args = (x, res, g, w_qkv, w_down, positions, cos_sin, k_cache, v_cache, slots, (tables, seq_lens))

        def chain():
            outs = _layer(*args)
            for _ in range(7):  # a chain of layers: each reads the last one's residual stream
                outs = _layer(outs[1], outs[2], *args[2:])
            return outs

        graph, outs = capture(chain)
        k_cache.copy_(k0)
        v_cache.copy_(v0)
        graph.replay()
        torch.cuda.synchronize()
        return [t.clone() for t in outs] + [k_cache.clone(), v_cache.clone()]

    with_pdl, without = run("1"), run("0")
    for a, b_ in zip(with_pdl, without):
        assert torch.equal(a, b_)
