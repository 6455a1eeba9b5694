"""PyTorch's tinygemm INT4 kernel behind the measured table (services/engine/quant/int4pack.py):
the repacking of our Int4Weight into its input layout and scales, checked on the CPU against
the reference dequantization; the kernel itself and the dispatch through quant.linear on a GPU."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine.quant import int4pack
from llmesh.engine.quant.linear import prepare_library_weights
from llmesh.engine.quant.quantize import quantize_int4
from llmesh.kernels import quant_gemm_config
from tests.engine.library_dispatch import check_one_row_dispatch, count_calls, use_table


def _weight(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int4((0.05 * torch.randn(n, k, generator=gen)).to(torch.bfloat16), group)


@pytest.mark.parametrize("n,k,group", [(16, 256, 128), (24, 200, 32), (8, 64, 64)])
def test_nibbles_and_scales_rebuild_the_reference_weight(n, k, group):
    """Unpacking the [N, Kp/2] bytes (high nibble first) and applying (q - 8) * scale + zero
    gives the reference W up to bfloat16 rounding of scale and zero."""
    w = _weight(n, k, group)
    kp = w.padded_in_features
    b = int4pack.nibbles_n_by_k(w)
    assert b.dtype == torch.uint8 and b.shape == (n, kp // 2)
    q = torch.stack([b >> 4, b & 0x0F], dim=-1).reshape(n, kp).t().float()  # [Kp, N]
    sz = int4pack.scales_and_zeros(w).float()  # [Kp / G, N, 2]
    assert sz.shape == (kp // group, n, 2)
    rows = torch.arange(kp) // group
    rebuilt = (q - 8) * sz[rows, :, 0] + sz[rows, :, 1]
    want = w.dequantize()  # [K, N]
    torch.testing.assert_close(rebuilt[:k], want, rtol=0, atol=2 ** -7 * want.abs().max().item())
    exact_q = torch.cat([w.qweight & 0x0F, w.qweight >> 4], dim=0).float()
    assert torch.equal(q, exact_q)  # the codes themselves move without loss


def test_cpu_weights_stay_on_our_kernels():
    w = _weight(16, 256, 128)
    assert not int4pack.supported(w, 8)
    assert int4pack.int4pack_matmul(torch.randn(1, 256).bfloat16(), w, 8) is None
    assert prepare_library_weights([w], torch.device("cpu"), torch.bfloat16) == 0


def test_the_table_accepts_int4pack_entries():
    table = {"w4a16 4096x14336 m1": ["int4pack", [8]], "w4a16 4096x14336 m16": ["dot", [16, 16, 128, 8, 4, 3]]}
    assert quant_gemm_config.lookup(table, "w4a16", 1, 4096, 14336) == ("int4pack", (8,))
    assert quant_gemm_config.lookup(table, "w4a16", 2, 4096, 14336)[0] == "dot"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm (_weight_int4pack_mm) needs a CUDA device")


@gpu
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k,group,tiles", [(256, 512, 128, 8), (64, 384, 64, 2), (128, 1024, 32, 4),
                                             (64, 200, 32, 4)])  # K < Kp: x padded with zeros
def test_int4pack_matches_the_dequantized_reference(m, n, k, group, tiles):
    w = _weight(n, k, group, seed=m).to("cuda")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).bfloat16().cuda()
    got = int4pack.int4pack_matmul(x, w, tiles)
    want = x.float() @ w.dequantize().cuda()
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == (m, n)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@gpu
def test_linear_dispatches_to_int4pack_where_the_table_says(monkeypatch):
    w = _weight(256, 512, 128).to("cuda")
    use_table(monkeypatch, w, ["int4pack", [8]])
    calls = count_calls(monkeypatch, int4pack, "int4pack_matmul")
    assert prepare_library_weights([w], torch.device("cuda"), torch.float16) == 0  # fp16: never used
    assert prepare_library_weights([w], torch.device("cuda"), torch.bfloat16) > 0  # packed at load
    check_one_row_dispatch(w, calls)
