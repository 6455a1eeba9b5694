"""The Llama-family forward pass on Triton kernels (the ``triton`` backend).

Same weights and numerics as ``model/llama.py``, rearranged for speed: q/k/v and
gate/up projections fused into one GEMM each, RMSNorm fused with the residual add,
RoPE applied in place on the fused projection, K/V written by a kernel, and attention by
the paged decode kernel (one token per sequence, CUDA-graph friendly) or the paged
prefill kernel (any mix of prefill chunks, extends and decodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.llama import LlamaForCausalLM
from llmesh.engine.quant.linear import Weight, dequantize_rows, linear
from llmesh.engine.quant.packed import cat_out_features


@dataclass
class FastAttentionMetadata:
    """Device tensors the kernels read; built per step (eager) or kept static (CUDA graphs)."""

    slot_mapping: torch.Tensor      # [T] int64, -1 = padding (not written)
    block_tables: torch.Tensor      # [S, max_blocks] int32
    seq_lens: torch.Tensor          # [S] int32, context length after this step (0 = padding)
    query_start_loc: torch.Tensor | None  # [S + 1] int32; None for a decode-only batch
    max_query_len: int              # 1 for decode-only batches
    max_seq_len: int                # bound on seq_lens (fixed under CUDA graphs)
    unified: bool = False
    """Attention through the unified kernel, whose launch grid depends on shapes only (mixed
    batches replayed from a CUDA graph)."""


def fuse_out_features(weights: list[Weight]) -> Weight | list[Weight]:
    """One weight computing all outputs in one GEMM; the list itself when the parts cannot
    share a kernel (a GGUF file may store q/k/v in different block types)."""
    if all(isinstance(w, torch.Tensor) for w in weights):
        return torch.cat(weights, 0).contiguous()
    try:
        return cat_out_features(weights)
    except ValueError:
        return weights


def fused_linear(x: torch.Tensor, w: Weight | list[Weight], bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, list):
        y = torch.cat([linear(x, part) for part in w], dim=-1)
        return y if bias is None else y + bias
    return linear(x, w, bias)


class _Layer:
    def __init__(self, layer, cfg: ModelConfig) -> None:
        a, m = layer.self_attn, layer.mlp
        self.w_qkv = fuse_out_features([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        self.b_qkv = (torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0).contiguous()
                      if a.q_proj.bias is not None else None)
        self.w_o, self.b_o = a.o_proj.weight, a.o_proj.bias
        self.q_norm = a.q_norm.weight if a.q_norm is not None else None
        self.k_norm = a.k_norm.weight if a.k_norm is not None else None
        self.w_gate_up = fuse_out_features([m.gate_proj.weight, m.up_proj.weight])
        self.w_down = m.down_proj.weight
        self.w_in, self.w_post = layer.input_layernorm.weight, layer.post_attention_layernorm.weight


class FastLlama:
    """Built from a loaded LlamaForCausalLM; drops the unfused copies to save memory."""

    def __init__(self, model: LlamaForCausalLM, max_positions: int) -> None:
        from llmesh.kernels.rope import rope_cos_sin_cache

        cfg = self.cfg = model.config
        self.layers = [_Layer(layer, cfg) for layer in model.model.layers]
        for layer in model.model.layers:  # the fused copies replace them
            a, m = layer.self_attn, layer.mlp
            for mod in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                mod.weight = None
        self.embed = model.model.embed_tokens.weight
        self.final_norm = model.model.norm.weight
        self.dtype = self.final_norm.dtype
        self.lm_head = self.embed if model.lm_head is None else model.lm_head.weight
        self.eps = cfg.rms_norm_eps
        self.nq, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = self.d ** -0.5
        self.cos_sin = rope_cos_sin_cache(self.d, cfg.rope_theta, cfg.rope_scaling, max_positions,
                                          device=self.final_norm.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: torch.Tensor,
                meta: FastAttentionMetadata) -> torch.Tensor:
        from llmesh.kernels.activation import silu_and_mul
        from llmesh.kernels.kv_cache_write import kv_cache_write
        from llmesh.kernels.paged_decode_attention import paged_decode_attention
        from llmesh.kernels.prefill_attention import prefill_attention
        from llmesh.kernels.rmsnorm import rmsnorm
        from llmesh.kernels.rope import rotary_embedding

        t, nq, nkv, d = input_ids.shape[0], self.nq, self.nkv, self.d
        x = dequantize_rows(self.embed, input_ids, self.dtype)  # [T, H]
        residual = None
        for i, L in enumerate(self.layers):
            if residual is None:
                h, residual = rmsnorm(x, L.w_in, self.eps), x
            else:
                h, residual = rmsnorm(x, L.w_in, self.eps, residual=residual)
            qkv = fused_linear(h, L.w_qkv, L.b_qkv)  # [T, (nq + 2 nkv) d]
            q = qkv[:, : nq * d].view(t, nq, d)
            k = qkv[:, nq * d : (nq + nkv) * d].view(t, nkv, d)
            v = qkv[:, (nq + nkv) * d :].view(t, nkv, d)
            if L.q_norm is not None:
                q = rmsnorm(q.contiguous(), L.q_norm, self.eps)
                k = rmsnorm(k.contiguous(), L.k_norm, self.eps)
            rotary_embedding(positions, q, k, self.cos_sin, q_out=q, k_out=k)
            k_cache, v_cache = kv_caches[i, 0], kv_caches[i, 1]
            kv_cache_write(k_cache, v_cache, k, v, meta.slot_mapping)
            if meta.unified:
                from llmesh.kernels.unified_attention import unified_attention

                o = unified_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                      self.scale, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len)
            elif meta.query_start_loc is None:
                o = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                           max_seq_len=meta.max_seq_len)
            else:
                o = prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                      self.scale, max_query_len=meta.max_query_len)
            x = linear(o.view(t, nq * d), L.w_o, L.b_o)
            h, residual = rmsnorm(x, L.w_post, self.eps, residual=residual)
            x = linear(silu_and_mul(fused_linear(h, L.w_gate_up)), L.w_down)
        out, _ = rmsnorm(x, self.final_norm, self.eps, residual=residual)
        return out  # [T, H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head).float()
