"""The torch op table's CPU shortcuts keep Hugging Face's values: RMSNorm through PyTorch's C++
composite, RoPE with a signed sine, half-precision decode attention computed in float32, one
sequence's decode attention on views of the pool."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from llmesh.engine.model.layers import apply_rotary_signed, rms_norm, signed_sin
from llmesh.kernels import paged_attention as pa
from llmesh.kernels.paged_attention import AttentionMetadata, paged_attention_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_hf_bit_for_bit(dtype):
    torch.manual_seed(0)
    for i, (rows, dim) in enumerate([(1, 576), (3, 64), (17, 2048), (128, 960), (2, 4096)]):
        hf = LlamaRMSNorm(dim, eps=1e-5)
        with torch.no_grad():
            hf.weight.copy_(torch.randn(dim))
        hf = hf.to(dtype)
        x = (torch.randn(rows, dim) * 10.0 ** (i - 2)).to(dtype)
        with torch.no_grad():
            assert torch.equal(rms_norm(x, hf.weight, 1e-5), hf(x)), (rows, dim)


def test_cpu_half_decode_attention_runs_in_float32():
    """bfloat16 q/K/V on the CPU: the reference attends in float32 and rounds once, so it
    equals the float32 attention of the same (bfloat16) values rounded to bfloat16."""
    torch.manual_seed(2)
    h_q, h_kv, d, block, ctx = 8, 2, 32, 16, 45
    k_cache = torch.randn(8, block, h_kv, d).bfloat16()
    v_cache = torch.randn(8, block, h_kv, d).bfloat16()
    q = torch.randn(1, h_q, d).bfloat16()
    meta = AttentionMetadata(slot_mapping=torch.tensor([ctx - 1]),
                             block_tables=torch.tensor([[5, 1, 7]], dtype=torch.int32),
                             seq_lens=torch.tensor([ctx], dtype=torch.int32), query_start_loc=None,
                             max_query_len=1, max_seq_len=ctx, host_seq_lens=[ctx])
    out = paged_attention_ref(q, k_cache, v_cache, meta, d ** -0.5)
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, d ** -0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_signed_sine_rotation_is_hf_bit_for_bit(dtype):
    torch.manual_seed(1)
    t, h, d = 5, 12, 64
    x = (torch.randn(t, h, d) * 3).to(dtype)
    angles = torch.rand(t, d // 2) * 100
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # [T, D], as RotaryEmbedding makes them
    # HF's apply_rotary_pos_emb on [B, H, T, D] with cos/sin [B, T, D]
    hf, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    got = apply_rotary_signed(x, cos[:, None], signed_sin(sin)[:, None])
    assert torch.equal(got, hf[0].transpose(0, 1))


def _one_sequence(table: list[int], ctx: int, dtype: torch.dtype):
    torch.manual_seed(3)
    h_q, h_kv, d, block = 9, 3, 64, 16
    k_cache = torch.randn(12, block, h_kv, d).to(dtype)
    v_cache = torch.randn(12, block, h_kv, d).to(dtype)
    q = torch.randn(1, h_q, d).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.tensor([ctx - 1]), block_tables=torch.tensor([table + [0, 0]],
                             dtype=torch.int32), seq_lens=torch.tensor([ctx], dtype=torch.int32),
                             query_start_loc=None, max_query_len=1, max_seq_len=ctx + 40, host_seq_lens=[ctx])
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sequence_on_consecutive_blocks_attends_over_views_bit_for_bit(dtype):
    q, k_cache, v_cache, meta = _one_sequence([4, 5, 6], 37, dtype)
    assert meta.one_sequence_rows(16) == (64, 37)
    got = paged_attention_ref(q, k_cache, v_cache, meta, 0.125)
    gathered = pa._decode_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.125,
                              37, None, None)
    assert got.dtype == dtype and torch.equal(got, gathered)


def test_one_sequence_on_scattered_blocks_is_gathered():
    q, k_cache, v_cache, meta = _one_sequence([4, 9, 5], 37, torch.float32)
    assert meta.one_sequence_rows(16) is None
    got = paged_attention_ref(q, k_cache, v_cache, meta, 0.125)
    slots = [b * 16 + i for b in (4, 9, 5) for i in range(16)][:37]
    k, v = k_cache.view(-1, 3, 64)[slots], v_cache.view(-1, 3, 64)[slots]
    scores = torch.einsum("gd,cgd->gc", q[0].view(3, 3, 64).flatten(0, 1),
                          k.repeat_interleave(3, 1)) * 0.125
    ref = torch.einsum("gc,cgd->gd", scores.softmax(-1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(got[0], ref, rtol=1e-5, atol=1e-5)
