"""FP8 KV pool, write side: the Triton KV writes (plain and RoPE-fused) store the bits the
torch reference stores, and a stored vector dequantizes to within E4M3's rounding of the input."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.fp8_gemm import fp8_support  # noqa: E402
from llmesh.kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref  # noqa: E402
from llmesh.kernels.kv_quant_ref import (  # noqa: E402
    KV_FP8_DTYPE, KV_SCALE_DTYPE, dequantize_kv_ref, quantize_kv_ref)
from llmesh.kernels.rope import rope_cos_sin_cache  # noqa: E402
from llmesh.kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref  # noqa: E402

_NO_FP8 = fp8_support("cuda") if torch.cuda.is_available() else None
pytestmark = pytest.mark.skipif(_NO_FP8 is not None, reason=f"FP8 KV pool: {_NO_FP8}")


def _pools(num_blocks, block_size, h_kv, d):
    """Zeroed FP8 pools and their scale pools: (k_cache, v_cache, k_scales, v_scales)."""
    caches = [torch.zeros(num_blocks, block_size, h_kv, d, dtype=KV_FP8_DTYPE) for _ in range(2)]
    scales = [torch.zeros(num_blocks, block_size, h_kv, dtype=KV_SCALE_DTYPE) for _ in range(2)]
    return (*caches, *scales)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


def test_round_trip_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    # Heads of very different magnitudes (and an all-zero one): each gets its own scale.
    mags = torch.tensor([1e-4, 1.0, 37.0, 3e3, 0.0])
    x = torch.randn(64, 5, 128, generator=gen) * mags[None, :, None]
    x[3, 2, 7] = 1e4  # an outlier sets its own vector's scale; nothing saturates
    xq, e = quantize_kv_ref(x)
    y = dequantize_kv_ref(xq, e, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    # E4M3 keeps 3 mantissa bits: relative error <= 2^-4 of a value; values that fall in the
    # subnormal range (below 2^-6 of the scale, amax / 2^14 at least) err by at most 2^-10 of the scale.
    bound = torch.maximum(x.abs() * 2.0 ** -4, amax * 2.0 ** -17)
    assert ((y - x).abs() <= bound).all()
    assert (y[:, 4] == 0).all()
    assert y[3, 2, 7] == 1e4 or abs(float(y[3, 2, 7]) - 1e4) <= 1e4 * 2 ** -4
    assert xq.float().abs().max() <= 448


@pytest.mark.parametrize("t,h_kv,d,block_size,dtype", [
    (1, 1, 64, 16, torch.float32),
    (17, 2, 128, 16, torch.bfloat16),
    (20, 3, 48, 8, torch.float16),
])
def test_kv_cache_write_matches_reference(device, t, h_kv, d, block_size, dtype):
    gen = torch.Generator().manual_seed(t * 7 + d)
    num_blocks = 10
    kv = (torch.randn(t, 2, h_kv, d, generator=gen) * 5).to(dtype)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as the model produces them
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[::4] = -1  # padding tokens
    expect = _pools(num_blocks, block_size, h_kv, d)
    kv_cache_write_ref(expect[0], expect[1], k, v, slots, expect[2], expect[3])
    got = [x.to(device) for x in _pools(num_blocks, block_size, h_kv, d)]
    kv_cache_write(got[0], got[1], k.to(device), v.to(device), slots.to(device), got[2], got[3])
    for a, b in zip(got, expect):
        assert _same_bits(a, b)
    # Only real tokens' slots were written.
    live = slots[slots >= 0]
    written = expect[2].view(-1, h_kv).any(-1).nonzero().flatten()
    assert set(written.tolist()) == set(live.tolist())


@pytest.mark.parametrize("t,h_q,h_kv,d,dtype", [(9, 4, 2, 64, torch.float32), (5, 8, 1, 128, torch.bfloat16)])
def test_rope_kv_write_matches_reference(device, t, h_q, h_kv, d, dtype):
    gen = torch.Generator().manual_seed(t + d)
    num_blocks, block_size = 6, 8
    qkv = (torch.randn(t, h_q + 2 * h_kv, d, generator=gen) * 3).to(dtype)
    q, k, v = qkv[:, :h_q], qkv[:, h_q:h_q + h_kv], qkv[:, h_q + h_kv:]
    positions = torch.randint(0, 100, (t,), generator=gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[1] = -1
    cos_sin = rope_cos_sin_cache(d, 10000.0, None, 128, device=torch.device("cpu"))
    expect = _pools(num_blocks, block_size, h_kv, d)
    q_ref, k_ref = rope_kv_write_ref(positions, q, k, v, cos_sin, expect[0], expect[1], slots, expect[2], expect[3])
    got = [x.to(device) for x in _pools(num_blocks, block_size, h_kv, d)]
    q_out, k_out = rope_kv_write(positions.to(device), q.to(device), k.to(device), v.to(device), cos_sin.to(device),
                                 got[0], got[1], slots.to(device), k_scales=got[2], v_scales=got[3])
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]  # one rounding apart at most
    torch.testing.assert_close(q_out.cpu().float(), q_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(k_out.cpu().float(), k_ref.float(), rtol=tol, atol=tol)
    # The pool holds exactly what kv_cache_write_ref stores from the kernel's own rotated k:
    # a GPU's FMA contraction may move a rotated element by one rounding (exact on the CPU
    # interpreter), and one rounding can move an E4M3 code.
    from_got = _pools(num_blocks, block_size, h_kv, d)
    kv_cache_write_ref(from_got[0], from_got[1], k_out.cpu(), v, slots, from_got[2], from_got[3])
    for a, b in zip(got, from_got):
        assert _same_bits(a, b)
    if device.type == "cpu":
        for a, b in zip(got, expect):
            assert _same_bits(a, b)


def test_fp8_pool_needs_its_scales(device):
    k_cache, v_cache, k_scales, v_scales = (x.to(device) for x in _pools(4, 16, 2, 64))
    k = torch.zeros(3, 2, 64, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="k_scales"):
        kv_cache_write(k_cache, v_cache, k, k, slots)
    with pytest.raises(ValueError, match="v_scales"):
        kv_cache_write(k_cache, v_cache, k, k, slots, k_scales, v_scales[:, :8])
    with pytest.raises(ValueError, match="only an FP8 pool"):
        kv_cache_write(k_cache.float(), v_cache.float(), k, k, slots, k_scales, v_scales)
