"""The MoE entry in one launch (llmesh/kernels/moe_norm_router.py) against the three ops it fuses:
x + residual exactly as rmsnorm's, the normalised row within one ulp of it, the logits within a
GEMM's rounding of the reference's, and the choice bit for bit moe_router.topk_softmax's of the
logits it returns (the same code, run by each token's last program to arrive)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.moe_norm_router import NormRouterConfig, default_config, norm_router  # noqa: E402
from llmesh.kernels.moe_router import topk_softmax, topk_softmax_ref  # noqa: E402
from llmesh.kernels.rmsnorm import rmsnorm_ref  # noqa: E402


def _inputs(t: int, h: int, e: int, dtype: torch.dtype, seed: int, residual: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen).to(dtype)
    r = torch.randn(t, h, generator=gen).to(dtype) if residual else None
    g = (1 + 0.1 * torch.randn(h, generator=gen)).to(dtype)
    router = (torch.randn(e, h, generator=gen) / h ** 0.5 * 4).to(dtype)
    return x, r, g, router


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in units of the last place of their dtype."""
    if a.dtype == torch.float32:
        return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())
    return int((a.view(torch.int16).long() - b.view(torch.int16).long()).abs().max())


@pytest.mark.parametrize("t,h,e,k,config", [
    (1, 256, 128, 8, None),                                 # Qwen3-MoE's router shape, one token
    (3, 200, 60, 4, NormRouterConfig(block_e=8, block_h=64)),  # H past the last chunk; E not a power of 2
    (5, 96, 8, 2, NormRouterConfig(block_e=2, block_h=32)),    # Mixtral's 8 experts, top-2
    (2, 64, 6, 6, NormRouterConfig(block_e=16, block_h=64)),   # one slice wider than E; every expert chosen
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("residual", [True, False])
def test_matches_the_three_ops(device, t, h, e, k, config, dtype, residual):
    x, r, g, router = _inputs(t, h, e, dtype, seed=t * 100 + e + k, residual=residual)
    renorm = k % 4 == 0
    weights_dtype = torch.float32 if e == 8 else dtype
    dev = [v.to(device) if v is not None else None for v in (x, r, g, router)]
    counts = torch.zeros(e, dtype=torch.int64, device=device)
    counted = torch.tensor([1] * (t - 1) + [0], dtype=torch.int64, device=device)  # the last row: padding
    out, res, logits, weights, ids = norm_router(dev[0], dev[1], dev[2], 1e-6, dev[3], k, renorm, weights_dtype,
                                                 counts, counted, config=config)
    want = rmsnorm_ref(x, g, 1e-6, r)
    want_h, want_s = want if residual else (want, x)
    assert torch.equal(res.cpu(), want_s)  # x + residual rounded as rmsnorm's
    # the chunked sum of squares: rstd may move a bit, and a bfloat16 element one ulp
    assert _ulps(out.cpu(), want_h) <= (1 if dtype == torch.bfloat16 else 8)
    ref_logits = (out.cpu().double() @ router.double().T).to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(logits.cpu().float(), ref_logits.float(), rtol=tol, atol=tol)
    want_w, want_ids = topk_softmax(logits, k, renorm, weights_dtype)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_w)
    # the torch reference's weights (tied bf16 logits may come in another order: compare values)
    ref_w, _ = topk_softmax_ref(logits.cpu().float(), k, renorm, weights_dtype)
    torch.testing.assert_close(weights.cpu().float().sort(-1).values, ref_w.float().sort(-1).values,
                               rtol=2 ** -7, atol=1e-6)
    want_counts = torch.zeros(e, dtype=torch.int64)
    want_counts.index_add_(0, ids[:-1].cpu().flatten(), torch.ones(ids[:-1].numel(), dtype=torch.int64))
    assert torch.equal(counts.cpu(), want_counts)  # padding rows route but are not counted


def test_launches_again_with_the_counters_reset(device):
    """Each token's last program resets its arrival counter: a second launch (a CUDA graph's
    replay does the same) chooses again, the same experts, not a half-filled row."""
    x, r, g, router = (v.to(device) for v in _inputs(7, 128, 32, torch.bfloat16, seed=5))
    first = norm_router(x, r, g, 1e-5, router, 4, True, torch.bfloat16)
    for _ in range(2):
        again = norm_router(x, r, g, 1e-5, router, 4, True, torch.bfloat16)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_no_tokens_and_default_config(device):
    x, r, g, router = (v.to(device) for v in _inputs(0, 64, 16, torch.bfloat16, seed=1))
    out, res, logits, weights, ids = norm_router(x, r, g, 1e-6, router, 2, False, torch.float32)
    assert out.shape == (0, 64) and res.shape == (0, 64) and weights.shape == (0, 2) and ids.shape == (0, 2)
    assert default_config(128, 2048) == NormRouterConfig(block_e=4, block_h=512)
    assert default_config(8, 4096).block_e == 2 and default_config(256, 64).block_h == 64


@pytest.mark.parametrize("change,message", [
    (dict(router=torch.zeros(8, 32)), "router"),                                 # H differs from x's
    (dict(top_k=9), "top_k"),                                                     # more than the experts
    (dict(residual=torch.zeros(3, 64)), "residual"),                             # not x's shape
    (dict(counts=torch.zeros(8, dtype=torch.int64)), "counts and counted"),      # one without the other
    (dict(config=NormRouterConfig(block_e=3)), "powers of two"),
])
def test_refuses_bad_arguments(change, message):
    args = dict(x=torch.zeros(2, 64), residual=None, norm_weight=torch.ones(64), eps=1e-6,
                router=torch.zeros(8, 64), top_k=2, renormalize=True, weights_dtype=torch.float32)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        norm_router(**args)
