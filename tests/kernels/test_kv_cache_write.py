"""The Triton KV-cache write stores exactly what write_kv_ref stores, and nothing else."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

from llmesh.kernels.kv_cache_write import kv_cache_write, kv_cache_write_ref  # noqa: E402


@pytest.mark.parametrize("t,h_kv,d,block_size,dtype,cache_dtype", [
    (1, 1, 64, 16, torch.float32, torch.float32),
    (17, 2, 128, 16, torch.bfloat16, torch.bfloat16),
    (33, 8, 64, 8, torch.float16, torch.float16),
    (20, 4, 128, 32, torch.float32, torch.bfloat16),
])
def test_matches_reference(device, t, h_kv, d, block_size, dtype, cache_dtype):
    gen = torch.Generator().manual_seed(t * 100 + h_kv * 10 + d)
    num_blocks = 12
    k_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, h_kv, d, generator=gen).to(cache_dtype)
    # k, v as strided views of one fused qkv-like buffer, as the model produces them
    kv = torch.randn(t, 2, h_kv, d, generator=gen).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t]
    slots[::5] = -1  # padding tokens
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    kv_cache_write_ref(expect_k, expect_v, k, v, slots)

    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    kv_cache_write(k_cache, v_cache, k.to(device), v.to(device), slots.to(device, torch.int32))
    assert torch.equal(k_cache.cpu(), expect_k)
    assert torch.equal(v_cache.cpu(), expect_v)


def test_rejects_bad_inputs(device):
    k_cache = torch.zeros(4, 16, 2, 64, device=device)
    k = torch.zeros(3, 2, 64, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="H_kv"):
        kv_cache_write(k_cache, k_cache.clone(), k[:, :1], k[:, :1], slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        kv_cache_write(k_cache, k_cache.clone(), k, k, slots[:2])
    with pytest.raises(ValueError, match="dtype"):
        kv_cache_write(k_cache, k_cache.clone(), k, k, slots.float())
    with pytest.raises(ValueError, match="contiguous"):
        kv_cache_write(k_cache, k_cache.clone(), k.transpose(1, 2).contiguous().transpose(1, 2), k, slots)
