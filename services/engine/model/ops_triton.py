"""The triton op table: the Triton kernels of kernels/ (the ``triton`` backend).

Same contract as the torch table, rearranged for speed: RMSNorm fused with the residual
add, RoPE applied in place on the fused q/k/v projection, K/V written by a kernel, packed
weights through our quantized GEMMs, and attention by one dispatch function.
"""

from __future__ import annotations

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.quant.linear import Weight, dequantize_rows, linear
from llmesh.kernels.activation import silu_and_mul
from llmesh.kernels.kv_cache_write import kv_cache_write
from llmesh.kernels.paged_attention import AttentionMetadata
from llmesh.kernels.paged_decode_attention import paged_decode_attention
from llmesh.kernels.prefill_attention import prefill_attention
from llmesh.kernels.rmsnorm import rmsnorm
from llmesh.kernels.rope import rope_cos_sin_cache, rotary_embedding


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
              scale: float) -> torch.Tensor:
    """Causal paged attention of q [T, H_q, D] → [T, H_q, D]: the decode kernel for a
    decode-only batch (CUDA-graph friendly: no host reads), else the prefill kernel, which
    takes any mix of prefill chunks, extends and decodes."""
    if meta.query_start_loc is None:
        return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                      max_seq_len=meta.max_seq_len)
    return prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
                             max_query_len=meta.max_query_len)


class TritonOps:
    name = "triton"

    def __init__(self, cfg: ModelConfig, *, device: torch.device, max_positions: int) -> None:
        # Fixed size: a table that grew would move under a captured CUDA graph.
        self.cos_sin = rope_cos_sin_cache(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions,
                                          device=device)  # [P, D] float32

    def prepare(self, meta: AttentionMetadata) -> None:
        return None

    def embed(self, weight: Weight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_rows(weight, ids, dtype)

    def linear(self, x: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(w, list):
            y = torch.cat([linear(x, part) for part in w], dim=-1)
            return y if bias is None else y + bias
        return linear(x, w, bias)

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return rmsnorm(x, weight, eps), x
        return rmsnorm(x, weight, eps, residual=residual)

    def rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary_embedding(positions, q, k, self.cos_sin, q_out=q, k_out=k)
        return q, k

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    def write_kv(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        kv_cache_write(k_cache, v_cache, k, v, meta.slot_mapping)

    def attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                  scale: float) -> torch.Tensor:
        return attention(q, k_cache, v_cache, meta, scale)
