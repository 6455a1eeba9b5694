"""The torch op table's CPU shortcuts keep Hugging Face's values: RMSNorm through PyTorch's C++
composite, half-precision decode attention computed in float32."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from llmesh.engine.model.layers import rms_norm
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
