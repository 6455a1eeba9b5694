"""The fused MoE kernel's TMA paths against its pointer loads: the weight tiles through a
descriptor over the stacked experts (weight_tma), and the sorted hidden layout whose down GEMM
reads whole activation tiles through one (a_tma), in a warp-specialized K loop (warp_spec).
Same tiles, same sums: bit for bit the gathered layout's output."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmesh.engine.model.moe import quantize_experts_fp8, quantize_experts_int8
from llmesh.kernels.fused_moe import fused_moe, weight_tma_supported
from llmesh.kernels.fused_moe_config import MoEConfig
from llmesh.kernels.fused_moe_ref import fused_moe_ref
from tests.kernels.test_fused_moe import _dense_or_int4, _experts, _routing
from tests.kernels.test_fused_moe_blocks import _block_experts


def _experts_as(fmt: str, dtype, device, gen, t: int, e: int, k: int, h: int, inter: int, skew: bool = True):
    """(fused_moe's positional arguments, quantization keywords) on ``device`` for experts in
    ``fmt``: float in ``dtype``, "int8" / "fp8" codes with per-channel scales, or "fp8block" (E4M3
    in 32 x 64 blocks)."""
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    weights, ids = _routing(t, e, k, gen, skew=skew)
    quant = {}
    if fmt == "dense":
        w13, w2 = w13.to(dtype), w2.to(dtype)
    elif fmt == "fp8block":
        (w13, s13), (w2, s2) = _block_experts(w13, (32, 64)), _block_experts(w2, (32, 64))
        quant = dict(w13_scale=s13.to(device), w2_scale=s2.to(device), weight_block=(32, 64))
    else:
        quantize = quantize_experts_int8 if fmt == "int8" else quantize_experts_fp8
        w13, s13 = quantize(w13)
        w2, s2 = quantize(w2)
        quant = dict(w13_scale=s13.to(device), w2_scale=s2.to(device))
    return [v.to(device) for v in (x, w13, w2, weights.to(dtype), ids)], quant


@pytest.mark.parametrize("fmt,dtype,split,group_m", [("dense", torch.bfloat16, 1, 0), ("dense", torch.float32, 2, 0),
                                                     ("dense", torch.bfloat16, 1, 2), ("int8", torch.bfloat16, 1, 0),
                                                     ("fp8", torch.bfloat16, 3, 1)])
def test_weight_tma_loads_the_same_tiles(device, fmt, dtype, split, group_m):
    """weight_tma: the weight tiles through a TMA descriptor over the stacked experts give the
    pointer loads' output bit for bit: a gate tile past I reads up rows and the last tiles rows
    of the next expert or past the end (zeros), all in columns the store masks; K past H or I
    reads zeros (H 208 and I 80 are not multiples of the 64-wide K steps; rows of 16-byte multiples,
    as TMA asks)."""
    gen = torch.Generator().manual_seed(70 + split)
    args, quant = _experts_as(fmt, dtype, device, gen, t=21, e=4, k=2, h=208, inter=80)
    if not (weight_tma_supported(args[1]) and weight_tma_supported(args[2])):
        pytest.skip("no TMA on this GPU (compute capability < 9)")
    plain = MoEConfig(block_m=16, block_n=32, block_k=64, split_k=split, group_m=group_m)
    tma = MoEConfig(block_m=16, block_n=32, block_k=64, split_k=split, group_m=group_m, weight_tma=1)
    want = fused_moe(*args, **quant, config=plain, down_config=plain, align_path="torch").cpu()
    got = fused_moe(*args, **quant, config=tma, down_config=tma, align_path="torch").cpu()
    if dtype == torch.float32:  # float32 dots: the interpreter's matmul sums a transposed tile in another order
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(got, want)
    ref = fused_moe_ref(*[v.cpu() for v in args], **{n: v.cpu() for n, v in quant.items()})
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_weight_tma_is_refused_where_it_cannot_run():
    codes = torch.zeros(2, 8, 32, dtype=torch.uint8)  # INT4 codes: laid out by K halves
    assert not weight_tma_supported(codes)
    assert not weight_tma_supported(torch.zeros(2, 32, 64)[:, :, :60])  # rows not a multiple of 16 bytes
    with pytest.raises(ValueError, match="weight_tma"):
        MoEConfig(16, 32, 32, weight_tma=2)


@pytest.mark.parametrize("fmt,dtype,t,ep,up_split,token_sum", [
    ("dense", torch.bfloat16, 21, False, 1, False), ("dense", torch.float32, 37, True, 2, False),
    ("int8", torch.bfloat16, 9, True, 1, True), ("fp8", torch.bfloat16, 1, False, 1, False),
    ("dense", torch.bfloat16, 30, False, 3, True)])
def test_sorted_hidden_through_tma_gives_the_gathered_layouts_bits(device, fmt, dtype, t, ep, up_split, token_sum):
    """a_tma: the gate/up GEMM writes every sorted row (split-K's last split too; padding rows as
    zeros, other ranks' blocks left unwritten and unread), and the down GEMM reads whole tiles
    through a descriptor (rows past the padded length and K past I as zeros), in a warp-specialized
    loop or not, summing the top k after itself or not, or as a persistent kernel walking the live
    tiles (in grouped order or blocks fastest): the gathered layout's output bit for bit.
    T = 1 runs the one-pair blocks (no align launch); I 80 is not a multiple of the K steps."""
    gen = torch.Generator().manual_seed(80 + t)
    args, quant = _experts_as(fmt, dtype, device, gen, t=t, e=8, k=4, h=96, inter=80)
    if ep:
        args[4][::3, 1:3] = -1  # pairs of another rank's experts
    if not (weight_tma_supported(args[1]) and weight_tma_supported(args[2])):
        pytest.skip("no TMA on this GPU (compute capability < 9)")
    up = MoEConfig(block_m=16, block_n=32, block_k=32, split_k=up_split, weight_tma=1)
    down = MoEConfig(block_m=16, block_n=32, block_k=64, group_m=2, weight_tma=1)
    want = fused_moe(*args, **quant, config=up, down_config=down, token_sum=token_sum).cpu()
    for tiles in (dataclasses.replace(down, a_tma=1), dataclasses.replace(down, a_tma=1, warp_spec=1),
                  dataclasses.replace(down, a_tma=1, persistent=1), dataclasses.replace(down, a_tma=1, persistent=2,
                                                                                         warp_spec=1, group_m=0)):
        got = fused_moe(*args, **quant, config=up, down_config=tiles, token_sum=token_sum).cpu()
        assert torch.equal(got, want)
    ref = fused_moe_ref(*[v.cpu() for v in args], **{n: v.cpu() for n, v in quant.items()})
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_a_tma_and_warp_spec_are_refused_where_they_cannot_run(device):
    with pytest.raises(ValueError, match="warp_spec needs a_tma and weight_tma"):
        MoEConfig(64, 64, 64, a_tma=1, warp_spec=1)
    with pytest.raises(ValueError, match="warp_spec takes tiles of at most 64 rows"):
        MoEConfig(128, 128, 64, 4, 3, a_tma=1, weight_tma=1, warp_spec=1)  # hung an H100 (Triton 3.6)
    MoEConfig(128, 128, 64, 4, 3, a_tma=1, weight_tma=1)  # the same tile without it runs
    with pytest.raises(ValueError, match="a_tma reads"):
        MoEConfig(1, 16, 256, a_tma=1)  # the GEMV form reads one row a program
    with pytest.raises(ValueError, match="persistent needs a_tma"):
        MoEConfig(64, 64, 64, weight_tma=1, persistent=1)
    with pytest.raises(ValueError, match="programs per SM"):
        MoEConfig(64, 64, 64, a_tma=1, weight_tma=1, persistent=8)
    gen = torch.Generator().manual_seed(90)
    x = torch.randn(5, 64, generator=gen)
    w13, w2 = _experts(4, 64, 32, torch.float32, gen)
    weights, ids = _routing(5, 4, 2, gen)
    tiles = MoEConfig(16, 32, 32, a_tma=1)
    with pytest.raises(ValueError, match="persistent are the down GEMM's"):
        fused_moe(*[v.to(device) for v in (x, w13, w2, weights, ids)], config=tiles, down_config=tiles)
    args, quant = _dense_or_int4("int4", torch.float32, device, x, w13, w2, weights, ids)
    with pytest.raises(ValueError, match="INT4 experts"):
        fused_moe(*args, **quant, config=MoEConfig(16, 32, 32), down_config=tiles)


class _WarpSpecRefusingKernel:
    """A stand-in for a Triton kernel that a Triton version cannot warp-specialize (3.9's pass
    fails at 128 rows and 4 warps, which MoEConfig now refuses; another version may fail another
    tile): its pass fails at compile, which only a GPU reaches, so the dispatch rule is checked
    here on what each launch was asked for."""

    def __init__(self, error: str = "PassManager::run failed") -> None:
        self.launches: list[bool] = []
        self.error = error

    def __getitem__(self, grid):
        def launch(*operands, WARP_SPEC: bool, **kwargs):
            self.launches.append(WARP_SPEC)
            if WARP_SPEC:
                raise RuntimeError(self.error)
        return launch


def test_a_tile_triton_cannot_warp_specialize_falls_back_once(caplog):
    """The plain loop runs in its place, logged once; later launches of that config skip the try;
    another config still tries; a launch not asked to warp-specialize runs once, plainly; any other
    error propagates."""
    from llmesh.kernels import fused_moe as fm

    kernel, other = _WarpSpecRefusingKernel(), _WarpSpecRefusingKernel()
    big = MoEConfig(64, 128, 64, 4, 3, a_tma=1, weight_tma=1, warp_spec=1)
    small = dataclasses.replace(big, block_m=32)
    try:
        with caplog.at_level("WARNING", logger=fm.log.name):
            fm._launch_warp_spec(kernel, (1,), (), {}, True, big)
            fm._launch_warp_spec(kernel, (1,), (), {}, True, big)
        assert kernel.launches == [True, False, False]
        assert sum("cannot warp-specialize" in r.getMessage() for r in caplog.records) == 1
        fm._launch_warp_spec(kernel, (1,), (), {}, True, small)  # another tile: tried again
        assert kernel.launches[3:] == [True, False]
        fm._launch_warp_spec(other, (1,), (), {}, False, big)  # not asked: one plain launch
        assert other.launches == [False]
        with pytest.raises(RuntimeError, match="out of resources"):
            fm._launch_warp_spec(_WarpSpecRefusingKernel("out of resources"), (1,), (), {}, True, big)
    finally:
        fm._warp_spec_refused.difference_update({(kernel, big), (kernel, small)})
