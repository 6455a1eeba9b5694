"""FP8 (E4M3) W8A8: per-token activation quantization and the scaled FP8 GEMM match their torch
references; the references are within FP8 error of float32 arithmetic.

On the CPU the kernels run under Triton's interpreter on small shapes (its float32 -> E4M3
cast is fixed up inside the kernel, see llmesh/kernels/fp8_gemm.py); the large shapes run only on a
GPU that has FP8 (compute capability >= 8.9).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.fp8_gemm import (  # noqa: E402
    FP8_MAX, Fp8GemmConfig, default_config, fp8_gemm, fp8_gemm_ref, fp8_support, quantize_fp8_per_token,
    quantize_fp8_per_token_ref, quantize_fp8_weight)

FP8 = torch.float8_e4m3fn
HAS_FP8_GPU = torch.cuda.is_available() and fp8_support(torch.device("cuda")) is None
needs_fp8_gpu = pytest.mark.skipif(
    not HAS_FP8_GPU, reason="large shapes and CUDA graphs need a CUDA GPU with FP8 (compute capability >= 8.9); "
    "the interpreter would take minutes")



# One output rounding apart, plus float32 summation order (and, on Hopper, the tensor cores'
# FP8 accumulator between promotions) relative to the output's largest value.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _grid_row() -> torch.Tensor:
    """Every non-negative finite E4M3 value, the midpoints between neighbours (ties) and values
    just either side of them, and 448 so the row's scale is exactly 1: exercises rounding."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(FP8).float()
    mids = (vals[:-1] + vals[1:]) / 2
    return torch.cat([vals, mids, -mids, mids * 1.0001, -mids * 0.9999, torch.tensor([FP8_MAX])])


def _dequant_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an E4M3 step: 2^-4 relative for normal values, 2^-10 * scale in the subnormal range."""
    return x.abs() * 2.0 ** -4 + scale * 2.0 ** -10 + 1e-30


def _assert_gemm_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    dtype = ref.dtype
    got, ref = got.cpu().float(), ref.float()
    atol = 1e-3 * ref.abs().max().item() + 1e-6
    torch.testing.assert_close(got, ref, rtol=RTOL[dtype], atol=atol)


def test_fp8_support_names_what_is_missing():
    msg = fp8_support(torch.device("cpu"))
    assert msg is not None and "compute capability 8.9" in msg and "CPU" in msg
    if HAS_FP8_GPU:
        assert fp8_support(torch.device("cuda")) is None


def test_unsupported_device_fails_with_the_message(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="compute capability 8.9.*CPU"):
        quantize_fp8_per_token(x)
    qweight, scales = quantize_fp8_weight(torch.randn(16, 32))
    with pytest.raises(ValueError, match="compute capability 8.9.*CPU"):
        fp8_gemm(x, qweight, scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_reference_properties(dtype):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(6, 300, generator=gen) * torch.logspace(-4, 3, 6)[:, None]).to(dtype)
    x[2] = 0  # a padding row
    xq, scale = quantize_fp8_per_token_ref(x)
    assert xq.dtype == FP8 and xq.shape == x.shape and scale.dtype == torch.float32 and scale.shape == (6,)
    x32 = x.float()
    amax = x32.abs().amax(1)
    nonzero = amax > 0
    torch.testing.assert_close(scale[nonzero], amax[nonzero] / FP8_MAX, rtol=0, atol=0)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (xq.float()[2] == 0).all()
    assert (xq.float().abs().amax(1)[nonzero] == FP8_MAX).all()  # each row's absmax lands on +-448
    deq = xq.float() * scale[:, None]
    assert ((deq - x32).abs() <= _dequant_error_bound(x32, scale[:, None])).all()


def test_quantize_fp8_weight_round_trip():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(40, 96, generator=gen) * torch.logspace(-3, 1, 40)[:, None]
    w[7] = 0
    qweight, scales = quantize_fp8_weight(w.to(torch.bfloat16))
    assert qweight.dtype == FP8 and qweight.shape == (40, 96) and qweight.is_contiguous()
    assert scales.dtype == torch.float32 and scales.shape == (40,)
    assert torch.isfinite(scales).all() and (scales > 0).all() and (qweight.float()[7] == 0).all()
    w32 = w.to(torch.bfloat16).float()
    deq = qweight.float() * scales[:, None]
    assert ((deq - w32).abs() <= _dequant_error_bound(w32, scales[:, None])).all()
    assert (qweight.float().abs().amax(1)[scales > 1e-10] == FP8_MAX).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_gemm_within_fp8_error_of_float32(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 512, generator=gen).to(dtype)
    w = torch.randn(80, 512, generator=gen) / 512 ** 0.5
    qweight, scales = quantize_fp8_weight(w)
    y = fp8_gemm_ref(x, qweight, scales)
    assert y.dtype == dtype and y.shape == (24, 80)
    exact = x.float() @ w.t()
    rel = (y.float() - exact).norm() / exact.norm()
    assert rel < 0.05, rel  # two E4M3 roundings (3 mantissa bits) per product: about 3% rms


@pytest.mark.parametrize("shape", [(1, 64), (7, 1000), (3, 5000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_kernel_matches_reference_bitwise(fp8_device, shape, dtype):
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    x = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    if shape[0] > 1:
        x[1] = 0
    xq, scale = quantize_fp8_per_token(x.to(fp8_device))
    ref_q, ref_scale = quantize_fp8_per_token_ref(x)
    assert xq.dtype == FP8 and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(xq.cpu().view(torch.uint8), ref_q.view(torch.uint8))


def test_per_token_kernel_rounds_to_nearest_even(fp8_device):
    row = _grid_row()[None]
    xq, scale = quantize_fp8_per_token(row.to(fp8_device))
    ref_q, ref_scale = quantize_fp8_per_token_ref(row)
    assert ref_scale.item() == 1.0 and torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(xq.cpu().view(torch.uint8), ref_q.view(torch.uint8))


def _gemm_case(m, n, k, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    qweight, scales = quantize_fp8_weight(torch.randn(n, k, generator=gen) / k ** 0.5)
    return x, qweight, scales


@pytest.mark.parametrize("m,n,k,config", [
    (1, 48, 64, None),
    (5, 40, 96, Fp8GemmConfig(16, 32, 32, num_warps=4, num_stages=2, group_m=1)),   # K a multiple
    (37, 70, 200, Fp8GemmConfig(16, 32, 64, num_warps=4, num_stages=2, group_m=2)),  # ragged M, N, K
    (100, 33, 130, None),
    (64, 96, 256, Fp8GemmConfig(16, 16, 128, num_warps=4, num_stages=2, group_m=3)),  # groups cut short
    # split-K: the splits' scaled partials summed by the last to arrive (K 256 in 4 splits of
    # 64; K 200 in 3 of 96, 96 and 8: a ragged last tile; 3 asked of 2 tiles gives 2 splits)
    (20, 48, 256, Fp8GemmConfig(16, 16, 64, num_warps=4, num_stages=2, group_m=2, split_k=4)),
    (37, 70, 200, Fp8GemmConfig(16, 32, 32, num_warps=4, num_stages=2, group_m=1, split_k=3)),
    (3, 32, 64, Fp8GemmConfig(16, 32, 32, num_warps=4, num_stages=2, group_m=1, split_k=3)),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gemm_matches_reference(fp8_device, m, n, k, config, dtype):
    x, qweight, scales = _gemm_case(m, n, k, dtype, seed=m * 7 + n + k)
    ref = fp8_gemm_ref(x, qweight, scales)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=fp8_device)
    got = fp8_gemm(x.to(fp8_device), qweight.to(fp8_device), scales.to(fp8_device), out=out, config=config)
    assert got is out
    _assert_gemm_close(got, ref)


@needs_fp8_gpu
@pytest.mark.parametrize("m", [1, 16, 100, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 776), (6144, 4096), (4096, 14336)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_matches_reference_large(m, n, k, dtype):
    x, qweight, scales = _gemm_case(m, n, k, dtype, seed=m + n + k)
    dev = torch.device("cuda")
    got = fp8_gemm(x.to(dev), qweight.to(dev), scales.to(dev))
    ref = fp8_gemm_ref(x.to(dev), qweight.to(dev), scales.to(dev))
    _assert_gemm_close(got, ref.cpu())


def test_split_k_sums_in_split_order_and_resets_its_counters(fp8_device):
    """Two launches of a split config give identical bits (the sum's order is the splits', not
    the arrivals'), and each leaves its arrival counters at zero for the next."""
    from llmesh.kernels.common import arrival_counters

    x, qweight, scales = (t.to(fp8_device) for t in _gemm_case(24, 64, 512, torch.float16, seed=5))
    cfg = Fp8GemmConfig(16, 32, 64, num_warps=4, num_stages=2, group_m=1, split_k=4)
    first = fp8_gemm(x, qweight, scales, config=cfg)
    second = fp8_gemm(x, qweight, scales, config=cfg)
    assert torch.equal(first, second)
    assert int(arrival_counters("fp8_gemm", x.device, 1).abs().sum()) == 0
    _assert_gemm_close(first, fp8_gemm_ref(x, qweight, scales).cpu())


@pytest.mark.parametrize("m,n,k,split", [(37, 70, 208, 1), (100, 40, 256, 2), (5, 96, 208, 3)])
def test_tma_tiles_equal_the_pointer_loads(fp8_device, m, n, k, split):
    """tma=1: the tiles through TMA descriptors, whose copies fill rows past M or N and the K
    tail (208 is not a multiple of 64) with zeros, give the pointer loads' output, split-K too;
    an operand a descriptor cannot take (rows not a multiple of 16 bytes) runs the pointer loads."""
    from llmesh.kernels.common import tma_descriptor

    x, qweight, scales = (t.to(fp8_device) for t in _gemm_case(m, n, k, torch.bfloat16, seed=m + n))
    if tma_descriptor(qweight, [32, 64]) is None:
        pytest.skip("no TMA on this GPU (compute capability < 9)")
    plain = Fp8GemmConfig(16, 32, 64, num_warps=4, num_stages=2, group_m=2, split_k=split)
    tma = Fp8GemmConfig(16, 32, 64, num_warps=4, num_stages=2, group_m=2, split_k=split, tma=1)
    want = fp8_gemm(x, qweight, scales, config=plain)
    got = fp8_gemm(x, qweight, scales, config=tma)
    assert torch.equal(got, want)
    _assert_gemm_close(got.cpu(), fp8_gemm_ref(x, qweight, scales).cpu())
    x2, q2, s2 = (t.to(fp8_device) for t in _gemm_case(9, 24, 200, torch.bfloat16, seed=3))  # rows of 200 bytes
    assert tma_descriptor(q2, [32, 64]) is None
    assert torch.equal(fp8_gemm(x2, q2, s2, config=tma), fp8_gemm(x2, q2, s2, config=plain))


@pytest.mark.parametrize("bad", [
    Fp8GemmConfig(16, 32, 64, num_warps=4, num_stages=2, tma=2),
    Fp8GemmConfig(16, 32, 48, num_warps=4, num_stages=2),            # block_k not a power of two
    Fp8GemmConfig(16, 32, 16, num_warps=4, num_stages=2),            # block_k under FP8's 32
    Fp8GemmConfig(16, 32, 64, num_warps=4, num_stages=2, split_k=0),
])
def test_bad_config_is_refused(fp8_device, bad):
    x, qweight, scales = (t.to(fp8_device) for t in _gemm_case(4, 32, 64, torch.float32, seed=1))
    with pytest.raises(ValueError, match="config"):
        fp8_gemm(x, qweight, scales, config=bad)


@needs_fp8_gpu
@pytest.mark.parametrize("config", [None, Fp8GemmConfig(64, 64, 128, num_warps=4, num_stages=4, split_k=4),
                                    Fp8GemmConfig(64, 64, 128, num_warps=4, num_stages=4, split_k=2, tma=1)])
def test_gemm_replays_in_a_cuda_graph(config):
    dev = torch.device("cuda")
    x, qweight, scales = (t.to(dev) for t in _gemm_case(16, 512, 1024, torch.bfloat16, seed=9))
    static_x = x.clone()
    fp8_gemm(static_x, qweight, scales, config=config)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fp8_gemm(static_x, qweight, scales, config=config)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    _assert_gemm_close(static_y, fp8_gemm_ref(new_x, qweight, scales).cpu())


def test_empty_inputs(fp8_device):
    qweight, scales = quantize_fp8_weight(torch.randn(16, 32))
    qweight, scales = qweight.to(fp8_device), scales.to(fp8_device)
    got = fp8_gemm(torch.randn(0, 32, device=fp8_device), qweight, scales)
    assert got.shape == (0, 16)
    xq, s = quantize_fp8_per_token(torch.randn(0, 32, device=fp8_device))
    assert xq.shape == (0, 32) and s.shape == (0,)


def test_default_config_is_valid():
    for m in (1, 16, 17, 64, 65, 4096):
        cfg = default_config(m, 4096, 4096)
        assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= 32
        assert all(v & (v - 1) == 0 for v in (cfg.block_m, cfg.block_n, cfg.block_k))


def test_rejects_bad_inputs(fp8_device):
    x = torch.randn(4, 64, device=fp8_device)
    qweight, scales = quantize_fp8_weight(torch.randn(32, 64))
    qweight, scales = qweight.to(fp8_device), scales.to(fp8_device)
    with pytest.raises(ValueError, match="qweight must have dtype"):
        fp8_gemm(x, qweight.float(), scales)
    with pytest.raises(ValueError, match="qweight has K=64, expected 48"):
        fp8_gemm(x[:, :48], qweight, scales)
    with pytest.raises(ValueError, match="w_scale must have dtype"):
        fp8_gemm(x, qweight, scales.half())
    with pytest.raises(ValueError, match="w_scale has N=16, expected 32"):
        fp8_gemm(x, qweight, scales[:16])
    with pytest.raises(ValueError, match="x must be 2-D"):
        fp8_gemm(x[None], qweight, scales)
    with pytest.raises(ValueError, match="x must be contiguous"):
        fp8_gemm(torch.randn(64, 4, device=fp8_device).t(), qweight, scales)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        fp8_gemm(torch.randn(4, 32, device=fp8_device), qweight.t(), scales[:1].expand(64).contiguous())
    with pytest.raises(ValueError, match="out must have shape"):
        fp8_gemm(x, qweight, scales, out=torch.empty(4, 16, device=fp8_device))
    with pytest.raises(ValueError, match="out must be"):
        fp8_gemm(x, qweight, scales, out=torch.empty(4, 32, dtype=torch.float16, device=fp8_device))
    with pytest.raises(ValueError, match="config must be an Fp8GemmConfig"):
        fp8_gemm(x, qweight, scales, config=(16, 16, 32, 4, 2, 8))
    with pytest.raises(ValueError, match="x must have K >= 1"):
        quantize_fp8_per_token(torch.randn(3, 0, device=fp8_device))
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_fp8_weight(torch.randn(64))
