"""The Triton SiLU-and-mul matches silu(gate) * up as the torch MLP computes it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # 16-bit: one rounding apart at most


@pytest.mark.parametrize("shape,dtype", [
    ((1, 2 * 64), torch.float32),
    ((7, 2 * 1536), torch.bfloat16),
    ((2, 3, 2 * 100), torch.float16),
    ((17, 2 * 2500), torch.float32),
])
def test_matches_reference(device, shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 4).to(dtype)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)
    got = silu_and_mul(x.to(device), out=out)
    assert got is out
    ref = silu_and_mul_ref(x)
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_matches_the_unfused_mlp_activation():
    gen = torch.Generator().manual_seed(5)
    gate, up = torch.randn(5, 96, generator=gen), torch.randn(5, 96, generator=gen)
    expect = torch.nn.functional.silu(gate) * up  # SiluAndMulMLP's expression
    assert torch.equal(silu_and_mul_ref(torch.cat([gate, up], -1)), expect)


def test_rejects_bad_inputs(device):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(3, 5, device=device))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.ones(3, 4, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="out must have shape"):
        silu_and_mul(torch.randn(3, 8, device=device), out=torch.empty(3, 8, device=device))
