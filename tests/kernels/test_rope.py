"""The Triton rotary embedding matches layers.RotaryEmbedding + apply_rotary (the model's path)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.engine.model.layers import RotaryEmbedding, apply_rotary  # noqa: E402
from llmesh.kernels.rope import rope_cos_sin_cache, rotary_embedding, rotary_embedding_ref  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # 16-bit: one rounding apart at most


@pytest.mark.parametrize("t,h_q,h_kv,d,dtype,theta,scaling", [
    (1, 4, 4, 64, torch.float32, 10000.0, None),
    (17, 8, 2, 64, torch.bfloat16, 100000.0, None),
    (33, 32, 8, 128, torch.bfloat16, 500000.0, LLAMA3),
    (9, 12, 4, 128, torch.float16, 10000.0, {"rope_type": "linear", "factor": 2.0}),
    (20, 6, 2, 96, torch.float32, 500000.0, LLAMA3),
])
@pytest.mark.parametrize("inplace", [False, True])
def test_matches_model_rotary(device, t, h_q, h_kv, d, dtype, theta, scaling, inplace):
    gen = torch.Generator().manual_seed(t * 31 + d + inplace)
    max_pos = 4096
    positions = torch.randint(0, max_pos, (t,), generator=gen)
    # q, k as strided views of one fused qkv projection, as the model produces them
    qkv = torch.randn(t, (h_q + 2 * h_kv) * d, generator=gen).to(dtype)
    q = qkv[:, :h_q * d].view(t, h_q, d)
    k = qkv[:, h_q * d:(h_q + h_kv) * d].view(t, h_kv, d)
    cos, sin = RotaryEmbedding(d, theta, scaling).cos_sin(positions, dtype)
    expect_q, expect_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    cache = rope_cos_sin_cache(d, theta, scaling, max_pos, device)
    qkv_dev = qkv.to(device)
    q_dev = qkv_dev[:, :h_q * d].view(t, h_q, d)
    k_dev = qkv_dev[:, h_q * d:(h_q + h_kv) * d].view(t, h_kv, d)
    if inplace:
        q_out, k_out = q_dev, k_dev
    else:
        q_out = torch.full_like(q_dev, float("nan"))
        k_out = torch.full_like(k_dev, float("nan"))
    got_q, got_k = rotary_embedding(positions.to(device, torch.int32), q_dev, k_dev, cache, q_out=q_out, k_out=k_out)
    assert got_q is q_out and got_k is k_out
    tol = TOL[dtype]
    torch.testing.assert_close(got_q.cpu().float(), expect_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.cpu().float(), expect_k.float(), rtol=tol, atol=tol)
    if inplace:  # the v part of the buffer is untouched
        assert torch.equal(qkv_dev[:, (h_q + h_kv) * d:].cpu(), qkv[:, (h_q + h_kv) * d:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_model_path(dtype):
    gen = torch.Generator().manual_seed(7)
    positions = torch.randint(0, 2048, (13,), generator=gen)
    q, k = torch.randn(13, 8, 64, generator=gen).to(dtype), torch.randn(13, 2, 64, generator=gen).to(dtype)
    cos, sin = RotaryEmbedding(64, 500000.0, LLAMA3).cos_sin(positions, dtype)
    ref_q, ref_k = rotary_embedding_ref(positions, q, k, rope_cos_sin_cache(64, 500000.0, LLAMA3, 2048))
    assert torch.equal(ref_q, apply_rotary(q, cos, sin)) and torch.equal(ref_k, apply_rotary(k, cos, sin))


def test_rejects_bad_inputs(device):
    cache = rope_cos_sin_cache(64, 10000.0, None, 32, device)
    pos = torch.arange(3, device=device)
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    with pytest.raises(ValueError, match="D=32"):
        rotary_embedding(pos, q[..., :32], k, cache)
    with pytest.raises(ValueError, match="q has T=3, expected 2"):
        rotary_embedding(pos[:2], q, k, cache)
    with pytest.raises(ValueError, match="same dtype"):
        rotary_embedding(pos, q, k.half(), cache)
    with pytest.raises(ValueError, match="positions"):
        rotary_embedding(pos.float(), q, k, cache)
