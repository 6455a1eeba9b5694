"""Random-weight models of real shapes, for benchmarks: ``random:llama3-8b``, ``random:llama3.2-1b``.

Speed does not depend on weight values, so GPU benchmarks run Llama-3-shaped models
without multi-GB checkpoints. Weights are drawn on the target device (the GPU when there
is one) in bf16, one tensor at a time. The tokenizer is byte-level with no merges (ids
0..255 are bytes): enough to detokenize what such a model emits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from llmesh.engine.errors import ModelLoadError
from llmesh.engine.model.config import ModelConfig

PREFIX = "random:"

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
        eos_token_ids=[128001], torch_dtype="bfloat16"),
    "llama3.2-1b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=[128001], torch_dtype="bfloat16"),
}


def random_model_config(spec: str, name: str | None) -> ModelConfig:
    preset = spec.removeprefix(PREFIX)
    if preset not in PRESETS:
        raise ModelLoadError(f"unknown random model {spec!r}; presets: "
                             + ", ".join(PREFIX + p for p in PRESETS))
    return dataclasses.replace(PRESETS[preset], name=name or preset)


def parameter_shapes(c: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of every parameter of a Llama-family model."""
    h, d = c.hidden_size, c.head_dim
    yield "model.embed_tokens.weight", (c.vocab_size, h)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (c.num_attention_heads * d, h)
        yield p + "self_attn.k_proj.weight", (c.num_key_value_heads * d, h)
        yield p + "self_attn.v_proj.weight", (c.num_key_value_heads * d, h)
        yield p + "self_attn.o_proj.weight", (h, c.num_attention_heads * d)
        if c.attention_bias:
            yield p + "self_attn.q_proj.bias", (c.num_attention_heads * d,)
            yield p + "self_attn.k_proj.bias", (c.num_key_value_heads * d,)
            yield p + "self_attn.v_proj.bias", (c.num_key_value_heads * d,)
        if c.qk_norm:
            yield p + "self_attn.q_norm.weight", (d,)
            yield p + "self_attn.k_norm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (c.intermediate_size, h)
        yield p + "mlp.up_proj.weight", (c.intermediate_size, h)
        yield p + "mlp.down_proj.weight", (h, c.intermediate_size)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not c.tie_word_embeddings:
        yield "lm_head.weight", (c.vocab_size, h)


class RandomWeights:
    """Lazily drawn weights: N(0, 0.02) matrices, norms near 1 (seeded, so runs repeat)."""

    def __init__(self, config: ModelConfig, device: torch.device | None = None, seed: int = 0) -> None:
        self.config, self.seed = config, seed
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        gen = torch.Generator(self.device).manual_seed(self.seed)
        for name, shape in parameter_shapes(self.config):
            t = torch.randn(shape, generator=gen, device=self.device, dtype=torch.bfloat16)
            yield name, (1.0 + 0.05 * t) if name.endswith("norm.weight") else 0.02 * t


def byte_tokenizer_data():
    """GGUF-style tokenizer data for a byte-level tokenizer (ids 0..255 = bytes)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from llmesh.engine.loader.gguf_tokenizer import GGUFTokenizerData, byte_to_unicode

    table = byte_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return GGUFTokenizerData(backend=backend, bos_token_id=None, eos_token_id=None, add_bos_token=False,
                             chat_template=None, special_token_ids=set(), bos_token=None, eos_token=None)
