"""A GGUF file (llama.cpp's format): its metadata as a ModelConfig, and its tensors under
Hugging Face names, dequantized to float32 and in HF layout.

llama.cpp's converter interleaves the rows of each head of the Llama Q and K projections
(its RoPE rotates adjacent pairs; HF's rotates the two halves of a head). GGUFWeights
undoes that for the ``llama`` architecture so one model implementation serves both
formats; Qwen2/3 files are written unpermuted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.gguf_reader import ReaderTensor

from llmesh.engine.errors import ModelLoadError, UnsupportedModelError
from llmesh.engine.loader.gguf_dequant import check_supported, dequantize
from llmesh.engine.loader.progress import tensor_progress
from llmesh.engine.model.config import ModelConfig
from llmesh.engine.quant.packed import QuantizedWeight

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")
"""``general.architecture`` values llmesh serves (Mistral, SmolLM and Mixtral files say ``llama``;
a ``llama`` file with experts is a Mixtral)."""

_MOE_ARCHITECTURES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
"""GGUF architecture → ModelConfig.architecture, where the spellings differ."""

_NORM_TOPK_DEFAULT = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}
"""Whether llama.cpp renormalises the top-k weights of each architecture when the file has no
``expert_weights_norm`` key (its qwen2moe graph does not, its qwen3moe graph does)."""

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
    # Mixtures of experts: the experts come stacked [E, ...] (model/moe.py takes both forms).
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_NAME_RE = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<module>[a-z_]+)\.(?P<kind>weight|bias)$")

ROPE_FREQS_TENSOR = "rope_freqs.weight"
"""Llama 3.1+ files store RoPE frequency factors as a tensor; they become config.rope_scaling."""

LLAMA3_ORIGINAL_CONTEXT = 8192
"""Llama 3's pre-extension window, used when the file does not state one."""


@dataclass
class GGUFFile:
    """An opened GGUF: the reader (memory-mapped), its metadata as Python values, its tensors."""

    path: str
    reader: GGUFReader
    metadata: dict[str, Any]
    tensors: dict[str, ReaderTensor]
    """By GGUF name, in file order."""


def open_gguf(path: str) -> GGUFFile:
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader fails with numpy errors on truncated or corrupt files
        raise ModelLoadError(f"cannot read GGUF file {path} (truncated or corrupt?): {exc}") from exc
    if reader.endianess.name != "LITTLE":
        raise UnsupportedModelError(f"{path} is a big-endian GGUF; llmesh reads little-endian files only")
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    return GGUFFile(path=path, reader=reader, metadata=metadata, tensors=tensors)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor; None for tensors with no HF weight (rope_freqs).

    Raises UnsupportedModelError for a tensor llmesh's model has no place for.
    """
    if gguf_name == ROPE_FREQS_TENSOR:
        return None
    match = _NAME_RE.match(gguf_name)
    if match is not None:
        layer, module, kind = match["layer"], match["module"], match["kind"]
        if layer is None and module in _TOP_LEVEL_NAMES:
            return f"{_TOP_LEVEL_NAMES[module]}.{kind}"
        if layer is not None and module in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[module]}.{kind}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no counterpart in llmesh's Llama-family model")


def _shape(tensor: ReaderTensor) -> tuple[int, ...]:
    """Row-major shape: GGUF lists dimensions innermost first (ne0, ne1, ...)."""
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


class _Meta:
    """Typed access to ``{arch}.*`` keys, with errors that name the missing key."""

    def __init__(self, gguf: GGUFFile, arch: str) -> None:
        self.gguf, self.arch = gguf, arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.gguf.metadata.get(f"{self.arch}.{key}", default)

    def required(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedModelError(f"GGUF file {self.gguf.path} lacks metadata key '{self.arch}.{key}'")
        return value


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _uniform(value: Any, key: str) -> int:
    """A per-model count that some files store per layer; llmesh needs one value for all."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"GGUF key {key!r} varies per layer ({value}); llmesh needs one value")
        value = value[0]
    return int(value)


def _rope_scaling(gguf: GGUFFile, meta: _Meta, theta: float, head_dim: int) -> dict[str, Any] | None:
    scaling_type = meta.get("rope.scaling.type")
    factor = meta.get("rope.scaling.factor")
    if scaling_type in (None, "none") and meta.get("rope.scale_linear") is not None:
        scaling_type, factor = "linear", meta.get("rope.scale_linear")
    if scaling_type == "linear":
        if factor is None:
            raise UnsupportedModelError(f"GGUF key '{meta.arch}.rope.scaling.factor' is missing for linear RoPE")
        return {"rope_type": "linear", "factor": _f32(factor)}
    if scaling_type not in (None, "none"):
        raise UnsupportedModelError(
            f"GGUF rope scaling type {scaling_type!r} ('{meta.arch}.rope.scaling.type') is not supported; "
            f"llmesh implements 'linear' and Llama 3 frequency factors")
    if ROPE_FREQS_TENSOR in gguf.tensors:
        original = int(meta.get("rope.scaling.original_context_length") or LLAMA3_ORIGINAL_CONTEXT)
        factors = np.asarray(gguf.tensors[ROPE_FREQS_TENSOR].data, dtype=np.float64).reshape(-1)
        return llama3_scaling_from_freq_factors(factors, theta, head_dim, original)
    return None


def llama3_scaling_from_freq_factors(factors: np.ndarray, theta: float, head_dim: int,
                                     original_max_position_embeddings: int) -> dict[str, Any] | None:
    """Recover HF's llama3 rope_scaling from the per-frequency factors llama.cpp stored.

    llama.cpp writes 1 for high frequencies, ``factor`` for low ones and a smooth blend
    between; Meta's releases all use low_freq_factor=1 and high_freq_factor=4, so those
    are assumed and then checked against every stored factor.
    factors: [head_dim // 2].
    """
    if factors.shape != (head_dim // 2,):
        raise UnsupportedModelError(
            f"GGUF tensor {ROPE_FREQS_TENSOR!r} has {factors.size} values, expected head_dim/2 = {head_dim // 2}")
    factor = float(factors.max())
    if factor == 1.0 and float(factors.min()) == 1.0:
        return None
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": original_max_position_embeddings}
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [head_dim // 2]
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / scaling["low_freq_factor"]
    high_wavelen = original_max_position_embeddings / scaling["high_freq_factor"]
    smooth = (original_max_position_embeddings / wavelen - 1.0) / (4.0 - 1.0)
    expected = np.where(wavelen < high_wavelen, 1.0,
                        np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(expected, factors, rtol=1e-3, atol=1e-4):
        raise UnsupportedModelError(
            f"GGUF tensor {ROPE_FREQS_TENSOR!r} holds RoPE frequency factors that do not follow Llama 3 "
            f"scaling (low_freq_factor=1, high_freq_factor=4); llmesh cannot serve them")
    return scaling


def gguf_model_config(gguf: GGUFFile, name: str) -> ModelConfig:
    """Build the ModelConfig from a GGUF's metadata (and, where metadata is silent, its tensors)."""
    arch = gguf.metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} (general.architecture) is not supported; llmesh serves "
            f"{', '.join(GGUF_ARCHITECTURES)}")
    meta = _Meta(gguf, arch)
    hidden = int(meta.required("embedding_length"))
    heads = _uniform(meta.required("attention.head_count"), f"{arch}.attention.head_count")
    kv_heads = _uniform(meta.get("attention.head_count_kv", heads), f"{arch}.attention.head_count_kv")
    head_dim = int(meta.get("attention.key_length") or hidden // heads)
    value_dim = int(meta.get("attention.value_length") or head_dim)
    rope_dim = int(meta.get("rope.dimension_count") or head_dim)
    if value_dim != head_dim or rope_dim != head_dim:
        raise UnsupportedModelError(
            f"GGUF head sizes key={head_dim}, value={value_dim}, rope={rope_dim} differ; "
            f"llmesh needs them equal (full-width RoPE)")
    theta = _f32(meta.get("rope.freq_base") or 10000.0)
    embed = gguf.tensors.get("token_embd.weight")
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if embed is not None:
        vocab_size = _shape(embed)[0]
    elif meta.get("vocab_size") is not None:
        vocab_size = int(meta.get("vocab_size"))
    elif tokens:
        vocab_size = len(tokens)
    else:
        raise UnsupportedModelError(f"GGUF file {gguf.path} has neither token_embd.weight nor a token list")
    eos_ids = [gguf.metadata[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if gguf.metadata.get(key) is not None]
    window = meta.get("attention.sliding_window")
    experts = int(meta.get("expert_count") or 0)
    architecture = _MOE_ARCHITECTURES.get(arch, "mixtral" if arch == "llama" and experts else arch)
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_uniform(meta.get("feed_forward_length") or meta.required("expert_feed_forward_length"),
                                   f"{arch}.feed_forward_length"),
        num_hidden_layers=int(meta.required("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta.required("context_length")),
        rms_norm_eps=_f32(meta.get("attention.layer_norm_rms_epsilon") or 1e-6),
        rope_theta=theta,
        rope_scaling=_rope_scaling(gguf, meta, theta, head_dim),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors,
        sliding_window=int(window) if window else None,
        bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=list(dict.fromkeys(int(i) for i in eos_ids)),
        torch_dtype="float32",
        name=name,
        **_experts(gguf, meta, architecture, experts),
    )


def _experts(gguf: GGUFFile, meta: _Meta, architecture: str, experts: int) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields. GGUF has no sparse-step key: a layer is sparse
    when its router tensor (ffn_gate_inp) is in the file."""
    if not experts:
        stray = next((n for n in gguf.tensors if ".ffn_gate_inp" in n or "_exps." in n or "_shexp." in n), None)
        if stray is not None:
            raise UnsupportedModelError(f"GGUF tensor {stray!r} belongs to a mixture of experts, and the file "
                                        f"has no '{meta.arch}.expert_count'")
        return {}
    if architecture not in _NORM_TOPK_DEFAULT:
        raise UnsupportedModelError(f"GGUF architecture {meta.arch!r} has '{meta.arch}.expert_count' = {experts}; "
                                    f"mixtures of experts are served as {', '.join(sorted(_NORM_TOPK_DEFAULT))}")
    top_k = int(meta.required("expert_used_count"))
    if not 0 < top_k <= experts:
        raise UnsupportedModelError(f"GGUF '{meta.arch}.expert_used_count' = {top_k} must be in 1..{experts} "
                                    f"(the expert count)")
    layers = int(meta.required("block_count"))
    dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in gguf.tensors]
    shared = "blk.{}.ffn_gate_shexp.weight"
    shared_size = next((_shape(gguf.tensors[shared.format(i)])[0] for i in range(layers)
                        if shared.format(i) in gguf.tensors), 0)
    norm = meta.get("expert_weights_norm")
    expert_ffn = meta.get("expert_feed_forward_length") or meta.required("feed_forward_length")
    return dict(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=_uniform(expert_ffn, f"{meta.arch}.expert_feed_forward_length"),
                norm_topk_prob=_NORM_TOPK_DEFAULT[architecture] if norm is None else bool(norm),
                shared_expert_intermediate_size=int(shared_size), mlp_only_layers=dense)


def reverse_rope_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``).

    Within a head, HF orders rows half-major (first halves of all rotation pairs, then
    second halves); llama.cpp orders them pair-major (the two halves of a pair adjacent).
    weight: [n_head * head_dim, ...] (a weight [out, in] or a bias [out]) → same shape.
    """
    head_dim = weight.shape[0] // n_head
    rest = weight.shape[1:]
    return weight.reshape(n_head, head_dim // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


class GGUFWeights:
    """The file's tensors as (hf_name, float32 tensor) pairs, dequantized one at a time, or
    with ``keep_quantized`` its Q8_0 / Q4_0 / Q4_1 matrices as packed weights (quant/packed.py).

    Construction checks every tensor's name and type, so an unsupported file fails before
    any weight is read. Re-iterable; reads go through the reader's memory map.
    """

    def __init__(self, gguf: GGUFFile, config: ModelConfig, keep_quantized: bool = False) -> None:
        self._gguf = gguf
        self._config = config
        self._keep = keep_quantized
        """Yield Q8_0 / Q4_0 / Q4_1 matrices packed (quant/gguf_blocks.py) instead of dequantized."""
        self._entries: list[tuple[str, ReaderTensor]] = []
        for gguf_name, tensor in gguf.tensors.items():
            hf_name = hf_tensor_name(gguf_name)
            if hf_name is None:
                continue
            check_supported(int(tensor.tensor_type), gguf_name)
            self._entries.append((hf_name, tensor))

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return tensor_progress(self._read(), len(self), self._gguf.path)

    def _read(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        from llmesh.engine.quant.config import GGUF_KEPT_TYPES

        for hf_name, tensor in self._entries:
            shape = _shape(tensor)
            if self._keep and tensor.tensor_type.name in GGUF_KEPT_TYPES and len(shape) == 2:
                yield hf_name, self._packed(hf_name, tensor, shape)
                continue
            raw = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(-1))
            weight = dequantize(raw, int(tensor.tensor_type), shape, tensor.name)
            yield hf_name, self._to_hf_layout(hf_name, weight)

    def _packed(self, hf_name: str, tensor: ReaderTensor, shape: tuple[int, ...]) -> QuantizedWeight:
        from llmesh.engine.quant.gguf_blocks import rows_to_weight

        # rows: [N, K / 32 blocks as bytes]; the Q/K un-permutation moves whole rows, so it
        # applies to the raw blocks as it does to dequantized values.
        rows = torch.from_numpy(np.array(tensor.data).view(np.uint8).reshape(shape[0], -1))
        return rows_to_weight(self._to_hf_layout(hf_name, rows).contiguous(), tensor.tensor_type.name, shape[1])

    def _to_hf_layout(self, hf_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self._config.architecture not in ("llama", "mixtral"):
            return weight
        if ".self_attn.q_proj." in hf_name:
            return reverse_rope_permute(weight, self._config.num_attention_heads)
        if ".self_attn.k_proj." in hf_name:
            return reverse_rope_permute(weight, self._config.num_key_value_heads)
        return weight
