"""The fused MoE kernel on block-scaled E4M3 experts (the layout of block-scaled FP8 checkpoints,
one scale per 128 x 128 block in the real ones): against its torch reference on random inputs,
through the sorted blocks, the one-token path, split-K and TMA tiles; and the layouts it refuses."""

from __future__ import annotations

import pytest
import torch

from llmesh.kernels.block_fp8_gemm import quantize_fp8_blocks
from llmesh.kernels.fused_moe import fused_moe
from llmesh.kernels.fused_moe_config import MoEConfig
from llmesh.kernels.fused_moe_ref import fused_moe_ref
from tests.kernels.test_fused_moe import _experts, _routing


def _block_experts(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked float experts [E, N, K] → (E4M3 codes [E, N, K], scales [E, N / BN, K / BK])."""
    parts = [quantize_fp8_blocks(one, block) for one in w]
    return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])


# I = 96: with 64-wide blocks the down GEMM's K ends inside a block; H = 200 does so for gate/up.
@pytest.mark.parametrize("t,k,h,dtype,block,config", [
    (21, 2, 200, torch.float32, (32, 64), MoEConfig(16, 32, 32)),            # K steps of 32 in 64-wide blocks
    (21, 2, 192, torch.bfloat16, (32, 32), MoEConfig(16, 32, 64)),           # block_k cut to the block's 32
    (1, 4, 200, torch.bfloat16, (32, 64), MoEConfig(16, 32, 32)),            # one token: pair blocks, slot sum
    (9, 2, 200, torch.float32, (16, 64), MoEConfig(16, 64, 32, split_k=3)),  # split-K; tiles wider than BN
    (9, 2, 192, torch.bfloat16, (32, 64), MoEConfig(16, 32, 32, weight_tma=1)),  # weight tiles through TMA
])
def test_block_scaled_experts_match_the_reference(fp8_device, t, k, h, dtype, block, config):
    if config.weight_tma and fp8_device.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper GPU")
    gen = torch.Generator().manual_seed(t * 10 + k)
    e, inter = 8, 96
    x = torch.randn(t, h, generator=gen).to(dtype)
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    q13, s13 = _block_experts(w13, block)
    q2, s2 = _block_experts(w2, block)
    weights, ids = _routing(t, e, k, gen)
    quant = dict(w13_scale=s13, w2_scale=s2, weight_block=block)
    ref = fused_moe_ref(x, q13, q2, weights.to(dtype), ids, **quant)
    dev = {n: v.to(fp8_device) if isinstance(v, torch.Tensor) else v for n, v in quant.items()}
    got = fused_moe(x.to(fp8_device), q13.to(fp8_device), q2.to(fp8_device), weights.to(dtype).to(fp8_device),
                    ids.to(fp8_device), config=config, down_config=config, **dev).cpu()
    # The reference rounds each dequantized weight to the activation dtype; the kernel scales exact sums.
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    full = fused_moe_ref(x.float(), w13, w2, weights, ids)  # and FP8 blocks stay near the float experts
    assert float((ref.float() - full).norm() / full.norm()) < 0.1


def test_block_layouts_that_cannot_run_are_named(fp8_device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 64, generator=gen)
    w13, w2 = _experts(4, 64, 48, torch.float32, gen)
    weights, ids = _routing(3, 4, 2, gen)
    q13, s13 = _block_experts(w13, (16, 32))
    q2, s2 = _block_experts(w2, (16, 32))
    args = [v.to(fp8_device) for v in (x, q13, q2, weights, ids)]
    with pytest.raises(ValueError, match="multiple of the block's 32 rows"):  # I = 48: gate/up split a block
        fused_moe(*args, w13_scale=s13.to(fp8_device), w2_scale=s2.to(fp8_device), weight_block=(32, 32))
    with pytest.raises(ValueError, match="w2_scale has shape"):
        fused_moe(*args, w13_scale=s13.to(fp8_device), w2_scale=s2[:, :1].contiguous().to(fp8_device),
                  weight_block=(16, 32))
    with pytest.raises(ValueError, match="two powers of two"):
        fused_moe(*args, w13_scale=s13.to(fp8_device), w2_scale=s2.to(fp8_device), weight_block=(16, 24))


def test_block_scaled_experts_in_the_sorted_layout_give_the_same_bits(fp8_device):
    """The down GEMM of block-scaled experts in the sorted hidden layout (a_tma), warp-specialized
    and persistent: its block scales per K step as in the gathered layout, so the same bits."""
    if fp8_device.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper GPU")
    gen = torch.Generator().manual_seed(95)
    t, k, e, h, inter, block = 9, 2, 8, 192, 96, (32, 64)
    x = torch.randn(t, h, generator=gen).bfloat16()
    w13, w2 = _experts(e, h, inter, torch.float32, gen)
    (q13, s13), (q2, s2) = _block_experts(w13, block), _block_experts(w2, block)
    weights, ids = _routing(t, e, k, gen)
    args = [v.to(fp8_device) for v in (x, q13, q2, weights.bfloat16(), ids)]
    quant = dict(w13_scale=s13.to(fp8_device), w2_scale=s2.to(fp8_device), weight_block=block)
    up = MoEConfig(16, 32, 32, weight_tma=1)
    want = fused_moe(*args, config=up, down_config=MoEConfig(16, 32, 64, weight_tma=1), **quant).cpu()
    for down in (MoEConfig(16, 32, 64, weight_tma=1, a_tma=1), MoEConfig(16, 32, 64, weight_tma=1, a_tma=1,
                                                                         warp_spec=1, group_m=2),
                 MoEConfig(16, 32, 64, weight_tma=1, a_tma=1, warp_spec=1, persistent=1)):
        assert torch.equal(fused_moe(*args, config=up, down_config=down, **quant).cpu(), want), down
