"""GemLite's kernels behind the measured table (services/engine/quant/gemlite_kernels.py): the
codes handed to its packer rebuild our weights exactly (CPU); each of its decode kernels
against the dequantized reference, and the dispatch through quant.linear, on a GPU with
gemlite installed (the ``gpu`` extra)."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.quant import gemlite_kernels
from llmesh.engine.quant.linear import prepare_library_weights
from llmesh.engine.quant.quantize import quantize_int4, quantize_int8
from llmesh.kernels import quant_gemm_config
from tests.engine.library_dispatch import check_one_row_dispatch, count_calls, use_table


def _int4(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int4((0.05 * torch.randn(n, k, generator=gen)).to(torch.bfloat16), group)


def _int8(n: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int8((0.05 * torch.randn(n, k, generator=gen)).to(torch.bfloat16))


@pytest.mark.parametrize("n,k,group", [(16, 256, 128), (24, 200, 32), (8, 64, 64)])
def test_int4_codes_and_our_scales_rebuild_the_reference_weight(n, k, group):
    """gemlite's fma mode computes q * scale + zero over [N, Kp] codes: with our scales and
    mins that is the reference weight (up to the dtype rounding of scale and zero)."""
    w = _int4(n, k, group)
    codes = gemlite_kernels._codes_n_by_k(w)
    assert codes.dtype == torch.uint8 and codes.shape == (n, w.padded_in_features)
    rows = torch.arange(w.padded_in_features) // group
    rebuilt = codes.t().float() * w.scales.float()[rows] + w.mins.float()[rows]  # [Kp, N]
    torch.testing.assert_close(rebuilt[:k], w.dequantize(), rtol=0, atol=1e-6)


def test_int8_codes_are_shifted_by_128():
    w = _int8(32, 64)
    codes = gemlite_kernels._codes_n_by_k(w)
    assert codes.dtype == torch.uint8 and codes.shape == (32, 64)
    assert torch.equal(codes.t().to(torch.int16) - 128, w.qweight.to(torch.int16))


def test_formats_it_was_not_checked_at_stay_on_our_kernels():
    """The table's key has no group size: INT4 groups and grouped INT8 that no GPU test has
    covered must not reach gemlite through an entry measured at another group."""
    assert gemlite_kernels.format_supported(_int4(16, 256, 128), torch.bfloat16)
    assert gemlite_kernels.format_supported(_int4(16, 256, 64), torch.float16)
    assert not gemlite_kernels.format_supported(_int4(16, 256, 32), torch.bfloat16)
    assert gemlite_kernels.format_supported(_int8(16, 256), torch.bfloat16)
    w = _int8(16, 256)
    grouped = type(w)(w.qweight, w.scales.expand(4, 16).contiguous(), group_size=64)  # four 64-row groups
    assert not gemlite_kernels.format_supported(grouped, torch.bfloat16)
    assert not gemlite_kernels.format_supported(w, torch.float32)


def test_cpu_weights_stay_on_our_kernels():
    w = _int4(16, 256, 128)
    assert not gemlite_kernels.supported(w, torch.bfloat16)
    assert gemlite_kernels.gemlite_matmul(torch.randn(1, 256).bfloat16(), w, "GEMV_REVSPLITK") is None
    assert prepare_library_weights([w], torch.device("cpu"), torch.bfloat16) == 0


def test_the_table_accepts_gemlite_entries():
    table = {"w4a16 4096x14336 m1": ["gemlite", ["GEMV_REVSPLITK"]],
             "w4a16 4096x14336 m16": ["gemlite", ["GEMM_SPLITK"]]}
    assert quant_gemm_config.lookup(table, "w4a16", 1, 4096, 14336) == ("gemlite", ("GEMV_REVSPLITK",))
    assert quant_gemm_config.lookup(table, "w4a16", 9, 4096, 14336) == ("gemlite", ("GEMM_SPLITK",))


gpu = pytest.mark.skipif(gemlite_kernels.unavailable_reason() is not None,
                         reason=str(gemlite_kernels.unavailable_reason()))
_M_TYPES = [(1, "GEMV"), (1, "GEMV_REVSPLITK"), (1, "GEMV_SPLITK"), (4, "GEMM_SPLITK"), (16, "GEMM_SPLITK")]
# Every kernel on a small shape; on the 8B shape (each case autotunes, seconds apiece) the M = 1
# GEMVs, whose many K-split atomics are where bfloat16 accumulation drifted.
_INT4_CASES = ([(m, t, 512, 1024, 64) for m, t in _M_TYPES]
               + [(1, t, 14336, 4096, 128) for t in ("GEMV", "GEMV_REVSPLITK")])
_INT8_CASES = [(m, t, 256, 1024) for m, t in _M_TYPES] + [(1, t, 14336, 4096) for t in ("GEMV", "GEMV_REVSPLITK")]


@gpu
@pytest.mark.parametrize("m,matmul_type,n,k,group", _INT4_CASES)
def test_int4_kernels_match_the_dequantized_reference(m, matmul_type, n, k, group):
    w = _int4(n, k, group, seed=m).to("cuda")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
    got = gemlite_kernels.gemlite_matmul(x, w, matmul_type)
    want = x.float() @ w.dequantize().cuda()
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@gpu
@pytest.mark.parametrize("m,matmul_type,n,k", _INT8_CASES)
def test_int8_kernels_match_the_dequantized_reference(m, matmul_type, n, k):
    w = _int8(n, k, seed=m).to("cuda")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
    got = gemlite_kernels.gemlite_matmul(x, w, matmul_type)
    want = x.float() @ w.dequantize().float().cuda()
    assert got is not None and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


@gpu
def test_linear_dispatches_to_gemlite_where_the_table_says(monkeypatch):
    w = _int4(256, 512, 128).to("cuda")
    use_table(monkeypatch, w, ["gemlite", ["GEMV_REVSPLITK"]])
    calls = count_calls(monkeypatch, gemlite_kernels, "gemlite_matmul")
    assert prepare_library_weights([w], torch.device("cuda"), torch.bfloat16) > 0  # the copy is made at load
    assert gemlite_kernels.layer(w, torch.bfloat16) is gemlite_kernels.layer(w, torch.bfloat16)  # made once
    check_one_row_dispatch(w, calls)
