"""The fused MoE GEMMs' GEMV form (MoEConfig.block_m 1: fused_moe_dense.py, fused_moe_int4.py)
against the torch reference and against the 16-row tile form, on random inputs: the one-token
path (pair blocks, the down GEMM summing the k rows), sorted blocks of one pair, split-K, column
tiles narrower than 16, INT8 / FP8 / block-scaled / INT4 experts, TMA tiles; and the configs it
refuses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmesh.engine.model.moe import quantize_experts_fp8, quantize_experts_int8
from llmesh.kernels.fused_moe import fused_moe
from llmesh.kernels.fused_moe_config import (CANDIDATES, GEMV_CANDIDATES, INT4_CANDIDATES, INT4_GEMV_CANDIDATES,
                                             MoEConfig)
from llmesh.kernels.fused_moe_ref import fused_moe_ref
from tests.kernels.test_fused_moe import _experts, _int4_experts, _routing
from tests.kernels.test_fused_moe_blocks import _block_experts
from tests.kernels.test_fused_moe_tma import _experts_as

TILE = MoEConfig(16, 32, 32)


def _run(device, x, w13, w2, weights, ids, config, down=None, **quant):
    dev = {n: v.to(device) if isinstance(v, torch.Tensor) else v for n, v in quant.items()}
    return fused_moe(x.to(device), w13.to(device), w2.to(device), weights.to(device), ids.to(device),
                     config=config, down_config=down or config, **dev).cpu()


# H = 200 and I = 50: K steps past the end of both GEMMs' rows, column tiles past I and H.
@pytest.mark.parametrize("t,k,config", [
    (1, 8, MoEConfig(1, 4, 64, 4, 1)),              # one token: pair blocks, the k rows summed by the down GEMM
    (1, 4, MoEConfig(1, 16, 128, 4, 3)),            # a K step longer than the gate/up GEMM's whole K
    (1, 8, MoEConfig(1, 8, 64, 4, 2, split_k=3)),   # split-K: the last piece to arrive runs the epilogue
    (3, 2, MoEConfig(1, 8, 32, 4, 2)),              # sorted blocks of one pair (the align step at BLOCK_M 1)
    (9, 2, MoEConfig(1, 32, 64, 8, 2, split_k=2)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_form_matches_the_reference_and_the_tiles(device, t, k, config, dtype):
    gen = torch.Generator().manual_seed(t * 10 + k + config.block_n)
    e, h, inter = 16, 200, 50
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, dtype, gen)
    weights, ids = _routing(t, e, k, gen)
    weights = weights.to(dtype)
    ref = fused_moe_ref(x, w13, w2, weights, ids)
    tiles = _run(device, x, w13, w2, weights, ids, TILE)
    for _ in range(2):  # the second call finds the arrival counters reset
        got = _run(device, x, w13, w2, weights, ids, config)
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # float32 sums in another order than tl.dot's
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(got, tiles, atol=tol, rtol=tol)


@pytest.mark.parametrize("fmt,t,split,tma", [("bf16", 1, 1, False), ("fp32", 3, 3, False), ("int8", 1, 2, False),
                                            ("fp8block", 5, 1, False), ("bf16", 1, 1, True)])
def test_gemv_prefetch_gives_the_same_bits(device, fmt, t, split, tma):
    """num_stages 2 in the GEMV form loads each K step's weight tiles a step ahead: the same
    products in the same order, so the unprefetched form's bits, through split-K pieces (the last
    step's prefetch masked to the piece), block scales and TMA tiles."""
    if fmt == "fp8block" and device.type == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("E4M3 needs sm_89 or newer")
    if tma and device.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper GPU")
    gen = torch.Generator().manual_seed(40 + t + split)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    args, quant = _experts_as("dense" if fmt in ("bf16", "fp32") else fmt, dtype, device, gen, t=t, e=8, k=4,
                              h=192, inter=64, skew=False)
    plain = MoEConfig(1, 8, 64 if tma else 32, 4, 1, split_k=split, weight_tma=int(tma))
    want = fused_moe(*args, **quant, config=plain, down_config=plain).cpu()
    ahead = dataclasses.replace(plain, num_stages=2)
    assert torch.equal(fused_moe(*args, **quant, config=ahead, down_config=ahead).cpu(), want)


@pytest.mark.parametrize("t,k,split,block_k", [(1, 8, 1, 32), (1, 4, 3, 64), (5, 2, 2, 128), (3, 2, 1, 64)])
def test_int4_gemv_prefetch_gives_the_same_bits(device, t, k, split, block_k):
    """INT4 experts' GEMV form at num_stages 2 loads each K step's codes a step ahead: the same FMAs
    in the same order, so the unprefetched form's bits, through split-K pieces of the code rows
    (the last step's prefetch masked to its piece; 3 pieces of 128 rows in 64-row steps leave one
    piece empty) and T = 1's slot sum."""
    gen = torch.Generator().manual_seed(60 + t * 10 + split)
    e, h, inter = 16, 200, 96
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    c13, c2, quant = _int4_experts(w13, w2)
    weights, ids = _routing(t, e, k, gen)
    weights = weights.to(torch.bfloat16)
    plain = MoEConfig(1, 32, block_k, 4, 1, split_k=split)
    want = _run(device, x, c13, c2, weights, ids, plain, **quant).cpu()
    ahead = dataclasses.replace(plain, num_stages=2)
    assert torch.equal(_run(device, x, c13, c2, weights, ids, ahead, **quant).cpu(), want)


def test_gemv_form_skips_pairs_of_another_ranks_experts(device):
    """Expert parallelism: pairs routed to experts this rank does not hold (id -1) add nothing,
    in the one-token path (slot sum) and in sorted blocks."""
    gen = torch.Generator().manual_seed(17)
    e, k, h, inter = 8, 4, 64, 32
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    for t in (1, 5):
        x = torch.randn(t, h, generator=gen)
        weights, ids = _routing(t, e, k, gen)
        ids[0, 1] = -1
        ids[-1, 3] = -1
        ref = fused_moe_ref(x, w13, w2, torch.where(ids < 0, 0.0, weights), ids.clamp(min=0))
        got = _run(device, x, w13, w2, weights, ids, MoEConfig(1, 8, 32, 4, 2))
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantize", [quantize_experts_int8, quantize_experts_fp8], ids=["int8", "fp8"])
@pytest.mark.parametrize("t", [1, 6])
def test_gemv_form_runs_per_channel_quantized_experts(device, quantize, t):
    gen = torch.Generator().manual_seed(23 + t)
    e, k, h, inter = 8, 2, 96, 40
    x = torch.randn(t, h, generator=gen)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    q13, s13 = quantize(w13)
    q2, s2 = quantize(w2)
    weights, ids = _routing(t, e, k, gen)
    quant = dict(w13_scale=s13, w2_scale=s2)
    ref = fused_moe_ref(x, q13, q2, weights, ids, **quant)
    got = _run(device, x, q13, q2, weights, ids, MoEConfig(1, 8, 32, 4, 2, split_k=2), **quant)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t,k,config", [
    (1, 8, MoEConfig(1, 32, 32, 4, 1)),             # one token: pair blocks, the k rows summed by the down GEMM
    (1, 4, MoEConfig(1, 16, 64, 4, 1, split_k=3)),  # split-K over the code rows
    (5, 2, MoEConfig(1, 64, 128, 8, 1)),            # sorted blocks of one pair; a K step of a whole group
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gemv_form_matches_the_reference_and_the_tiles(device, t, k, config, dtype):
    """INT4 experts (the halves layout, groups of 128; H = 200 pads to 256, I = 96 to 128) in the
    GEMV form: each code widened exactly, its group's scale and min applied in float32."""
    gen = torch.Generator().manual_seed(50 + t * 10 + k)
    e, h, inter = 16, 200, 96
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    c13, c2, quant = _int4_experts(w13, w2)
    weights, ids = _routing(t, e, k, gen)
    weights = weights.to(dtype)
    if t == 1:
        ids[0, 1] = -1  # a pair of another rank's expert adds nothing
    kept = torch.where(ids < 0, 0.0, weights.float()).to(dtype)
    ref = fused_moe_ref(x, c13, c2, kept, ids.clamp(min=0), **quant)
    tiles = _run(device, x, c13, c2, weights, ids, MoEConfig(16, 32, 64), **quant)
    for _ in range(2):  # the second call finds the arrival counters reset
        got = _run(device, x, c13, c2, weights, ids, config, **quant)
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(got, tiles, atol=tol, rtol=tol)


@pytest.mark.parametrize("t,block,config", [
    (1, (32, 64), MoEConfig(1, 8, 32, 4, 2)),            # K steps of 32 in 64-wide blocks; one token
    (5, (16, 32), MoEConfig(1, 4, 32, 4, 1, split_k=2)),  # column tiles inside a row block; split-K
])
def test_gemv_form_runs_block_scaled_experts(fp8_device, t, block, config):
    gen = torch.Generator().manual_seed(31 + t)
    e, k, h, inter = 8, 2, 200, 96
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    q13, s13 = _block_experts(w13, block)
    q2, s2 = _block_experts(w2, block)
    weights, ids = _routing(t, e, k, gen)
    weights = weights.to(torch.bfloat16)
    quant = dict(w13_scale=s13, w2_scale=s2, weight_block=block)
    ref = fused_moe_ref(x, q13, q2, weights, ids, **quant)
    got = _run(fp8_device, x, q13, q2, weights, ids, config, **quant)
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
    tiles = _run(fp8_device, x, q13, q2, weights, ids, TILE, **quant)
    torch.testing.assert_close(got, tiles, atol=2e-2, rtol=2e-2)


def test_gemv_form_through_tma_tiles_gives_the_pointer_loads_bits(device):
    """weight_tma with the GEMV form: the [BLOCK_N, BLOCK_K] weight tiles through a descriptor over
    the stacked experts (a gate tile past I reads up rows, K past H zeros) equal the pointer loads."""
    from llmesh.kernels.fused_moe import weight_tma_supported

    gen = torch.Generator().manual_seed(43)
    t, e, k, h, inter = 3, 4, 2, 208, 80
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    w13, w2 = _experts(e, h, inter, torch.bfloat16, gen)
    weights, ids = _routing(t, e, k, gen)
    weights = weights.to(torch.bfloat16)
    if not (weight_tma_supported(w13.to(device)) and weight_tma_supported(w2.to(device))):
        pytest.skip("no TMA on this GPU (compute capability < 9)")
    plain = MoEConfig(1, 8, 64, 4, 2)
    want = _run(device, x, w13, w2, weights, ids, plain)
    got = _run(device, x, w13, w2, weights, ids, MoEConfig(1, 8, 64, 4, 2, weight_tma=1))
    assert torch.equal(got, want)


def test_configs_the_gemv_form_refuses_are_named(device):
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        MoEConfig(16, 8, 32)  # narrow column tiles are the GEMV form's only
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        MoEConfig(2, 8, 32)
    with pytest.raises(ValueError, match="block_n must be a power of two >= 1"):
        MoEConfig(1, 6, 32)
    assert MoEConfig(1, 4, 32).gemv and not TILE.gemv
    with pytest.raises(ValueError, match="at most 256 elements a side"):
        MoEConfig(1, 8, 512, weight_tma=1)  # the GEMV form's long K steps are pointer loads only
    from llmesh.kernels.fused_moe_config import fit_shared_memory

    wide = MoEConfig(1, 32, 1024, 8, 3)  # the GEMV form's prefetch is in registers: nothing to fit
    assert fit_shared_memory(wide, 1, 2, 2, gated=True, int4=False) == wide
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, generator=gen)
    w13, w2 = _experts(4, 64, 32, torch.float32, gen)
    weights, ids = _routing(2, 4, 2, gen)
    with pytest.raises(ValueError, match="give both block_m 1 or neither"):
        _run(device, x, w13, w2, weights, ids, TILE, MoEConfig(1, 8, 32))
    # a tile down config runs as the GEMV form behind a GEMV gate/up (the down GEMM takes its blocks)
    mixed = _run(device, x, w13, w2, weights, ids, MoEConfig(1, 8, 32), TILE)
    torch.testing.assert_close(mixed, fused_moe_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


def test_the_sweep_holds_gemv_candidates_for_one_pair_an_expert():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from moe_shapes import QWEN3_30B_A3B as s  # 128 experts, top-8
    from moe_autotune import tune_candidates

    assert GEMV_CANDIDATES and all(c.gemv for c in GEMV_CANDIDATES)
    assert set(GEMV_CANDIDATES) <= set(CANDIDATES)
    one = tune_candidates(1, s, smoke=False)  # 8 pairs over 128 experts
    assert {c for c in one if c.gemv} == set(GEMV_CANDIDATES) and any(not c.gemv for c in one)
    assert not any(c.gemv for c in tune_candidates(64, s, smoke=False))  # 4 pairs an expert: tiles only
    int4 = tune_candidates(1, s, smoke=False, weights="int4")
    assert {c for c in int4 if c.gemv} == set(INT4_GEMV_CANDIDATES) <= set(INT4_CANDIDATES)
    assert not any(c.gemv for c in tune_candidates(64, s, smoke=False, weights="int4"))
