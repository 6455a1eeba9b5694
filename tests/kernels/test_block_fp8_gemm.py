"""Block-scaled FP8: per-(token, group) activation quantization and the block-scaled GEMM match
their torch references on random inputs (K tails, edge tiles, both block shapes); the
reference is within FP8 error of float32 arithmetic and finer than per-token scales where one
channel is an outlier.

On the CPU the kernels run under Triton's interpreter on small shapes; the large shapes and the
CUDA-graph replay only on a GPU with FP8 (compute capability >= 8.9), as is cuBLASLt's block-scaled
GEMM (the libraries' shape rule and scale layout are checked on the CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.block_fp8_gemm import (  # noqa: E402
    BlockFp8Config, block_fp8_gemm, block_fp8_gemm_ref, block_fp8_scaled_mm_rows, block_library, library_shape_ok,
    mn_major_scales, quantize_fp8_blocks, quantize_fp8_per_group, quantize_fp8_per_group_ref)
from llmesh.kernels.fp8_gemm import fp8_support, quantize_fp8_per_token_ref  # noqa: E402

HAS_FP8_GPU = torch.cuda.is_available() and fp8_support(torch.device("cuda")) is None
needs_fp8_gpu = pytest.mark.skipif(
    not HAS_FP8_GPU, reason="large shapes and CUDA graphs need a CUDA GPU with FP8 (compute capability >= 8.9); "
    "the interpreter would take minutes")



def _block_weight(n: int, k: int, block: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float weight, E4M3 codes, block scales) with block scales spread over four decades."""
    gen = torch.Generator().manual_seed(seed)
    bn, bk = block
    w = torch.randn(n, k, generator=gen)
    nb, kb = -(-n // bn), -(-k // bk)
    w *= (10.0 ** (torch.rand(nb, kb, generator=gen) * 4 - 2)).repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (w, *quantize_fp8_blocks(w, block))


def _x(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    if m and k > 3:
        x[:, 3] *= 50.0  # an outlier channel, as activations have
    return x.to(dtype)


@pytest.mark.parametrize("m,k,group", [(1, 128, 128), (5, 300, 128), (4, 96, 32), (3, 64, 64), (2, 1, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_quantization_matches_the_reference_bit_for_bit(fp8_device, m, k, group, dtype):
    x = _x(m, k, dtype, seed=m * 7 + k).to(fp8_device)
    got = quantize_fp8_per_group(x, group)
    ref = quantize_fp8_per_group_ref(x.cpu(), group)
    assert got.xq.shape == (m, k) and got.scale.shape == (m, -(-k // group))
    assert mn_major_scales(got.scale) is got.scale  # laid M-major, as the libraries read them
    assert torch.equal(got.xq.cpu().view(torch.uint8), ref.xq.view(torch.uint8))
    assert torch.equal(got.scale.cpu(), ref.scale)
    # within half an E4M3 step of x
    deq = got.xq.cpu().float() * got.scale.cpu().repeat_interleave(group, 1)[:, :k]
    xf = x.cpu().float()
    assert bool(((deq - xf).abs() <= xf.abs() * 2.0 ** -4 + got.scale.cpu().max() * 2.0 ** -9 + 1e-30).all())


@pytest.mark.parametrize("m,n,k,block", [
    (1, 128, 128, (128, 128)), (3, 200, 300, (128, 128)), (17, 96, 160, (32, 64)), (33, 64, 256, (64, 128)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_matches_the_reference(fp8_device, m, n, k, block, dtype):
    _, q, s = _block_weight(n, k, block, seed=n + k)
    x = _x(m, k, dtype, seed=m)
    got = block_fp8_gemm(x.to(fp8_device), q.to(fp8_device), s.to(fp8_device), block)
    ref = block_fp8_gemm_ref(x, q, s, block)
    assert got.dtype == dtype and got.shape == (m, n)
    atol = 1e-3 * ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=8e-3 if dtype == torch.bfloat16 else 1e-5,
                               atol=atol)


@pytest.mark.parametrize("config", [BlockFp8Config(16, 32, num_warps=2, num_stages=2, group_m=1),
                                    BlockFp8Config(32, 128, num_warps=4, num_stages=2, group_m=2)])
def test_every_tile_gives_the_same_product(fp8_device, config):
    _, q, s = _block_weight(160, 256, (128, 128), seed=3)
    x = _x(40, 256, torch.float32, seed=4)
    got = block_fp8_gemm(x.to(fp8_device), q.to(fp8_device), s.to(fp8_device), (128, 128), config=config)
    ref = block_fp8_gemm_ref(x, q, s, (128, 128))
    # float32 sums in another order: a few ulps of the largest output
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_reference_is_fp8_close_to_float32():
    w, q, s = _block_weight(256, 512, (128, 128), seed=11)
    x = _x(64, 512, torch.float32, seed=12)
    exact = x @ w.t()
    assert ((block_fp8_gemm_ref(x, q, s, (128, 128)) - exact).norm() / exact.norm()).item() < 0.05


def test_group_scales_keep_precision_that_a_per_token_scale_loses():
    """E4M3's normal range spans 448 / 2^-6 = 28,672x. With one channel 50,000x the others (the
    "massive activations" of LLMs reach that), a per-token scale pushes the row's other values into
    the subnormals; per-group scales keep the groups without the outlier at full precision."""
    x = _x(64, 512, torch.float32, seed=12)
    x[:, 3] *= 1000.0  # _x made it 50x
    grouped = quantize_fp8_per_group_ref(x, 128)
    per_token = quantize_fp8_per_token_ref(x)
    rest = slice(128, 512)  # the groups without the outlier
    g = grouped.xq.float()[:, rest] * grouped.scale.repeat_interleave(128, 1)[:, rest]
    t = per_token.xq.float()[:, rest] * per_token.scale[:, None]
    g_err = ((g - x[:, rest]).norm() / x[:, rest].norm()).item()
    t_err = ((t - x[:, rest]).norm() / x[:, rest].norm()).item()
    assert g_err < 0.03 and t_err > 2 * g_err


def test_bad_inputs_are_refused(fp8_device):
    _, q, s = _block_weight(64, 128, (64, 64), seed=1)
    x = torch.randn(2, 128, device=fp8_device)
    q, s = q.to(fp8_device), s.to(fp8_device)
    with pytest.raises(ValueError, match="scales has rows=1, expected 2"):
        block_fp8_gemm(x, q, s, (32, 64))  # 64 rows in 32-row blocks need two rows of scales
    with pytest.raises(ValueError, match="power of two"):
        block_fp8_gemm(x, q, s, (64, 48))
    with pytest.raises(ValueError, match="K=128, expected 96"):
        block_fp8_gemm(x[:, :96].contiguous(), q, s, (64, 64))
    with pytest.raises(ValueError, match="group must be a power of two"):
        quantize_fp8_per_group(x, 100)


def test_empty_inputs(fp8_device):
    _, q, s = _block_weight(64, 128, (64, 64), seed=1)
    got = block_fp8_gemm(torch.randn(0, 128, device=fp8_device), q.to(fp8_device), s.to(fp8_device), (64, 64))
    assert got.shape == (0, 64)


@needs_fp8_gpu
@pytest.mark.parametrize("m", [1, 16, 200, 2048])
def test_real_shapes_on_the_gpu(m):
    dev = torch.device("cuda")
    _, q, s = _block_weight(4096, 4096, (128, 128), seed=m)
    x = _x(m, 4096, torch.bfloat16, seed=m)
    got = block_fp8_gemm(x.to(dev), q.to(dev), s.to(dev), (128, 128))
    ref = block_fp8_gemm_ref(x.to(dev), q.to(dev), s.to(dev), (128, 128))
    torch.testing.assert_close(got.float(), ref.float(), rtol=8e-3, atol=2e-3 * ref.float().abs().max().item())


@needs_fp8_gpu
def test_gemm_replays_in_a_cuda_graph():
    dev = torch.device("cuda")
    _, q, s = _block_weight(512, 1024, (128, 128), seed=9)
    q, s = q.to(dev), s.to(dev)
    static_x = _x(16, 1024, torch.bfloat16, seed=9).to(dev)
    block_fp8_gemm(static_x, q, s, (128, 128))  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = block_fp8_gemm(static_x, q, s, (128, 128))
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    ref = block_fp8_gemm_ref(new_x, q, s, (128, 128))
    torch.testing.assert_close(static_y.float(), ref.float(), rtol=8e-3, atol=2e-3 * ref.float().abs().max().item())


@pytest.mark.parametrize("n,k,block,ok", [
    (4096, 4096, (128, 128), True), (6144, 14336, (128, 128), True),
    (4096, 4096, (64, 64), False),     # the libraries take 128 x 128 blocks only
    (4000, 4096, (128, 128), False),   # a ragged last row block
    (4096, 4160, (128, 128), False),   # a ragged last column block
    (4096, 4224, (128, 128), False),   # K / 128 = 33: cuBLASLt pads the weight scales' K to 4
])
def test_library_shape_rule(n, k, block, ok):
    assert library_shape_ok(n, k, block) is ok


def test_mn_major_scales_keep_the_values():
    xs = torch.arange(12, dtype=torch.float32).view(3, 4)  # row-major: re-laid
    got = mn_major_scales(xs)
    assert got.shape == (3, 4) and got.stride() == (1, 3) and torch.equal(got, xs)
    assert mn_major_scales(got) is got  # already M-major: as it is
    one = mn_major_scales(xs[:1])  # M = 1: strides (1, 1), which .t().contiguous().t() does not give
    assert one.stride() == (1, 1) and torch.equal(one, xs[:1])


def test_the_gemm_reads_either_scale_layout(fp8_device):
    """The producers lay the activation scales M-major; the GEMM takes row-major ones (a caller's
    own) to the same bits."""
    from llmesh.kernels.block_fp8_gemm import block_fp8_gemm_rows
    from llmesh.kernels.fp8_gemm import Fp8Rows

    _, q, s = _block_weight(96, 320, (32, 64), seed=6)
    q, s = q.to(fp8_device), s.to(fp8_device)
    rows = quantize_fp8_per_group(_x(5, 320, torch.bfloat16, seed=6).to(fp8_device), 64)
    row_major = Fp8Rows(rows.xq, rows.scale.contiguous())
    assert rows.scale.stride() == (1, 5) and row_major.scale.stride() == (5, 1)
    want = block_fp8_gemm_rows(rows, q, s, (32, 64), out_dtype=torch.bfloat16)
    assert torch.equal(block_fp8_gemm_rows(row_major, q, s, (32, 64), out_dtype=torch.bfloat16), want)


def test_the_cpu_runs_our_gemm_whatever_the_tables_say():
    from llmesh.engine.quant.linear import linear
    from llmesh.engine.quant.packed import Fp8BlockWeight

    assert block_library(torch.device("cpu"), 64) == "triton"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a Triton kernel runs on CPU tensors only under the interpreter, which a GPU machine's "
                    "tests leave off (there the kernel's own tests cover it)")
    w, q, s = _block_weight(128, 512, (128, 128), seed=4)
    x = _x(3, 512, torch.float32, seed=4)
    got = linear(x, Fp8BlockWeight(qweight=q, scales=s, block=(128, 128)))
    assert torch.equal(got, block_fp8_gemm(x, q, s, (128, 128)))


@needs_fp8_gpu
@pytest.mark.parametrize("m", [1, 3, 8, 16, 200])
def test_cublas_block_gemm_matches_the_reference(m):
    """block_fp8_scaled_mm_rows (cuBLASLt through torch.nn.functional.scaled_mm) on our operands and
    scale layouts: the reference's products, summed in its own order."""
    if not hasattr(torch.nn.functional, "scaled_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm (block-scaled cuBLASLt)")
    dev = torch.device("cuda")
    _, q, s = _block_weight(1024, 2048, (128, 128), seed=m)
    x = _x(m, 2048, torch.bfloat16, seed=m).to(dev)
    got = block_fp8_scaled_mm_rows(quantize_fp8_per_group(x, 128), q.to(dev), s.to(dev), torch.bfloat16)
    ref = block_fp8_gemm_ref(x, q.to(dev), s.to(dev), (128, 128)).float()
    assert got.dtype == torch.bfloat16 and got.shape == (m, 1024)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())
