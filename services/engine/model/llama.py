"""One decoder for the Llama family: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias), Qwen3
(q/k norm) and SmolLM2 (tied embeddings) differ only in flags of ModelConfig.

Tokens of all sequences in a step are flattened into one dimension ``T``; attention
finds each sequence's context through the paged KV pool and its metadata.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.model.layers import RMSNorm, RotaryEmbedding, SiluAndMulMLP, apply_rotary, make_linear
from llmesh.engine.quant.linear import linear
from llmesh.engine.quant.packed import QuantizedWeight
from llmesh.kernels.paged_attention import PagedAttentionMetadata, paged_attention_ref, write_kv_ref


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, linear_method: str = "none") -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.scale = self.head_dim ** -0.5
        h, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = make_linear(h, self.num_heads * self.head_dim, bias, linear_method)
        self.k_proj = make_linear(h, self.num_kv_heads * self.head_dim, bias, linear_method)
        self.v_proj = make_linear(h, self.num_kv_heads * self.head_dim, bias, linear_method)
        # HF's Llama/Qwen3 put the bias on o_proj too when attention_bias is set; Qwen2 never does.
        o_bias = bias and cfg.architecture != "qwen2"
        self.o_proj = make_linear(self.num_heads * self.head_dim, h, o_bias, linear_method)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor:
        # x: [T, hidden]; kv_cache: [2, num_blocks, block_size, H_kv, D]
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        write_kv_ref(kv_cache[0], kv_cache[1], k, v, meta.slot_mapping)
        o = paged_attention_ref(q, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, linear_method: str = "none") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, linear_method)
        self.mlp = SiluAndMulMLP(cfg.hidden_size, cfg.intermediate_size, linear_method)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, linear_method: str = "none") -> None:
        super().__init__()
        if linear_method == "keep":  # a GGUF's token_embd may be packed too
            from llmesh.engine.quant.linear import QuantEmbedding

            self.embed_tokens = QuantEmbedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, linear_method) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """HF-compatible parameter names, so HF checkpoints load by name.

    ``linear_method`` (quant/config.py QuantSpec): none, int8 / int4 / fp8 (decoder linears
    quantized as they load; embeddings and LM head stay in the model dtype, as is usual), or
    keep (every linear and the embeddings store what the checkpoint holds, packed or not).
    """

    def __init__(self, cfg: ModelConfig, linear_method: str = "none") -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, linear_method)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        head_method = "keep" if linear_method == "keep" else "none"
        self.lm_head = None if cfg.tie_word_embeddings else make_linear(cfg.hidden_size, cfg.vocab_size, False,
                                                                        head_method)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: torch.Tensor,
        meta: PagedAttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T]; kv_caches: [L, 2, num_blocks, block_size, H_kv, D]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv_caches[i], meta)
        return self.model.norm(x)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, hidden] -> [N, vocab] in float32
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight, kernels=hidden.is_cuda).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor | QuantizedWeight]]) -> None:
        """Copy HF-named tensors in; every parameter must be provided exactly once. Weights of
        quantized layers (QuantLinear / QuantEmbedding) are handed to the layer, which
        quantizes a float tensor or keeps a packed one."""
        params = dict(self.named_parameters())
        loadable = {f"{name}.weight": m for name, m in self.named_modules() if hasattr(m, "load")}
        params.update(loadable)
        device, dtype = self.model.norm.weight.device, self.model.norm.weight.dtype
        seen: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            if name in loadable:
                try:
                    loadable[name].load(tensor, dtype=dtype, device=device)
                except ValueError as exc:
                    raise ModelLoadError(f"checkpoint tensor {name!r} {exc}") from exc
                seen.add(name)
                continue
            if name not in params:
                if "rotary_emb" in name:
                    continue
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in the {self.config.architecture} model")
            p = params[name]
            if tuple(p.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(tensor.to(p.dtype))
            seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise ModelLoadError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
