"""The skinny dense GEMM matches F.linear with float32 accumulation for every inner-product
form (FMA rows, 3-D FMA tiles, tl.dot tiles), with and without split-K and bias, on ragged
shapes; split-K is reproducible bit for bit; strided rows work, bad arguments are refused;
on CUDA the call is captured in a graph and replayed; the tuned table holds only valid
configs, and dense linear() on the CPU is exactly F.linear, the kernel never loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.skinny_gemm import skinny_gemm, skinny_gemm_ref  # noqa: E402
from llmesh.kernels.skinny_gemm_config import (  # noqa: E402
    M_BUCKETS, TUNED, SkinnyConfig, check_config, default_config, m_bucket, split_plan, tuned_config)
from tests.kernels.cuda_graphs import capture  # noqa: E402

CUDA = torch.cuda.is_available()
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative to max |y|: an ulp or so of the output

CONFIGS = {
    "fma_row": SkinnyConfig(1, 16, 32, 1, 1, 1, False),
    "fma_row_split": SkinnyConfig(1, 8, 32, 3, 1, 1, False),
    "fma_tile": SkinnyConfig(2, 8, 32, 1, 1, 1, False),
    "fma_tile_split": SkinnyConfig(4, 4, 16, 2, 1, 1, False),
    "dot": SkinnyConfig(16, 16, 32, 1, 1, 1, True),
    "dot_split": SkinnyConfig(16, 32, 16, 4, 1, 1, True),
}
SHAPES = [  # (M, N, K): N and K that are not multiples of the tiles, M across the buckets and past them
    (1, 40, 100),
    (2, 33, 64),
    (3, 16, 96),
    (5, 48, 72),
    (16, 24, 128),
    (17, 20, 48),
]


def _inputs(m, n, k, dtype, gen, bias_dtype=None):
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) * 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(bias_dtype) if bias_dtype is not None else None
    return x, w, b


def _close(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    tol = TOL[ref.dtype]
    got, ref = got.cpu().float(), ref.cpu().float()  # either may live on the GPU
    scale = ref.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got / scale, ref / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_matches_reference(device, name, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x, w, b = _inputs(m, n, k, torch.bfloat16, gen, torch.float32 if m % 2 else None)
    got = skinny_gemm(x.to(device), w.to(device), None if b is None else b.to(device), config=CONFIGS[name])
    _close(got, skinny_gemm_ref(x, w, b))


@pytest.mark.parametrize("name", ["fma_row", "fma_tile_split", "dot_split"])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16])
def test_float16(device, name, bias_dtype):
    gen = torch.Generator().manual_seed(5)
    x, w, b = _inputs(3, 40, 80, torch.float16, gen, bias_dtype)
    got = skinny_gemm(x.to(device), w.to(device), None if b is None else b.to(device), config=CONFIGS[name])
    _close(got, skinny_gemm_ref(x, w, b))


@pytest.mark.parametrize("m", [1, 4, 16])
def test_default_config(device, m):
    gen = torch.Generator().manual_seed(m)
    x, w, b = _inputs(m, 48, 160, torch.bfloat16, gen, torch.bfloat16)
    _close(skinny_gemm(x.to(device), w.to(device), b.to(device)), skinny_gemm_ref(x, w, b))


def test_reference_is_f_linear_in_fp32():
    gen = torch.Generator().manual_seed(9)
    x, w, b = _inputs(4, 24, 64, torch.bfloat16, gen, torch.float32)
    assert torch.equal(skinny_gemm_ref(x, w, b), F.linear(x.float(), w.float(), b).bfloat16())


@pytest.mark.parametrize("name", ["fma_row_split", "dot_split"])
def test_split_k_is_reproducible(device, name):
    gen = torch.Generator().manual_seed(11)
    x, w, b = _inputs(3, 40, 200, torch.bfloat16, gen, torch.float32)
    x, w, b = x.to(device), w.to(device), b.to(device)
    cfg = CONFIGS[name]
    one = skinny_gemm(x, w, b, config=SkinnyConfig(cfg.block_m, cfg.block_n, cfg.block_k, 1, 1, 1, cfg.dot))
    first = skinny_gemm(x, w, b, config=cfg)
    for _ in range(3):
        assert torch.equal(skinny_gemm(x, w, b, config=cfg), first)  # split-order sum; counters reset each launch
    _close(first, one)
    many = SkinnyConfig(cfg.block_m, cfg.block_n, cfg.block_k, 1000, 1, 1, cfg.dot)  # more splits than K tiles
    _close(skinny_gemm(x, w, b, config=many), one)


def test_split_plan_never_leaves_a_split_empty():
    for k in (1, 15, 16, 100, 4096, 14336):
        for block_k in (16, 64, 256):
            for want in (1, 2, 3, 7, 64, 10_000):
                splits, per = split_plan(k, block_k, want)
                assert per % block_k == 0 and splits <= max(1, want)
                assert (splits - 1) * per < k <= splits * per or (k <= per and splits == 1)


def test_strided_rows_and_out(device):
    """x as a column slice of a wider buffer (row stride > K) and out as a slice: handled. The
    columns past K are NaN, so a read past K shows."""
    gen = torch.Generator().manual_seed(3)
    x, w, b = _inputs(5, 40, 72, torch.bfloat16, gen, torch.float32)
    wide = torch.full((5, 100), float("nan"), dtype=torch.bfloat16)
    wide[:, :72] = x
    wide_out = torch.full((5, 64), float("nan"), dtype=torch.bfloat16, device=device)
    for cfg in (CONFIGS["fma_tile"], CONFIGS["dot_split"], CONFIGS["fma_row"]):
        got = skinny_gemm(wide.to(device)[:, :72], w.to(device), b.to(device), out=wide_out[:, 8:48], config=cfg)
        assert got.data_ptr() == wide_out[:, 8:48].data_ptr()
        _close(got, skinny_gemm_ref(x, w, b))
    assert torch.isnan(wide_out[:, :8].float()).all() and torch.isnan(wide_out[:, 48:].float()).all()


def test_empty_and_zero_k(device):
    w = torch.randn(24, 32, dtype=torch.bfloat16, device=device)
    assert skinny_gemm(torch.empty(0, 32, dtype=torch.bfloat16, device=device), w).shape == (0, 24)
    b = torch.randn(24, device=device)
    y = skinny_gemm(torch.empty(3, 0, dtype=torch.bfloat16, device=device),
                    torch.empty(24, 0, dtype=torch.bfloat16, device=device), b)
    assert torch.equal(y, b.bfloat16().expand(3, 24))


def test_rejects_bad_inputs(device):
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=device)
    w = torch.randn(32, 64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="weight has K=32, expected 64"):
        skinny_gemm(x, w[:, :32].contiguous())
    with pytest.raises(ValueError, match="x must have dtype in \\(float16, bfloat16\\)"):
        skinny_gemm(x.float(), w.float())
    with pytest.raises(ValueError, match="weight must have dtype in \\(float16\\)"):
        skinny_gemm(x.half(), w)
    with pytest.raises(ValueError, match="x must be contiguous in its last dimension"):
        skinny_gemm(torch.randn(64, 2, dtype=torch.bfloat16, device=device).t(), w)
    with pytest.raises(ValueError, match="weight must be contiguous in its last dimension"):
        skinny_gemm(x, torch.randn(64, 32, dtype=torch.bfloat16, device=device).t())
    with pytest.raises(ValueError, match="bias has N=16, expected 32"):
        skinny_gemm(x, w, torch.randn(16, device=device))
    with pytest.raises(ValueError, match="out must have shape \\(2, 32\\)"):
        skinny_gemm(x, w, out=torch.empty(2, 16, dtype=torch.bfloat16, device=device))
    with pytest.raises(ValueError, match="tl.dot tiles need"):
        skinny_gemm(x, w, config=SkinnyConfig(1, 16, 32, 1, 1, 1, True))
    with pytest.raises(ValueError, match="config.block_n must be a power of two"):
        skinny_gemm(x, w, config=SkinnyConfig(1, 24, 32, 1, 1, 1, False))
    with pytest.raises(ValueError, match="config.split_k must be an int >= 1"):
        skinny_gemm(x, w, config=SkinnyConfig(1, 16, 32, 0, 1, 1, False))


def test_tuned_table_holds_valid_configs():
    for tag, table in TUNED.items():
        for (n, k, bucket), fields in table.items():
            assert bucket in M_BUCKETS and n > 0 and k > 0, (tag, n, k, bucket)
            check_config(SkinnyConfig(*fields))


def test_buckets_and_no_table_on_cpu():
    assert [m_bucket(m) for m in (1, 2, 3, 5, 8, 9, 16, 17)] == [1, 2, 4, 8, 8, 16, 16, None]
    assert tuned_config(torch.device("cpu"), 1, 4096, 4096) is None
    assert default_config(1, 4096, 4096).block_m == 1


def test_dense_linear_on_cpu_is_f_linear_without_triton():
    """The torch backend on the CPU: dense linear() is F.linear bit for bit and never loads
    the skinny kernel's module (which imports Triton)."""
    code = (
        "import sys, torch, torch.nn.functional as F\n"
        "from llmesh.engine.quant.linear import linear\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(2, 3, 64, generator=g).bfloat16(); w = torch.randn(48, 64, generator=g).bfloat16()\n"
        "b = torch.randn(48, generator=g).bfloat16()\n"
        "for kernels in (True, False):\n"
        "    assert torch.equal(linear(x, w, b, kernels=kernels), F.linear(x, w, b))\n"
        "assert 'llmesh.kernels.skinny_gemm' not in sys.modules\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", ["fma_row", "fma_row_split", "dot_split"])
def test_cuda_graph_capture_and_replay(name):
    gen = torch.Generator().manual_seed(21)
    x, w, b = _inputs(3, 1000, 4096, torch.bfloat16, gen, torch.bfloat16)
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    cfg = SkinnyConfig(*{"fma_row": (1, 16, 256, 1, 4, 3, False), "fma_row_split": (1, 16, 256, 4, 4, 3, False),
                         "dot_split": (16, 32, 128, 4, 4, 4, True)}[name])
    graph, y = capture(lambda: skinny_gemm(x, w, b, config=cfg))
    for seed in (1, 2):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, skinny_gemm(x, w, b, config=cfg))
        _close(y, skinny_gemm_ref(x.cpu(), w.cpu(), b.cpu()))


@pytest.mark.skipif(not CUDA, reason="Llama-sized shapes only on a GPU")
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])
def test_llama_shapes_cuda(m, n, k):
    gen = torch.Generator().manual_seed(m)
    x, w, _ = _inputs(m, n, k, torch.bfloat16, gen)
    x, w = x.cuda(), w.cuda()
    ref = skinny_gemm_ref(x, w)
    for cfg in (default_config(m, n, k), SkinnyConfig(16, 32, 128, 4, 4, 4, True),
                SkinnyConfig(1, 8, 512, 2, 4, 2, False)):
        _close(skinny_gemm(x, w, config=cfg), ref)


@pytest.mark.skipif(not CUDA, reason="dispatch to the kernel happens only on CUDA")
def test_linear_dispatches_by_table(monkeypatch):
    """A TUNED entry for this device and shape sends dense linear() to the kernel with that
    config; without one it is F.linear."""
    from llmesh.bench_results import device_tag
    from llmesh.engine.quant.linear import linear

    gen = torch.Generator().manual_seed(4)
    x, w, b = _inputs(3, 512, 1024, torch.bfloat16, gen, torch.bfloat16)
    x, w, b = x.cuda().view(1, 3, 1024), w.cuda(), b.cuda()
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    cfg = SkinnyConfig(1, 16, 128, 2, 4, 2, False)
    monkeypatch.setitem(TUNED, device_tag(x.device), {(512, 1024, 4): tuple(cfg.__dict__.values())})
    got = linear(x, w, b)
    assert got.shape == (1, 3, 512)
    assert torch.equal(got.view(3, 512), skinny_gemm(x.view(3, 1024), w, b, config=cfg))
    xf, wf, bf = x.float(), w.float(), b.float()  # float32: no entry applies, cuBLAS as before
    assert torch.equal(linear(xf, wf, bf), F.linear(xf, wf, bf))
