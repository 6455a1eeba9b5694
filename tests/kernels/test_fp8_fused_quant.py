"""The per-token FP8 quantization fused into the ops before an FP8 linear layer: rmsnorm_fp8 and
silu_and_mul_fp8 give the bits quantize_fp8_per_token (per group: quantize_fp8_per_group) gives on
rmsnorm's / silu_and_mul's output (with and without the residual add, rows longer than one block, a zero row), and the
triton op table's norm_linear / act_linear give the unfused ops' result with the fusion on.

On the CPU the kernels run under Triton's interpreter (its E4M3 cast fixed up as in
llmesh/kernels/fp8_gemm.py); on a GPU without FP8 they are refused and the tests skip."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.activation import ONE_PASS_MAX, silu_and_mul, silu_and_mul_fp8  # noqa: E402
from llmesh.kernels.block_fp8_gemm import (  # noqa: E402
    mn_major_scales, quantize_fp8_blocks, quantize_fp8_per_group_ref)
from llmesh.kernels.fp8_gemm import fp8_support, quantize_fp8_per_token, quantize_fp8_weight  # noqa: E402
from llmesh.kernels.rmsnorm import rmsnorm, rmsnorm_fp8  # noqa: E402

EPS = 1e-6


@pytest.fixture
def device(device):
    if device.type == "cuda" and fp8_support(device) is not None:
        pytest.skip(fp8_support(device))
    return device


def _same_rows(got, want):
    assert got.xq.dtype == want.xq.dtype == torch.float8_e4m3fn and got.scale.dtype == torch.float32
    assert torch.equal(got.scale.cpu(), want.scale.cpu())
    assert torch.equal(got.xq.cpu().view(torch.uint8), want.xq.cpu().view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_fp8_is_quantized_rmsnorm(device, dtype, with_residual):
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 96, generator=gen) * 3).to(dtype).to(device)
    x[2] = 0  # an all-zero row: the scale's floor, codes 0
    r = torch.randn(5, 96, generator=gen).to(dtype).to(device) if with_residual else None
    g = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype).to(device)
    rows, summed = rmsnorm_fp8(x, g, EPS, r)
    if with_residual:
        normed, want_sum = rmsnorm(x, g, EPS, residual=r)
        assert torch.equal(summed, want_sum)
    else:
        normed = rmsnorm(x, g, EPS)
        assert summed is None
    _same_rows(rows, quantize_fp8_per_token(normed))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [1024 + 40, ONE_PASS_MAX + 40])  # a ragged row in registers; one walked in blocks
def test_silu_and_mul_fp8_is_quantized_product(device, dtype, inter):
    gen = torch.Generator().manual_seed(6)
    x = (torch.randn(3, 2 * inter, generator=gen) * 2).to(dtype).to(device)
    _same_rows(silu_and_mul_fp8(x), quantize_fp8_per_token(silu_and_mul(x)))


@pytest.mark.parametrize("hidden,group", [(96, 32), (200, 64), (40, 64)])  # whole groups; a ragged last; H < group
def test_rmsnorm_fp8_groups_are_quantized_rmsnorm(device, hidden, group):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(4, hidden, generator=gen) * 3).bfloat16().to(device)
    x[1] = 0
    x[2, 5] = 4000.0  # an outlier costs only its own group precision
    r = torch.randn(4, hidden, generator=gen).bfloat16().to(device)
    g = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16().to(device)
    rows, summed = rmsnorm_fp8(x, g, EPS, r, group=group)
    normed, want_sum = rmsnorm(x, g, EPS, residual=r)
    assert torch.equal(summed, want_sum)
    _same_rows(rows, quantize_fp8_per_group_ref(normed, group))
    assert mn_major_scales(rows.scale) is rows.scale  # M-major, the layout the library GEMMs read


@pytest.mark.parametrize("inter", [1024 + 40, ONE_PASS_MAX + 40])
def test_silu_and_mul_fp8_groups_are_the_quantized_product(device, inter):
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(3, 2 * inter, generator=gen) * 2).bfloat16().to(device)
    rows = silu_and_mul_fp8(x, group=128)
    _same_rows(rows, quantize_fp8_per_group_ref(silu_and_mul(x), 128))
    assert mn_major_scales(rows.scale) is rows.scale


def test_producers_refuse_what_they_cannot_take(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="16-bit"):
        rmsnorm_fp8(x, torch.ones(8, device=device), EPS)  # float32
    with pytest.raises(ValueError, match="16-bit"):
        rmsnorm_fp8(x.bfloat16(), torch.ones(8, device=device), EPS)  # weight of another dtype
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_fp8(torch.randn(2, 7, device=device).bfloat16())
    with pytest.raises(ValueError, match="power of two"):
        silu_and_mul_fp8(torch.randn(2, 8, device=device).bfloat16(), group=24)


@pytest.mark.parametrize("blocks", [False, True], ids=["per-channel", "block-scaled"])
def test_triton_table_fuses_the_quantization(device, monkeypatch, blocks):
    """norm_linear and act_linear before an FP8 weight (per channel, or scaled per 32 x 32 block:
    its activations per token and 32 channels) equal the separate ops (the switch off) bit for
    bit, with the fusion on."""
    import llmesh.engine.model.ops_triton as ops_triton
    from llmesh.engine.model.config import ModelConfig
    from llmesh.engine.model.ops_triton import FUSED_DECODE_ENV, TritonOps, fp8_input
    from llmesh.engine.quant.packed import Fp8BlockWeight, Fp8Weight
    from tests.engine.library_dispatch import count_calls

    def fp8_weight(n: int, k: int):
        w = torch.randn(n, k, generator=gen).to(device)
        return (Fp8BlockWeight(*quantize_fp8_blocks(w, (32, 32)), (32, 32)) if blocks
                else Fp8Weight(*quantize_fp8_weight(w)))

    cfg = ModelConfig("llama", vocab_size=32, hidden_size=64, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    norm_calls = count_calls(monkeypatch, ops_triton, "rmsnorm_fp8")
    act_calls = count_calls(monkeypatch, ops_triton, "silu_and_mul_fp8")

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 64, generator=gen).bfloat16().to(device)
    r = torch.randn(3, 64, generator=gen).bfloat16().to(device)
    g = (1 + 0.1 * torch.randn(64, generator=gen)).bfloat16().to(device)
    w = fp8_weight(40, 64)
    gu = torch.randn(3, 2 * 40, generator=gen).bfloat16().to(device)
    wd = fp8_weight(24, 40)
    b = torch.randn(40, generator=gen).bfloat16().to(device)
    assert fp8_input(x, w) and not fp8_input(x.float(), w) and not fp8_input(x, [w])
    results = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(FUSED_DECODE_ENV, switch)
        ops = TritonOps(cfg, device=x.device, max_positions=64)
        y, res = ops.norm_linear(x, r, g, EPS, w, b)
        y0, res0 = ops.norm_linear(x, None, g, EPS, w)
        results[switch] = (y, res, y0, res0, ops.act_linear(gu, wd))
        assert (len(norm_calls), len(act_calls)) == ((2, 1) if switch == "1" else (0, 0))
        norm_calls.clear()
        act_calls.clear()
    for fused, plain in zip(results["1"], results["0"]):
        assert torch.equal(fused, plain)
