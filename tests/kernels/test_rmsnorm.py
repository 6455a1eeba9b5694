"""The Triton RMSNorm (with and without the fused residual add) matches layers.RMSNorm."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.model.layers import RMSNorm  # noqa: E402
from llmesh.kernels.rmsnorm import rmsnorm, rmsnorm_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # 16-bit: one rounding apart at most


def _close(got, ref, dtype):
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("shape,dtype,w_dtype", [
    ((1, 64), torch.float32, torch.float32),
    ((7, 576), torch.bfloat16, torch.bfloat16),
    ((2, 5, 576), torch.float16, torch.float16),
    ((33, 4096), torch.bfloat16, torch.float32),
    ((3, 1000), torch.float32, torch.float32),
])
@pytest.mark.parametrize("with_residual", [False, True])
def test_matches_reference(device, shape, dtype, w_dtype, with_residual):
    gen = torch.Generator().manual_seed(sum(shape) * 2 + with_residual)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(w_dtype)
    residual = torch.randn(shape, generator=gen).to(dtype) if with_residual else None
    eps = 1e-5
    ref = rmsnorm_ref(x, weight, eps, residual)

    out_dtype = torch.promote_types(dtype, w_dtype)
    out = torch.full(shape, float("nan"), dtype=out_dtype, device=device)
    res_out = torch.full(shape, float("nan"), dtype=dtype, device=device) if with_residual else None
    got = rmsnorm(x.to(device), weight.to(device), eps, None if residual is None else residual.to(device),
                  out=out, residual_out=res_out)
    if with_residual:
        assert got[0] is out and got[1] is res_out
        _close(got[0], ref[0], dtype)
        assert torch.equal(got[1].cpu(), ref[1])  # the residual sum is one rounding, same as torch
    else:
        assert got is out
        _close(got, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_model_layer(dtype):
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(576, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=gen))
    x = torch.randn(9, 576, generator=gen).to(dtype)
    with torch.no_grad():
        assert torch.equal(rmsnorm_ref(x, norm.weight, 1e-6), norm(x))


def test_rejects_bad_inputs(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight has H=32"):
        rmsnorm(x, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(x, torch.ones(64, device=device), 1e-6, residual=torch.randn(4, 64, device=device).half())
    with pytest.raises(ValueError, match="contiguous"):
        rmsnorm(x.t(), torch.ones(4, device=device), 1e-6)
