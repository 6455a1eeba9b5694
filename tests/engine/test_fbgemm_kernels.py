"""FBGEMM GenAI's kernels behind the measured table (services/engine/quant/fbgemm_kernels.py):
the signed nibbles, scales and zeros handed to its INT4 packer rebuild our weights (CPU); its
INT4, FP8, block-scaled FP8 and W4A8 GEMMs against the references, under a CUDA graph, and the
dispatch through quant.linear, on a Hopper GPU with fbgemm-gpu-genai installed (the ``gpu`` extra)."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.quant import fbgemm_kernels
from llmesh.engine.quant.linear import linear, prepare_library_weights
from llmesh.engine.quant.quantize import quantize_fp8, quantize_int4
from llmesh.kernels import quant_gemm_config
from tests.engine.library_dispatch import check_one_row_dispatch, count_calls, use_table


def _int4(n: int, k: int, group: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int4((0.05 * torch.randn(n, k, generator=gen)).to(torch.bfloat16), group)


def _unpack_signed(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N, Kp/2] (k = 2j low nibble, 2j + 1 high, two's complement) -> int [N, Kp]."""
    b = packed.to(torch.int16) & 0xFF
    lo, hi = b & 0x0F, b >> 4
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)


@pytest.mark.parametrize("n,k", [(128, 256), (256, 200), (128, 640)])
def test_signed_codes_scales_and_zeros_rebuild_the_weight(n, k):
    """w = q' * scale + zero over the signed codes is the reference weight, up to one bfloat16
    rounding of scale and zero."""
    w = _int4(n, k)
    codes = _unpack_signed(fbgemm_kernels.signed_nibbles_n_by_k(w))  # [N, Kp]
    assert codes.shape == (n, w.padded_in_features) and codes.min() >= -8 and codes.max() <= 7
    scale, zero = fbgemm_kernels.scales_and_zeros(w)
    assert scale.dtype == zero.dtype == torch.bfloat16 and scale.shape == w.scales.shape
    rows = torch.arange(w.padded_in_features) // w.group_size
    rebuilt = codes.t().float() * scale.float()[rows] + zero.float()[rows]  # [Kp, N]
    ref = w.dequantize()
    torch.testing.assert_close(rebuilt[:k], ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    # exact with the unrounded scale and zero: the codes themselves are right
    s, m = w.scales.float()[rows], w.mins.float()[rows]
    torch.testing.assert_close((codes.t().float() * s + (m + 8 * s))[:k], ref, rtol=0, atol=1e-6)


def test_formats_it_was_not_checked_at_stay_on_our_kernels():
    assert fbgemm_kernels.int4_format_supported(_int4(128, 256))
    assert not fbgemm_kernels.int4_format_supported(_int4(128, 256, group=64))  # its packer wants >= 128
    assert not fbgemm_kernels.int4_format_supported(_int4(96, 256))  # N % 128
    w = _int4(128, 256)
    permuted = type(w)(w.qweight, w.scales, w.mins, w.group_size, w.in_features, perm=torch.arange(256))
    assert not fbgemm_kernels.int4_format_supported(permuted)


def test_cpu_weights_stay_on_our_kernels():
    w = _int4(128, 256)
    assert not fbgemm_kernels.int4_supported(w)
    assert fbgemm_kernels.int4_matmul(torch.randn(1, 256).bfloat16(), w) is None
    assert prepare_library_weights([w], torch.device("cpu"), torch.bfloat16) == 0


def test_the_table_accepts_fbgemm_entries():
    table = {"w4a16 4096x14336 m64": ["fbgemm", ["shuffled"]], "fp8 4096x14336 m1": ["fbgemm", []]}
    assert quant_gemm_config.lookup(table, "w4a16", 33, 4096, 14336) == ("fbgemm", ("shuffled",))
    assert quant_gemm_config.lookup(table, "fp8", 1, 4096, 14336) == ("fbgemm", ())


gpu = pytest.mark.skipif(fbgemm_kernels.unavailable_reason() is not None,
                         reason=str(fbgemm_kernels.unavailable_reason()))


@gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (5, 384, 1000), (64, 512, 1024), (1, 14336, 4096), (128, 4096, 4096)])
def test_int4_matches_the_dequantized_reference(m, n, k):
    w = _int4(n, k, seed=m).to("cuda")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
    got = fbgemm_kernels.int4_matmul(x, w)
    want = x.float() @ w.dequantize().cuda()
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (7, 384, 1024), (128, 4096, 4096)])
def test_fp8_matches_the_reference(m, n, k):
    from llmesh.kernels.fp8_gemm import fp8_gemm_ref, quantize_fp8_per_token

    gen = torch.Generator().manual_seed(m)
    w = quantize_fp8((0.05 * torch.randn(n, k, generator=gen)).bfloat16().cuda())
    x = torch.randn(m, k, generator=gen).bfloat16().cuda()
    rows = quantize_fp8_per_token(x)
    got = fbgemm_kernels.fp8_matmul(rows.xq, rows.scale, w, torch.bfloat16)
    want = fp8_gemm_ref(x, w.qweight, w.scales).float()
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    assert fbgemm_kernels.fp8_matmul(rows.xq, rows.scale, w, torch.float16) is None  # bfloat16 out only


@gpu
def test_both_kernels_replay_in_a_cuda_graph():
    """The engine's decode steps are graph replays: the kernels must capture and read the
    replay's inputs, not the capture's."""
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token

    w4 = _int4(256, 512).to("cuda")
    w8 = quantize_fp8((0.05 * torch.randn(256, 512)).bfloat16().cuda())
    x = torch.zeros(4, 512, device="cuda", dtype=torch.bfloat16)
    rows = quantize_fp8_per_token(torch.ones(4, 512, device="cuda", dtype=torch.bfloat16))
    fbgemm_kernels.int4_matmul(x, w4), fbgemm_kernels.fp8_matmul(rows.xq, rows.scale, w8, torch.bfloat16)  # pack
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y4 = fbgemm_kernels.int4_matmul(x, w4)
        y8 = fbgemm_kernels.fp8_matmul(rows.xq, rows.scale, w8, torch.bfloat16)
    new_x = torch.randn(4, 512, device="cuda").bfloat16()
    new_rows = quantize_fp8_per_token(new_x)
    x.copy_(new_x), rows.xq.copy_(new_rows.xq), rows.scale.copy_(new_rows.scale)
    graph.replay()
    torch.testing.assert_close(y4, fbgemm_kernels.int4_matmul(new_x, w4))
    torch.testing.assert_close(y8, fbgemm_kernels.fp8_matmul(new_rows.xq, new_rows.scale, w8, torch.bfloat16))


@gpu
def test_linear_dispatches_int4_to_fbgemm_where_the_table_says(monkeypatch):
    w = _int4(256, 512).to("cuda")
    use_table(monkeypatch, w, ["fbgemm", ["shuffled"]])
    calls = count_calls(monkeypatch, fbgemm_kernels, "int4_matmul")
    assert prepare_library_weights([w], torch.device("cuda"), torch.bfloat16) > 0  # the copy is made at load
    assert fbgemm_kernels.int4_pack(w) is fbgemm_kernels.int4_pack(w)  # made once
    check_one_row_dispatch(w, calls)


@gpu
def test_linear_dispatches_fp8_to_fbgemm_where_the_table_says(monkeypatch):
    from llmesh.kernels.fp8_gemm import fp8_gemm_ref

    w = quantize_fp8((0.05 * torch.randn(256, 512)).bfloat16().cuda())
    use_table(monkeypatch, w, ["fbgemm", []], kind="fp8")
    calls = count_calls(monkeypatch, fbgemm_kernels, "fp8_matmul")
    x = torch.randn(1, 512, device="cuda").bfloat16()
    y = linear(x, w)
    assert len(calls) == 1
    want = fp8_gemm_ref(x, w.qweight, w.scales).float()
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    linear(torch.randn(4, 512, device="cuda").bfloat16(), w)  # M = 4: past the table's M, our kernel
    assert len(calls) == 1


def _w4a8(n: int, k: int, seed: int = 0):
    from llmesh.engine.quant.quantize import quantize_w4a8

    gen = torch.Generator().manual_seed(seed)
    return quantize_w4a8((0.05 * torch.randn(n, k, generator=gen)).bfloat16().cuda())


@gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (5, 384, 1000), (64, 512, 1024), (1, 14336, 4096),
                                   (256, 4096, 14336)])
def test_w4a8_matches_the_reference(m, n, k):
    """FBGEMM's f8i4bf16_shuffled computes w4a8_matmul_ref's arithmetic (E4M3 products from its
    table, scaled sums): equal up to its accumulation and the bfloat16 output. K = 1000 is
    padded to 1024 on both sides.

    x and w are drawn independently, as a model's activations and weights are: like every
    CUTLASS FP8 GEMM with fast accumulation (f8f8bf16_rowwise too), the kernel keeps about 14
    bits in the tensor cores' running sums, so a sum of K products of one sign loses its small
    terms. With x equal to a row of w (every product positive) the H200 gave 20% error on
    that output at K = 4096 (docs/quantization.md)."""
    from llmesh.engine.quant.linear import w4a8_matmul_ref
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token

    w = _w4a8(n, k, seed=m)
    want_w = w.map_tensors(torch.clone)  # the reference reads the unshuffled codes
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1000 + m)).bfloat16().cuda()
    rows = quantize_fp8_per_token(x)
    want = w4a8_matmul_ref(rows, want_w, torch.float32)
    got = fbgemm_kernels.w4a8_matmul(rows.xq, rows.scale, w)
    assert w.shuffled and got.dtype == torch.bfloat16 and got.shape == (m, n)
    err = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, f"max |diff| / max |want| = {err:.3g}"


@gpu
def test_w4a8_replays_in_a_cuda_graph_and_dispatches_through_linear(monkeypatch):
    from llmesh.kernels.fp8_gemm import quantize_fp8_per_token

    w = _w4a8(256, 512)
    assert prepare_library_weights([w], torch.device("cuda"), torch.bfloat16) == 0 and w.shuffled  # in place
    rows = quantize_fp8_per_token(torch.ones(4, 512, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fbgemm_kernels.w4a8_matmul(rows.xq, rows.scale, w)
    new_rows = quantize_fp8_per_token(torch.randn(4, 512, device="cuda").bfloat16())
    rows.xq.copy_(new_rows.xq), rows.scale.copy_(new_rows.scale)
    graph.replay()
    torch.testing.assert_close(y, fbgemm_kernels.w4a8_matmul(new_rows.xq, new_rows.scale, w))
    calls = count_calls(monkeypatch, fbgemm_kernels, "w4a8_matmul")
    x = torch.randn(3, 512, device="cuda").bfloat16()
    got = linear(x, w)
    assert len(calls) == 1 and got.dtype == torch.bfloat16
    assert linear(x.half(), w).dtype == torch.float16  # its bfloat16 output, cast


def _block_fp8(n: int, k: int, seed: int = 0):
    from llmesh.engine.quant.packed import Fp8BlockWeight
    from llmesh.kernels.block_fp8_gemm import quantize_fp8_blocks

    gen = torch.Generator().manual_seed(seed)
    q, s = quantize_fp8_blocks((0.05 * torch.randn(n, k, generator=gen)).bfloat16().cuda(), (128, 128))
    return Fp8BlockWeight(qweight=q, scales=s, block=(128, 128))


groupwise_gpu = pytest.mark.skipif(fbgemm_kernels.groupwise_unavailable_reason() is not None,
                                   reason=str(fbgemm_kernels.groupwise_unavailable_reason()))


@groupwise_gpu
@pytest.mark.parametrize("m,n,k", [(1, 256, 512), (7, 384, 1024), (128, 4096, 4096), (300, 1024, 14336)])
def test_block_fp8_matches_the_reference(m, n, k):
    from llmesh.kernels.block_fp8_gemm import block_fp8_gemm_ref, quantize_fp8_per_group

    w = _block_fp8(n, k, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
    rows = quantize_fp8_per_group(x, 128)
    got = fbgemm_kernels.fp8_block_matmul(rows, w, torch.bfloat16)
    want = block_fp8_gemm_ref(x, w.qweight, w.scales, w.block).float()
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
    assert fbgemm_kernels.fp8_block_matmul(rows, w, torch.float16) is None  # bfloat16 out only


@groupwise_gpu
def test_block_fp8_dispatch_follows_the_library_table_and_replays_in_a_graph(monkeypatch):
    """BLOCK_FP8_LIBRARY's buckets send M = 1 to FBGEMM and M = 16 to cuBLASLt; a weight neither takes
    (a ragged N) stays on our GEMM; the library calls capture in a CUDA graph and read the replay's rows."""
    from llmesh.kernels import block_fp8_gemm as block
    from llmesh.kernels.block_fp8_gemm import block_fp8_gemm_ref
    from llmesh.kernels.common import cuda_device_tag

    monkeypatch.setitem(block.BLOCK_FP8_LIBRARY, cuda_device_tag(torch.device("cuda")), {1: "fbgemm", 16: "scaled_mm"})
    w = _block_fp8(256, 512)
    assert prepare_library_weights([w], torch.device("cuda"), torch.bfloat16) == 0
    assert fbgemm_kernels.groupwise_scales(w) is fbgemm_kernels.groupwise_scales(w)  # made once, at load
    fb = count_calls(monkeypatch, fbgemm_kernels, "fp8_block_matmul")
    cublas = count_calls(monkeypatch, block, "block_fp8_scaled_mm_rows")
    for m, want_calls in ((1, (1, 0)), (16, (1, 1))):
        x = torch.randn(m, 512, device="cuda").bfloat16()
        y = linear(x, w)
        assert (len(fb), len(cublas)) == want_calls
        want = block_fp8_gemm_ref(x, w.qweight, w.scales, w.block).float()
        torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=1e-2 * want.abs().max().item())
    ragged = _block_fp8(200, 512)
    linear(torch.randn(1, 512, device="cuda").bfloat16(), ragged)
    assert (len(fb), len(cublas)) == (1, 1)
    for m in (1, 16):
        static_x = torch.zeros(m, 512, device="cuda", dtype=torch.bfloat16)
        linear(static_x, w)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = linear(static_x, w)
        new_x = torch.randn(m, 512, device="cuda").bfloat16()
        static_x.copy_(new_x)
        graph.replay()
        torch.testing.assert_close(static_y, linear(new_x, w))
