"""Random-weight models of real shapes, for benchmarks: ``random:llama3-8b``, ``random:llama3.2-1b``,
``random:qwen3-30b-a3b`` (a mixture of experts: 128 experts, top-8).

Speed does not depend on weight values, so GPU benchmarks run Llama-3-shaped models
without multi-GB checkpoints. Weights are drawn on the target device (the GPU when there
is one) in bf16, one tensor at a time.

The tokenizer (``random_tokenizer_data``) is built in memory, deterministically, with exactly
the preset's ``vocab_size`` entries, so every id such a model emits detokenizes and a gateway
accepts every id of its vocabulary: a byte-level BPE whose ids 0..255 are the bytes, then
merges of ever longer byte strings, and from the lowest BOS/EOS id up to the end special
tokens (Llama 3's layout: 128000 = ``<|begin_of_text|>``, 128001 = ``<|end_of_text|>``, the
rest reserved). Nothing is downloaded and nothing is written to disk: the gateway and the
engine build the same tokenizer from the preset's name.
"""

from __future__ import annotations

import dataclasses
import functools
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
    # Llama-3's vocabulary and special ids on a toy body: CPU smoke runs of the serving path
    # (the gateway's full-vocabulary tokenizer, random token-id prompts) in seconds.
    "tiny-llama3": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
        eos_token_ids=[128001], torch_dtype="bfloat16"),
    "qwen3-30b-a3b": ModelConfig(
        architecture="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
        bos_token_id=None, eos_token_ids=[151645], torch_dtype="bfloat16", num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    # Its body in miniature: CPU smoke runs of the MoE serving path.
    "tiny-qwen3-moe": ModelConfig(
        architecture="qwen3_moe", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True,
        bos_token_id=1, eos_token_ids=[2], torch_dtype="bfloat16", num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True),
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
        if c.is_sparse_layer(i):  # experts stacked [E, ...], as a GGUF stores them (model/moe.py)
            e, inter = c.num_experts, c.moe_intermediate_size
            yield p + "mlp.gate.weight", (e, h)
            yield p + "mlp.experts.gate_proj.weight", (e, inter, h)
            yield p + "mlp.experts.up_proj.weight", (e, inter, h)
            yield p + "mlp.experts.down_proj.weight", (e, h, inter)
            if c.shared_expert_intermediate_size:
                s = c.shared_expert_intermediate_size
                yield p + "mlp.shared_expert.gate_proj.weight", (s, h)
                yield p + "mlp.shared_expert.up_proj.weight", (s, h)
                yield p + "mlp.shared_expert.down_proj.weight", (h, s)
                yield p + "mlp.shared_expert_gate.weight", (1, h)
        else:
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


def random_tokenizer_data(config: ModelConfig):
    """The tokenizer of a random model of ``config`` (GGUF-style tokenizer data, see the module doc)."""
    return full_vocab_tokenizer_data(config.vocab_size, config.bos_token_id, tuple(config.eos_token_ids or ()))


def random_tokenizer_for(spec: str):
    """The tokenizer of ``random:<preset>`` alone, without weights (what a gateway loads)."""
    return random_tokenizer_data(random_model_config(spec, None))


@functools.lru_cache(maxsize=4)
def full_vocab_tokenizer_data(vocab_size: int, bos_token_id: int | None, eos_token_ids: tuple[int, ...] = ()):
    """A byte-level BPE tokenizer of exactly ``vocab_size`` ids.

    BOS/EOS ids at or above 256 and inside the vocabulary open the block of special tokens
    that runs to the end; ids out of the vocabulary are dropped (a toy vocabulary then has no
    BOS/EOS); ids below 256 stay bytes, marked special."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    from llmesh.engine.loader.gguf_tokenizer import GGUFTokenizerData, byte_to_unicode

    if vocab_size < 256:
        raise ModelLoadError(f"a random model's vocabulary must hold the 256 bytes; vocab_size={vocab_size}")
    bos = bos_token_id if bos_token_id is not None and bos_token_id < vocab_size else None
    eos = [e for e in eos_token_ids if e < vocab_size]
    first_special = min([i for i in (bos, *eos) if i is not None and i >= 256], default=vocab_size)
    table = byte_to_unicode()
    chars = [table[b] for b in range(256)]
    vocab = {ch: b for b, ch in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    # Level by level: every string of the last level followed by every byte, so each merge's
    # left part exists (and is ranked) before the merge that extends it.
    level = list(chars)
    while len(vocab) < first_special:
        nxt = []
        for left in level:
            for right in chars:
                if len(vocab) == first_special:
                    break
                vocab[left + right] = len(vocab)
                merges.append((left, right))
                nxt.append(left + right)
        level = nxt
    names = {i: chars[i] for i in (bos, *eos) if i is not None and i < 256}
    if bos is not None:
        names.setdefault(bos, "<|begin_of_text|>")
    for k, e in enumerate(eos):
        names.setdefault(e, "<|end_of_text|>" if k == 0 else f"<|eot_{k}|>")
    specials = [names.get(i, f"<|reserved_special_token_{i - first_special}|>")
                for i in range(first_special, vocab_size)]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    special_ids = set(range(first_special, vocab_size)) | {i for i in (bos, *eos) if i is not None}
    return GGUFTokenizerData(backend=backend, bos_token_id=bos, eos_token_id=eos[0] if eos else None,
                             add_bos_token=bos is not None, chat_template=None, special_token_ids=special_ids,
                             bos_token=names.get(bos), eos_token=names.get(eos[0]) if eos else None)
