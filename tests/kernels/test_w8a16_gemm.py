"""The Triton W8A16 GEMM matches its torch reference on Int8Weight's layout, per-channel
(scale applied to the accumulator) and grouped (GGUF Q8_0), with and without split-K, and
rejects malformed arguments."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.quant.packed import GGUF_GROUP, Int8Weight  # noqa: E402
from llmesh.kernels.common import arrival_counters  # noqa: E402
from llmesh.kernels.quant_gemm_config import GemmConfig, pick_config  # noqa: E402
from llmesh.kernels.w8a16_gemm import dequantize_int8_ref, w8a16_gemm, w8a16_gemm_ref  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 3e-3}  # 16-bit: an ulp or so at |y| ~ 1
CUDA = torch.cuda.is_available()


def _weight(k, n, g, gen, scale_dtype=torch.float32):
    q = torch.randint(-127, 128, (k, n), generator=gen).to(torch.int8)
    scales = (torch.rand(k // g, n, generator=gen) * 0.002 + 0.0005).to(scale_dtype)
    return Int8Weight(q, scales, g, format="int8" if g == k else "q8_0")


def _run(w, x, device, **kw):
    return w8a16_gemm(x.to(device), w.qweight.to(device), w.scales.to(device), w.group_size, **kw)


def _ref(w, x):
    return w8a16_gemm_ref(x, w.qweight, w.scales, w.group_size)


def _close(got, ref, dtype):
    assert got.dtype == ref.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), ref.cpu().float(), rtol=TOL[dtype], atol=TOL[dtype])


CASES = [  # (M, N, K, G, scale dtype); G == K is per-channel; K = 80 is not a multiple of BLOCK_K
    (1, 32, 64, 64, torch.float32),
    (3, 80, 80, 80, torch.float16),
    (17, 80, 256, 256, torch.float32),
    (3, 80, 96, 32, torch.float16),
    (17, 32, 256, 64, torch.float32),
    (1, 80, 256, 128, torch.float16),
    (3, 32, 96, 48, torch.float32),  # a group size that is not a power of two (BLOCK_K = 16)
]


@pytest.mark.parametrize("m,n,k,g,scale_dtype", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_reference(device, m, n, k, g, scale_dtype, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n * 10 + k + g)
    w = _weight(k, n, g, gen, scale_dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    _close(_run(w, x, device), _ref(w, x), dtype)


@pytest.mark.parametrize("m,n,k,g,scale_dtype", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_tiles_dequantize_first(device, m, n, k, g, scale_dtype, dtype):
    """block_m > 32 dequantizes grouped W in registers before the dot (the decode tiles factor
    the scales out of it); both paths match the reference."""
    gen = torch.Generator().manual_seed(m * 7 + n + k + g)
    w = _weight(k, n, g, gen, scale_dtype)
    x = torch.randn(m, k, generator=gen).to(dtype)
    cfg = GemmConfig(64, 32, 32 if g == k else min(32, g & -g), 1, 4, 1)
    _close(_run(w, x, device, config=cfg), _ref(w, x), dtype)


@pytest.mark.parametrize("g", [256, 32])
def test_float16_and_out(device, g):
    gen = torch.Generator().manual_seed(g)
    w = _weight(256, 80, g, gen)
    x = torch.randn(3, 256, generator=gen).half()
    out = torch.full((3, 80), float("nan"), dtype=torch.float16, device=device)
    got = _run(w, x, device, out=out)
    assert got is out
    _close(got, _ref(w, x), torch.float16)


def test_reference_is_the_layout():
    gen = torch.Generator().manual_seed(1)
    for g in (32, 96):
        w = _weight(96, 32, g, gen, torch.float16)
        assert torch.equal(dequantize_int8_ref(w.qweight, w.scales, g), w.dequantize())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_channel_reference_vs_torch_backend(dtype):
    """Per-channel, the reference (like the kernel) scales the accumulator: within an ulp of the
    exact product, and within W's rounding of the torch backend's x @ W.to(x.dtype)."""
    gen = torch.Generator().manual_seed(4)
    w = _weight(512, 64, 512, gen)
    x = torch.randn(9, 512, generator=gen).to(dtype)
    ref = _ref(w, x)
    _close(ref, (x.float() @ w.dequantize()).to(dtype), dtype)
    backend = x @ w.dequantize().to(dtype)
    scale = ref.float().abs().max()
    torch.testing.assert_close(ref.float() / scale, backend.float() / scale, rtol=0, atol=2 * TOL[dtype])


@pytest.mark.parametrize("g", [256, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_k_matches_single_pass(device, g, dtype):
    gen = torch.Generator().manual_seed(2 + g)
    w = _weight(256, 80, g, gen)
    x = torch.randn(3, 256, generator=gen).to(dtype)
    one = _run(w, x, device, config=GemmConfig(16, 32, 32, 1, 1, 1))
    split = _run(w, x, device, config=GemmConfig(16, 32, 32, 3, 1, 1))
    again = _run(w, x, device, config=GemmConfig(16, 32, 32, 3, 1, 1))
    _close(split, one, dtype)
    assert torch.equal(split, again)  # partials summed in split order: a split-K result is reproducible
    assert not arrival_counters("w8a16_gemm", torch.device(device), 1 << 10).any()  # each tile's last split reset its own
    _close(split, _ref(w, x), dtype)
    _close(_run(w, x, device, config=GemmConfig(16, 32, 16, 64, 1, 1)), one, dtype)  # more splits than tiles


def test_per_channel_ragged_k_never_reads_past_k(device):
    gen = torch.Generator().manual_seed(7)
    w = _weight(72, 32, 72, gen)  # per-channel, K = 72: the last tile of 32 is partial
    x = torch.randn(5, 72, generator=gen)
    wide = torch.full((5, 100), float("nan"))
    wide[:, :72] = x
    got = _run(w, wide[:, :72], device, config=GemmConfig(16, 32, 32, 2, 1, 1))
    _close(got, _ref(w, x), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gguf_q8_0_group_32(device, dtype):
    gen = torch.Generator().manual_seed(32)
    w = _weight(256, 80, GGUF_GROUP, gen, torch.float16)
    x = torch.randn(17, 256, generator=gen).to(dtype)
    ref = (x.float() @ w.dequantize().to(dtype).float()).to(dtype)
    _close(_run(w, x, device), ref, dtype)
    _close(_run(w, x, device, config=GemmConfig(16, 32, 32, 2, 1, 1)), ref, dtype)


def test_empty_batch(device):
    w = _weight(64, 32, 64, torch.Generator().manual_seed(0))
    assert _run(w, torch.empty(0, 64), device).shape == (0, 32)


def test_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(3)
    w = _weight(256, 32, 32, gen)
    q, s = w.qweight.to(device), w.scales.to(device)
    x = torch.randn(2, 256, device=device)
    with pytest.raises(ValueError, match="qweight has rows=256, expected 128"):
        w8a16_gemm(torch.randn(2, 128, device=device), q, s, 32)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of K=256"):
        w8a16_gemm(x, q, s, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        w8a16_gemm(x, q, torch.ones(32, 32, device=device), 8)
    with pytest.raises(ValueError, match="scales has rows=8, expected 1"):
        w8a16_gemm(x, q, s, 256)
    with pytest.raises(ValueError, match="scales has N=16"):
        w8a16_gemm(x, q, s[:, :16], 32)
    with pytest.raises(ValueError, match="qweight must have dtype in \\(int8\\)"):
        w8a16_gemm(x, q.to(torch.uint8), s, 32)
    with pytest.raises(ValueError, match="scales must have dtype in \\(float16, float32\\)"):
        w8a16_gemm(x, q, s.bfloat16(), 32)
    with pytest.raises(ValueError, match="x must be contiguous"):
        w8a16_gemm(torch.randn(256, 2, device=device).t(), q, s, 32)
    with pytest.raises(ValueError, match="config.block_k=64 must divide group_size=32"):
        w8a16_gemm(x, q, s, 32, config=GemmConfig(16, 32, 64, 1, 1, 1))
    with pytest.raises(ValueError, match="config.split_k must be an int >= 1"):
        w8a16_gemm(x, q, s, 32, config=GemmConfig(16, 32, 32, 0, 1, 1))
    with pytest.raises(ValueError, match="kind must be one of"):
        pick_config("w3a16", 1, 32, 256, 32)


def test_pick_config_per_channel_ignores_groups(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pick_config("w8a16", 1, 4096, 4096, 4096).block_k == 64  # per-channel: no group cap
    assert pick_config("w8a16", 1, 4096, 4096, 32).block_k == 32


@pytest.mark.skipif(not CUDA, reason="Llama-sized shapes only on a GPU")
@pytest.mark.parametrize("m", [1, 16, 100])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_llama_shapes_cuda(m, n, k, per_channel):
    gen = torch.Generator().manual_seed(m)
    w = _weight(k, n, k if per_channel else GGUF_GROUP, gen, torch.float16).to("cuda")
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    got = w8a16_gemm(x, w.qweight, w.scales, w.group_size)
    ref = _ref(w, x)
    scale = ref.float().abs().max()
    torch.testing.assert_close(got.float() / scale, ref.float() / scale, rtol=0, atol=1e-2)
