"""The skinny GEMV with a fused prologue (llmesh/kernels/fused_skinny.py) against its unfused
composition: silu_mul_linear equals silu_and_mul + skinny_gemm with the same config bit for
bit; rmsnorm_linear is within a bf16 ulp of rmsnorm + skinny_gemm and of the torch reference,
and its new residual is x + residual exactly; every config form (FMA rows, FMA tiles, tl.dot,
split-K), M from 1 to 16, ragged sizes, bias, float16; repeated calls are identical; bad
arguments are refused. The op tables: the torch table's norm_linear / act_linear are the plain
composition, the triton table falls back to the separate ops wherever the skinny table has no
entry (always on the CPU) or LLMESH_FUSED_DECODE=0. On CUDA: dispatch by the table, graph
capture and replay, Llama-3-8B shapes with the tuned configs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.model.config import ModelConfig  # noqa: E402
from llmesh.engine.model.ops_torch import TorchOps  # noqa: E402
from llmesh.engine.model.ops_triton import FUSED_DECODE_ENV, TritonOps, fused_config  # noqa: E402
from llmesh.kernels.activation import silu_and_mul  # noqa: E402
from llmesh.kernels.fused_skinny import (  # noqa: E402
    rmsnorm_linear, rmsnorm_linear_ref, silu_mul_linear, silu_mul_linear_ref)
from llmesh.kernels.rmsnorm import rmsnorm  # noqa: E402
from llmesh.kernels.skinny_gemm import skinny_gemm  # noqa: E402
from llmesh.kernels.skinny_gemm_config import FUSED_SLOWER, M_BUCKETS, TUNED, SkinnyConfig  # noqa: E402
from tests.kernels.cuda_graphs import capture  # noqa: E402

CUDA = torch.cuda.is_available()
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative to max |y|: an ulp or so of the output
EPS = 1e-5

CONFIGS = {
    "fma_row": SkinnyConfig(1, 16, 32, 1, 1, 1, False),
    "fma_row_split": SkinnyConfig(1, 8, 32, 3, 1, 1, False),
    "fma_tile": SkinnyConfig(4, 8, 32, 1, 1, 1, False),
    "dot_split": SkinnyConfig(16, 16, 32, 2, 1, 1, True),
}
SHAPES = [(1, 40, 100), (2, 33, 64), (5, 24, 72), (11, 17, 96), (16, 20, 48)]  # (M, N, K)


def _close(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = TOL[ref.dtype]
    got, ref = got.cpu().float(), ref.cpu().float()  # either may live on the GPU
    scale = ref.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got / scale, ref / scale, rtol=0, atol=tol)


def _norm_inputs(m, n, h, dtype, gen, device, bias=False):
    x = torch.randn(m, h, generator=gen).to(dtype).to(device)
    r = torch.randn(m, h, generator=gen).to(dtype).to(device)
    g = (1 + 0.2 * torch.randn(h, generator=gen)).to(dtype).to(device)
    w = (0.3 * torch.randn(n, h, generator=gen)).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, r, g, w, b


def _act_inputs(m, n, inter, dtype, gen, device):
    gu = (2 * torch.randn(m, 2 * inter, generator=gen)).to(dtype).to(device)
    w = (0.3 * torch.randn(n, inter, generator=gen)).to(dtype).to(device)
    return gu, w


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_silu_mul_linear_is_the_composition_bit_for_bit(device, name, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    gu, w = _act_inputs(m, n, k, torch.bfloat16, gen, device)
    cfg = CONFIGS[name]
    got = silu_mul_linear(gu, w, config=cfg)
    assert torch.equal(got, skinny_gemm(silu_and_mul(gu), w, config=cfg))
    _close(got, silu_mul_linear_ref(gu.cpu(), w.cpu()))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_rmsnorm_linear_matches_the_composition(device, name, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k + 1)
    x, r, g, w, b = _norm_inputs(m, n, k, torch.bfloat16, gen, device, bias=m % 2 == 1)
    cfg = CONFIGS[name]
    y, new_res = rmsnorm_linear(x, r, g, EPS, w, b, config=cfg)
    h, ref_res = rmsnorm(x, g, EPS, residual=r)
    assert torch.equal(new_res, ref_res)  # one writer per row, the same rounded sum
    _close(y, skinny_gemm(h, w, b, config=cfg))
    ref_y, ref_res_torch = rmsnorm_linear_ref(x.cpu(), r.cpu(), g.cpu(), EPS, w.cpu(), None if b is None else b.cpu())
    assert torch.equal(new_res.cpu(), ref_res_torch)
    _close(y, ref_y)


@pytest.mark.parametrize("name", ["fma_row", "dot_split"])
def test_rmsnorm_linear_without_residual(device, name):
    gen = torch.Generator().manual_seed(3)
    x, _, g, w, _ = _norm_inputs(3, 40, 72, torch.bfloat16, gen, device)
    y, res = rmsnorm_linear(x, None, g, EPS, w, config=CONFIGS[name])
    assert res is x  # as ops.rmsnorm without a residual: the input is the next residual
    _close(y, skinny_gemm(rmsnorm(x, g, EPS), w, config=CONFIGS[name]))


def test_rmsnorm_linear_row_longer_than_a_sum_chunk(device):
    """H past one sum-of-squares chunk (4096 / BLOCK_M = 256 columns at BLOCK_M 16) and not a
    multiple of it: the chunked sum and its masked tail."""
    gen = torch.Generator().manual_seed(4)
    x, r, g, w, _ = _norm_inputs(9, 24, 600, torch.bfloat16, gen, device)
    y, new_res = rmsnorm_linear(x, r, g, EPS, w, config=SkinnyConfig(16, 16, 64, 3, 1, 1, True))
    ref_y, ref_res = rmsnorm_linear_ref(x.cpu(), r.cpu(), g.cpu(), EPS, w.cpu())
    assert torch.equal(new_res.cpu(), ref_res)
    _close(y, ref_y)


@pytest.mark.parametrize("name", ["fma_row", "fma_tile", "dot_split"])
def test_float16(device, name):
    gen = torch.Generator().manual_seed(6)
    x, r, g, w, b = _norm_inputs(4, 40, 80, torch.float16, gen, device, bias=True)
    y, _ = rmsnorm_linear(x, r, g, EPS, w, b, config=CONFIGS[name])
    _close(y, rmsnorm_linear_ref(x.cpu(), r.cpu(), g.cpu(), EPS, w.cpu(), b.cpu())[0])
    gu, wd = _act_inputs(4, 40, 48, torch.float16, gen, device)
    assert torch.equal(silu_mul_linear(gu, wd, config=CONFIGS[name]),
                       skinny_gemm(silu_and_mul(gu), wd, config=CONFIGS[name]))


@pytest.mark.parametrize("name", ["fma_row_split", "dot_split"])
def test_deterministic(device, name):
    gen = torch.Generator().manual_seed(8)
    x, r, g, w, b = _norm_inputs(5, 40, 200, torch.bfloat16, gen, device, bias=True)
    gu, wd = _act_inputs(5, 40, 200, torch.bfloat16, gen, device)
    cfg = CONFIGS[name]
    y0, res0 = rmsnorm_linear(x, r, g, EPS, w, b, config=cfg)
    a0 = silu_mul_linear(gu, wd, config=cfg)
    for _ in range(2):
        y, res = rmsnorm_linear(x, r, g, EPS, w, b, config=cfg)
        assert torch.equal(y, y0) and torch.equal(res, res0)
        assert torch.equal(silu_mul_linear(gu, wd, config=cfg), a0)


def test_default_config(device):
    gen = torch.Generator().manual_seed(10)
    x, r, g, w, _ = _norm_inputs(1, 48, 160, torch.bfloat16, gen, device)
    _close(rmsnorm_linear(x, r, g, EPS, w)[0], rmsnorm_linear_ref(x.cpu(), r.cpu(), g.cpu(), EPS, w.cpu())[0])
    gu, wd = _act_inputs(6, 48, 80, torch.bfloat16, gen, device)
    _close(silu_mul_linear(gu, wd), silu_mul_linear_ref(gu.cpu(), wd.cpu()))


def test_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(12)
    x, r, g, w, _ = _norm_inputs(2, 32, 64, torch.bfloat16, gen, device)
    with pytest.raises(ValueError, match="weight has K=32, expected 64"):
        rmsnorm_linear(x, r, g, EPS, w[:, :32].contiguous())
    with pytest.raises(ValueError, match="norm_weight has H=32, expected 64"):
        rmsnorm_linear(x, r, g[:32], EPS, w)
    with pytest.raises(ValueError, match="residual \\(1, 64\\) must have x's shape"):
        rmsnorm_linear(x, r[:1], g, EPS, w)
    with pytest.raises(ValueError, match="norm_weight must have dtype in \\(bfloat16\\)"):
        rmsnorm_linear(x, r, g.float(), EPS, w)
    with pytest.raises(ValueError, match="x must have dtype in \\(float16, bfloat16\\)"):
        rmsnorm_linear(x.float(), r.float(), g.float(), EPS, w.float())
    with pytest.raises(ValueError, match="gate_up's last dimension must be even"):
        silu_mul_linear(x[:, :63], w)
    with pytest.raises(ValueError, match="weight has K=64, expected 32"):
        silu_mul_linear(x, w)
    with pytest.raises(ValueError, match="tl.dot tiles need"):
        silu_mul_linear(x, w[:, :32].contiguous(), config=SkinnyConfig(1, 16, 32, 1, 1, 1, True))


def _model_config(h=64, inter=48) -> ModelConfig:
    return ModelConfig("llama", vocab_size=32, hidden_size=h, intermediate_size=inter, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def test_op_tables_compose_and_fall_back(device, monkeypatch):
    """The torch table's fused ops are the plain composition bit for bit; the triton table
    falls back to its own separate ops wherever the skinny table has no entry (on the CPU:
    everywhere), with the switch on or off."""
    gen = torch.Generator().manual_seed(14)
    x, r, g, w, b = _norm_inputs(3, 40, 64, torch.bfloat16, gen, device, bias=True)
    gu, wd = _act_inputs(3, 64, 48, torch.bfloat16, gen, device)
    cfg = _model_config()
    tops = TorchOps(cfg, device=x.device, dtype=x.dtype, max_positions=64)
    h, res = tops.rmsnorm(x, g, EPS, r)
    y, res2 = tops.norm_linear(x, r, g, EPS, w, b)
    assert torch.equal(y, tops.linear(h, w, b)) and torch.equal(res2, res)
    assert torch.equal(tops.act_linear(gu, wd), tops.linear(tops.silu_and_mul(gu), wd))
    for switch in ("1", "0"):
        monkeypatch.setenv(FUSED_DECODE_ENV, switch)
        ops = TritonOps(cfg, device=x.device, max_positions=64)
        assert ops.fused_decode == (switch == "1")
        if not CUDA:
            assert fused_config(x, w, 64) is None  # no table off CUDA: never fused
        h, res = ops.rmsnorm(x, g, EPS, r)
        y, res2 = ops.norm_linear(x, r, g, EPS, w, b)
        if switch == "0" or fused_config(x, w, 64) is None:
            assert torch.equal(y, ops.linear(h, w, b)) and torch.equal(res2, res)
        assert torch.equal(ops.act_linear(gu, wd), ops.linear(ops.silu_and_mul(gu), wd))


def test_fused_slower_table_is_valid():
    for tag, shapes in FUSED_SLOWER.items():
        assert isinstance(shapes, set), tag
        for n, k, bucket in shapes:
            assert n > 0 and k > 0 and bucket in M_BUCKETS, (tag, n, k, bucket)


def _gpu_table(monkeypatch, entries):
    from llmesh.bench_results import device_tag

    monkeypatch.setitem(TUNED, device_tag(torch.device("cuda", torch.cuda.current_device())), entries)


@pytest.mark.skipif(not CUDA, reason="the fused ops dispatch only on CUDA, by the measured table")
def test_triton_table_dispatches_by_skinny_table(monkeypatch):
    gen = torch.Generator().manual_seed(16)
    x, r, g, w, b = _norm_inputs(3, 512, 1024, torch.bfloat16, gen, "cuda", bias=True)
    gu, wd = _act_inputs(3, 1024, 512, torch.bfloat16, gen, "cuda")
    cfg = SkinnyConfig(1, 16, 128, 2, 4, 2, False)
    fields = tuple(cfg.__dict__.values())
    _gpu_table(monkeypatch, {(512, 1024, 4): fields, (1024, 512, 4): fields})
    monkeypatch.setenv(FUSED_DECODE_ENV, "1")
    ops = TritonOps(_model_config(), device=x.device, max_positions=64)
    assert fused_config(x, w, 1024) == cfg and fused_config(gu, wd, 512) == cfg
    y, res = ops.norm_linear(x, r, g, EPS, w, b)
    fused_y, fused_res = rmsnorm_linear(x, r, g, EPS, w, b, config=cfg)
    assert torch.equal(y, fused_y) and torch.equal(res, fused_res)
    assert torch.equal(ops.act_linear(gu, wd), silu_mul_linear(gu, wd, config=cfg))
    assert torch.equal(ops.act_linear(gu, wd), skinny_gemm(silu_and_mul(gu), wd, config=cfg))
    assert fused_config(x.float(), w.float(), 1024) is None  # float32: separate ops
    from llmesh.bench_results import device_tag

    monkeypatch.setitem(FUSED_SLOWER, device_tag(x.device), {(512, 1024, 4)})
    assert fused_config(x, w, 1024) is None and fused_config(gu, wd, 512) == cfg  # measured slower: not fused
    assert fused_config(torch.cat([x] * 6), w, 1024) is None  # 18 rows: past the skinny table


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("cfg", [(1, 8, 512, 1, 4, 1, False), (1, 16, 256, 4, 4, 3, False),
                                 (16, 32, 128, 3, 4, 4, True)])
def test_cuda_graph_capture_and_replay(cfg):
    cfg = SkinnyConfig(*cfg)
    gen = torch.Generator().manual_seed(18)
    x, r, g, w, b = _norm_inputs(2, 1000, 4096, torch.bfloat16, gen, "cuda", bias=True)
    gu, wd = _act_inputs(2, 1000, 2048, torch.bfloat16, gen, "cuda")

    def step():
        return (*rmsnorm_linear(x, r, g, EPS, w, b, config=cfg), silu_mul_linear(gu, wd, config=cfg))

    graph, outs = capture(step)
    for seed in (1, 2):
        sgen = torch.Generator().manual_seed(seed)
        for t in (x, r, gu):
            t.copy_(torch.randn(t.shape, generator=sgen).to(t))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step()):
            assert torch.equal(got, want)


@pytest.mark.skipif(not CUDA, reason="Llama-sized shapes only on a GPU")
@pytest.mark.parametrize("m", [1, 4, 16])
def test_llama_shapes_cuda(m):
    """Llama-3-8B's qkv, gate_up and down with the H200 table's configs and a tl.dot config."""
    gen = torch.Generator().manual_seed(m)
    for n, k, fields in (((6144, 4096, (1, 8, 512, 1, 4, 1, False))), (28672, 4096, (1, 4, 1024, 1, 4, 1, False)),
                         (4096, 14336, (1, 8, 1024, 1, 4, 1, False))):
        for cfg in (SkinnyConfig(*fields), SkinnyConfig(16, 32, 128, 3, 4, 4, True)):
            if cfg.block_m == 1 and m > 8:
                continue
            if k == 4096:
                x, r, g, w, _ = _norm_inputs(m, n, k, torch.bfloat16, gen, "cuda")
                y, res = rmsnorm_linear(x, r, g, EPS, w, config=cfg)
                ref_y, ref_res = rmsnorm_linear_ref(x, r, g, EPS, w)
                assert torch.equal(res, ref_res)
                _close(y, ref_y)
            else:
                gu, w = _act_inputs(m, n, k, torch.bfloat16, gen, "cuda")
                y = silu_mul_linear(gu, w, config=cfg)
                assert torch.equal(y, skinny_gemm(silu_and_mul(gu), w, config=cfg))
                _close(y, silu_mul_linear_ref(gu, w))
