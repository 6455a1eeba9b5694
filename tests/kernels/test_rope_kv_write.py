"""The fused RoPE + KV write equals rotary_embedding_ref followed by kv_cache_write_ref (after
rmsnorm_ref of each head when Qwen3's q/k norms are fused in)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.rope import rope_cos_sin_cache  # noqa: E402
from llmesh.kernels.rope_kv_write import rope_kv_write, rope_kv_write_ref  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # 16-bit: one rounding apart at most


@pytest.mark.parametrize("t,h_q,h_kv,d,block_size,dtype,cache_dtype,scaling", [
    (1, 4, 4, 64, 16, torch.float32, torch.float32, None),
    (17, 8, 2, 64, 16, torch.bfloat16, torch.bfloat16, LLAMA3),
    (12, 32, 8, 128, 16, torch.bfloat16, torch.bfloat16, LLAMA3),
    (9, 12, 4, 96, 8, torch.float16, torch.float16, {"rope_type": "linear", "factor": 2.0}),
    (7, 6, 2, 64, 32, torch.float32, torch.bfloat16, None),
])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_two_kernel_reference(device, t, h_q, h_kv, d, block_size, dtype, cache_dtype, scaling, inplace,
                                      qk_norm):
    gen = torch.Generator().manual_seed(t * 31 + d + inplace)
    max_pos, num_blocks = 4096, 6
    positions = torch.randint(0, max_pos, (t,), generator=gen)
    # q, k, v as strided views of one fused qkv projection, as the model produces them
    qkv = torch.randn(t, (h_q + 2 * h_kv) * d, generator=gen).to(dtype)
    q = qkv[:, :h_q * d].view(t, h_q, d)
    k = qkv[:, h_q * d:(h_q + h_kv) * d].view(t, h_kv, d)
    v = qkv[:, (h_q + h_kv) * d:].view(t, h_kv, d)
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[1::4] = -1  # padding tokens
    cache = rope_cos_sin_cache(d, 500000.0, scaling, max_pos)
    expect_kc, expect_vc = k_cache.clone(), v_cache.clone()
    norms = {}
    if qk_norm:  # weights away from 1, so a missing or swapped norm shows
        norms = dict(q_norm=(1 + 0.3 * torch.randn(d, generator=gen)).to(dtype),
                     k_norm=(0.5 + 0.3 * torch.randn(d, generator=gen)).to(dtype), eps=1e-6)
    expect_q, expect_k = rope_kv_write_ref(positions, q, k, v, cache, expect_kc, expect_vc, slots, **norms)

    qkv_dev = qkv.to(device)
    q_dev = qkv_dev[:, :h_q * d].view(t, h_q, d)
    k_dev = qkv_dev[:, h_q * d:(h_q + h_kv) * d].view(t, h_kv, d)
    v_dev = qkv_dev[:, (h_q + h_kv) * d:].view(t, h_kv, d)
    kc_dev, vc_dev = k_cache.to(device), v_cache.to(device)
    outs = dict(q_out=q_dev, k_out=k_dev) if inplace else {}
    dev_norms = {name: w.to(device) if isinstance(w, torch.Tensor) else w for name, w in norms.items()}
    got_q, got_k = rope_kv_write(positions.to(device, torch.int32), q_dev, k_dev, v_dev, cache.to(device),
                                 kc_dev, vc_dev, slots.to(device), **outs, **dev_norms)
    if inplace:
        assert got_q is q_dev and got_k is k_dev
    tol = TOL[dtype] * (2 if qk_norm else 1)  # the norm's rounding before the rotation's
    torch.testing.assert_close(got_q.cpu().float(), expect_q.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(got_k.cpu().float(), expect_k.float(), rtol=tol, atol=tol)
    # The pool: the values kv_cache_write would store from this k_out, and nothing else touched
    # (exact on the CPU interpreter; a GPU's FMA contraction may move a rotated k by one rounding).
    keep = slots >= 0
    expect_from_got = k_cache.clone()
    expect_from_got.view(-1, h_kv, d)[slots[keep]] = got_k.cpu()[keep].to(cache_dtype)
    assert torch.equal(kc_dev.cpu(), expect_from_got)
    assert torch.equal(vc_dev.cpu(), expect_vc)
    torch.testing.assert_close(kc_dev.cpu().float(), expect_kc.float(), rtol=tol, atol=tol)


def test_rejects_bad_inputs(device):
    cache = rope_cos_sin_cache(64, 10000.0, None, 32, device)
    pos = torch.arange(3, device=device)
    q, k = torch.randn(3, 4, 64, device=device), torch.randn(3, 2, 64, device=device)
    kc = torch.zeros(4, 16, 2, 64, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="k_cache has H_kv=2, expected 1"):
        rope_kv_write(pos, q, k[:, :1], k[:, :1], cache, kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv_write(pos, q, k, k, cache, kc, kc.clone(), slots[:2])
    with pytest.raises(ValueError, match="same dtype"):
        rope_kv_write(pos, q, k, k.half(), cache, kc, kc.clone(), slots)
    with pytest.raises(ValueError, match="v_cache"):
        rope_kv_write(pos, q, k, k, cache, kc, kc[:2].clone(), slots)
    w = torch.ones(64, device=device)
    with pytest.raises(ValueError, match="come together"):
        rope_kv_write(pos, q, k, k, cache, kc, kc.clone(), slots, q_norm=w)
    with pytest.raises(ValueError, match="k_norm"):
        rope_kv_write(pos, q, k, k, cache, kc, kc.clone(), slots, q_norm=w, k_norm=w[:32])
    with pytest.raises(ValueError, match="q_norm"):
        rope_kv_write(pos, q, k, k, cache, kc, kc.clone(), slots, q_norm=w.half(), k_norm=w)
