"""The fragment-order kernel with RMSNorm made as x is read (``w4a16_mma(..., act="rmsnorm")``).

A qkv or gate/up projection's input is rmsnorm(x + residual) * weight. The kernel takes x, the
residual and the norm weight, sums each row's squares over the whole K itself, normalises x as it
stages or loads it, and one block per row tile stores x + residual: rmsnorm's launch is gone.

On the CPU: the launch names the instance and bad arguments are named (NVRTC compiles the fused
instances with no local memory in test_w4a16_mma.py). On a GPU: the kernel against
rmsnorm_ref then the GEMM reference (x staged and loaded with the codes, bulk copies, split K, two
n8 tiles, K padded, with and without a residual, 4- and 8-bit codes, in a CUDA graph), the stored
sum bit for bit rmsnorm's, and the Triton backend's norm_linear taking it where the table says."""

from __future__ import annotations

import pytest
import torch

from llmesh.kernels.rmsnorm import rmsnorm_ref
from llmesh.kernels.w4a16_mma import MmaConfig, pack_codes, pack_scales, plan_launch, w4a16_mma
from tests.kernels.test_w4a16_mma import layout_and_reference

EPS = 1e-5


def test_the_launch_names_the_norm_instance():
    plan = plan_launch(MmaConfig(1, 8, 4, 1), 1, 4096, 4096, 128, act=2)
    assert plan.name == "w4a16_mma<1, 8, 4, 8, 0, 1, 1, 0, 2>"
    assert plan_launch(MmaConfig(4, 4, 4, 1, 0, 0, 1), 1, 28672, 4096, 128, act=2).name.endswith(", 1, 1, 2>")
    with pytest.raises(ValueError, match="xload 2"):
        plan_launch(MmaConfig(2, 8, 4, 1, 0, 0, 2), 16, 4096, 4096, 128, act=2)


def test_bad_norm_arguments_are_named(int4_weight):
    gen = torch.Generator().manual_seed(0)
    w = int4_weight(128, 64, 64, gen)
    codes, scales = pack_codes(w.codes()), pack_scales(w.scales, w.mins)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with pytest.raises(ValueError, match="goes with act='rmsnorm'"):
        w4a16_mma(x, codes, scales, 64, act="rmsnorm")
    with pytest.raises(ValueError, match="goes with act='rmsnorm'"):
        w4a16_mma(x, codes, scales, 64, norm=(torch.ones(128, dtype=torch.bfloat16), EPS))
    if not torch.cuda.is_available():
        return
    codes, scales, x = codes.cuda(), scales.cuda(), x.cuda()
    weight = torch.ones(128, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="buffer of its own"):
        w4a16_mma(x, codes, scales, 64, act="rmsnorm", norm=(weight, EPS), residual=x.clone(), residual_out=x)
    with pytest.raises(ValueError, match="needs residual_out"):
        w4a16_mma(x, codes, scales, 64, act="rmsnorm", norm=(weight, EPS), residual=x.clone())
    with pytest.raises(ValueError, match="K"):
        w4a16_mma(x, codes, scales, 64, act="rmsnorm", norm=(weight[:64], EPS))


def _operands(m: int, k: int, gen: torch.Generator, residual: bool):
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    res = torch.randn(m, k, generator=gen).to(torch.bfloat16) if residual else None
    weight = (1 + 0.2 * torch.randn(k, generator=gen)).to(torch.bfloat16)
    return x, res, weight


@pytest.mark.parametrize("m,n,k,g,config,residual,int8", [
    (1, 128, 1024, 128, MmaConfig(1, 4, 4, 1, 0, 0, 1), True, False),   # xload: res and weight with x
    (1, 192, 1024, 128, MmaConfig(1, 8, 2, 1, 8), True, False),         # x staged, bulk copies (qkv at M = 1)
    (3, 192, 200, 32, MmaConfig(1, 2, 2, 2, 0, 0, 1), True, False),     # xload, K padded, split K
    (5, 128, 512, 64, MmaConfig(2, 2, 2, 1), False, False),             # staged, no residual
    (13, 192, 640, 64, MmaConfig(1, 4, 2, 2), True, False),             # two n8 tiles, split K
    (20, 128, 512, 64, MmaConfig(2, 2, 2, 2, 0, 8), True, False),       # three row tiles of 8, split K
    (7, 192, 640, 64, MmaConfig(2, 2, 2, 2, 4), True, False),           # bulk, split K (a shorter split)
    (2, 128, 1024, 1024, MmaConfig(1, 4, 4, 1, 0, 0, 1), True, True),   # 8-bit codes, per channel
])
def test_rmsnorm_is_made_as_x_is_read_on_gpu(m, n, k, g, config, residual, int8, int4_weight):
    if not torch.cuda.is_available():
        pytest.skip("a CUDA kernel: needs a GPU")
    if config.bulk and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("bulk copies need Hopper")
    from llmesh.kernels.rmsnorm import rmsnorm

    gen = torch.Generator().manual_seed(m * 100 + n + k + g)
    x, res, weight = _operands(m, k, gen, residual)
    if res is None:
        h, summed = rmsnorm_ref(x, weight, EPS), x
    else:
        h, summed = rmsnorm_ref(x, weight, EPS, res)
    codes, scales, group, reference = layout_and_reference(k, n, g, gen, int8, int4_weight)
    ref = reference(h)
    codes, scales, xd, wd = codes.cuda(), scales.cuda(), x.cuda(), weight.cuda()
    resd = None if res is None else res.cuda()
    res_out = None if res is None else torch.full_like(resd, float("nan"))
    for _ in range(2):  # the second call finds the split counters reset by the first
        got = w4a16_mma(xd, codes, scales, group, config=config, act="rmsnorm", norm=(wd, EPS), residual=resd,
                        residual_out=res_out)
        assert got.shape == (m, n)
        torch.testing.assert_close(got.cpu().float(), ref, rtol=1e-2, atol=2e-2)
    if res is not None:  # one block per row tile stored the sum: every element, bit for bit rmsnorm's
        torch.testing.assert_close(res_out.cpu(), summed, rtol=0, atol=0)
        h_triton, _ = rmsnorm(xd, wd, EPS, residual=resd)
    else:
        h_triton = rmsnorm(xd, wd, EPS)
    unfused = w4a16_mma(h_triton, codes, scales, group, config=config)
    torch.testing.assert_close(got, unfused, rtol=1e-2, atol=1e-2)
    out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w4a16_mma(xd, codes, scales, group, out=out, config=config, act="rmsnorm", norm=(wd, EPS), residual=resd,
                  residual_out=res_out)
    x2 = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    xd.copy_(x2)
    graph.replay()
    h2 = rmsnorm_ref(x2, weight, EPS) if res is None else rmsnorm_ref(x2, weight, EPS, res)[0]
    torch.testing.assert_close(out.cpu().float(), reference(h2), rtol=1e-2, atol=2e-2)


def test_norm_linear_takes_the_fused_kernel_where_the_table_picks_it(monkeypatch, int4_weight):
    """The Triton backend's norm_linear sends the un-normalised rows and the residual to the kernel
    where the table's "+rmsnorm" entry at these rows is "mma", and returns its stored sum as the
    new residual; elsewhere (an "unfused" entry, rows past the table, LLMESH_FUSED_DECODE=0)
    rmsnorm runs first. Both give the same rows."""
    if not torch.cuda.is_available():
        pytest.skip("the measured table dispatches on CUDA only")
    from llmesh.engine.model.config import ModelConfig
    from llmesh.engine.model.ops_triton import TritonOps
    from llmesh.engine.quant import linear as linear_mod
    from llmesh.kernels import quant_gemm_config
    from llmesh.kernels.common import cuda_device_tag
    from llmesh.kernels.rmsnorm import rmsnorm

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(7)
    w = int4_weight(256, 512, 128, gen).to(device)
    x, res, weight = (t.to(device) for t in _operands(3, 256, gen, True))
    fused_kind = "w4a16" + quant_gemm_config.RMSNORM
    table = {quant_gemm_config.table_key("w4a16", 512, 256, 4): ["mma", ["1,4,2,1,0,0,1"]],
             quant_gemm_config.table_key(fused_kind, 512, 256, 4): ["mma", ["1,4,2,1,0,0,1"]],
             quant_gemm_config.table_key(fused_kind, 512, 256, 16): ["unfused", []]}
    monkeypatch.setattr(quant_gemm_config, "load_tuned", lambda *a: {cuda_device_tag(device): table})
    monkeypatch.setenv(quant_gemm_config.FUSED_INPUTS_ENV, "silu_mul,rmsnorm")  # off by default (measured slower)
    calls = []
    real = linear_mod.norm_matmul
    monkeypatch.setattr("llmesh.engine.model.ops_triton.norm_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    cfg = ModelConfig("llama", vocab_size=32, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    ops = TritonOps(cfg, device=device, max_positions=64)
    y, summed = ops.norm_linear(x, res, weight, EPS, w)
    h, ref_sum = rmsnorm(x, weight, EPS, residual=res)
    unfused = linear_mod.linear(h, w)
    assert calls == [x.shape]
    torch.testing.assert_close(y, unfused, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(summed, ref_sum, rtol=0, atol=0)
    y0, same = ops.norm_linear(x, None, weight, EPS, w)  # no residual: x itself comes back
    assert same is x
    torch.testing.assert_close(y0, linear_mod.linear(rmsnorm(x, weight, EPS), w), rtol=1e-2, atol=1e-2)
    assert linear_mod.norm_matmul(torch.cat([x] * 3), res.repeat(3, 1), weight, EPS, w) is None  # M = 16: unfused
    assert linear_mod.norm_matmul(torch.cat([x] * 6), res.repeat(6, 1), weight, EPS, w) is None  # past the table
    monkeypatch.setattr(ops, "fused_decode", False)  # LLMESH_FUSED_DECODE=0: the two ops
    calls.clear()
    y2, summed2 = ops.norm_linear(x, res, weight, EPS, w)
    torch.testing.assert_close(y2, unfused, rtol=0, atol=0)
    assert calls == []


def test_the_environment_names_the_fused_inputs_the_table_may_pick(monkeypatch):
    """LLMESH_MMA_FUSED: unset, the SiLU fusion only (the norm's lost inside the engine's step);
    a list, those named; ``none``, neither (the engine's A/B of each fusion on one GPU)."""
    from llmesh.kernels.quant_gemm_config import FUSED_INPUTS_ENV, RMSNORM, SILU_MUL, fused_input_allowed

    monkeypatch.delenv(FUSED_INPUTS_ENV, raising=False)
    assert fused_input_allowed(SILU_MUL) and not fused_input_allowed(RMSNORM)
    monkeypatch.setenv(FUSED_INPUTS_ENV, "silu_mul")
    assert fused_input_allowed(SILU_MUL) and not fused_input_allowed(RMSNORM)
    monkeypatch.setenv(FUSED_INPUTS_ENV, " rmsnorm , silu_mul")
    assert fused_input_allowed(SILU_MUL) and fused_input_allowed(RMSNORM)
    monkeypatch.setenv(FUSED_INPUTS_ENV, "none")
    assert not fused_input_allowed(SILU_MUL) and not fused_input_allowed(RMSNORM)
