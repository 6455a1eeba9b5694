"""Hugging Face ``config.json`` → ModelConfig, for the Llama family llmesh serves.

Anything the model code would silently get wrong (another architecture, another activation,
a RoPE variant llmesh does not implement, per-layer sliding windows) is refused here with
an UnsupportedModelError that names the field and its value, rather than served wrongly.
"""

from __future__ import annotations

from typing import Any

from llmesh.engine.errors import UnsupportedModelError
from llmesh.engine.model.config import ModelConfig

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
"""HF class name → ModelConfig.architecture. SmolLM and Llama 2/3/3.1 are LlamaForCausalLM."""

_MODEL_TYPES = {arch: arch for arch in HF_ARCHITECTURES.values()}

_DTYPES = {"float32": "float32", "float": "float32", "bfloat16": "bfloat16",
           "float16": "float16", "half": "float16"}

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if architectures:
        hf_class = architectures[0]
        if hf_class not in HF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {hf_class!r} is not supported; llmesh serves "
                f"{', '.join(HF_ARCHITECTURES)}")
        return HF_ARCHITECTURES[hf_class]
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported (config.json has no 'architectures'); "
            f"llmesh serves model types {', '.join(_MODEL_TYPES)}")
    return _MODEL_TYPES[model_type]


def _required(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise UnsupportedModelError(f"config.json has no {key!r}; it is required for this architecture")
    return config[key]


def normalize_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """One spelling for RoPE scaling: None, or a dict whose "rope_type" is llama3 or linear.

    HF configs name the kind "rope_type" (newer) or "type" (older); "default" means none.
    Other keys (rope_theta in transformers 5's rope_parameters) are dropped.
    """
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return None
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": float(_scaling_value(scaling, "linear", "factor"))}
    if rope_type == "llama3":
        out: dict[str, Any] = {"rope_type": "llama3"}
        for key in _LLAMA3_KEYS:
            out[key] = _scaling_value(scaling, "llama3", key)
        out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
        for key in _LLAMA3_KEYS[:3]:
            out[key] = float(out[key])
        return out
    raise UnsupportedModelError(
        f"rope scaling type {rope_type!r} is not supported; llmesh implements 'llama3' and 'linear'")


def _scaling_value(scaling: dict[str, Any], rope_type: str, key: str) -> Any:
    if scaling.get(key) is None:
        raise UnsupportedModelError(f"rope scaling of type {rope_type!r} needs {key!r}, which the config lacks")
    return scaling[key]


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling: top-level rope_theta + rope_scaling
    (transformers 4), or a rope_parameters dict holding both (transformers 5)."""
    params = config.get("rope_parameters") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise UnsupportedModelError(
            "rope_parameters with per-layer-type entries are not supported (one RoPE for all layers)")
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or params
    return float(theta), normalize_rope_scaling(scaling)


def _sliding_window(config: dict[str, Any], architecture: str) -> int | None:
    """The window only where the config turns it on. Qwen2/3 carry a sliding_window value even
    with use_sliding_window false; enabled, they window only some layers, which llmesh does not do."""
    if "use_sliding_window" in config:
        layer_types = config.get("layer_types") or []
        num_layers = int(config.get("num_hidden_layers") or 0)
        windowed_layers = max(0, num_layers - int(config.get("max_window_layers") or 0))
        if layer_types:
            windowed_layers = sum(kind != "full_attention" for kind in layer_types)
        if not config["use_sliding_window"] or not windowed_layers:
            return None
        raise UnsupportedModelError(
            f"use_sliding_window=true ({architecture}: per-layer sliding windows) is not supported")
    window = config.get("sliding_window")
    return int(window) if window else None


def _eos_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _check_features(config: dict[str, Any]) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; llmesh implements 'silu' (SwiGLU)")
    if config.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported (bias-free MLP only)")
    rope_parameters = config.get("rope_parameters") or {}
    partial = config.get("partial_rotary_factor", rope_parameters.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise UnsupportedModelError(f"partial_rotary_factor {partial!r} is not supported (full-width RoPE only)")


def model_config_from_hf(config: dict[str, Any], name: str) -> ModelConfig:
    """Build the ModelConfig for a parsed HF config.json; ``name`` is the served model name."""
    architecture = _architecture(config)
    _check_features(config)
    hidden = int(_required(config, "hidden_size"))
    heads = int(_required(config, "num_attention_heads"))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    theta, scaling = _rope(config)
    if architecture == "qwen2":
        attention_bias = True
    elif architecture == "qwen2_moe":
        attention_bias = bool(config.get("qkv_bias", True))
    else:
        attention_bias = bool(config.get("attention_bias", False))
    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in _DTYPES:
        raise UnsupportedModelError(f"torch_dtype {dtype!r} is not supported; use float32, bfloat16 or float16")
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(_required(config, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_required(config, "intermediate_size")),
        num_hidden_layers=int(_required(config, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=architecture in ("qwen3", "qwen3_moe"),
        sliding_window=_sliding_window(config, architecture),
        bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_eos_ids(config.get("eos_token_id")),
        torch_dtype=_DTYPES[dtype],
        name=name,
        **_experts(config, architecture),
    )


def _experts(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields; empty for a dense architecture."""
    if architecture == "mixtral":
        # Every layer sparse, the experts as wide as intermediate_size, top-k always renormalised.
        experts, top_k = int(_required(config, "num_local_experts")), int(_required(config, "num_experts_per_tok"))
        if not 0 < top_k <= experts:
            raise UnsupportedModelError(f"config.json: num_experts_per_tok ({top_k}) must be in 1..{experts} "
                                        f"(num_local_experts)")
        return dict(num_experts=experts, num_experts_per_tok=top_k,
                    moe_intermediate_size=int(_required(config, "intermediate_size")), norm_topk_prob=True)
    if architecture not in ("qwen2_moe", "qwen3_moe"):
        return {}
    # Released Qwen-MoE configs say num_experts; transformers 5 writes num_local_experts.
    experts = int(config.get("num_experts") or _required(config, "num_local_experts"))
    top_k = int(_required(config, "num_experts_per_tok"))
    if not 0 < top_k <= experts:
        raise UnsupportedModelError(f"num_experts_per_tok={top_k} must be in 1..num_experts={experts}")
    step = int(config.get("decoder_sparse_step") or 1)
    return dict(num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=int(_required(config, "moe_intermediate_size")),
                norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=int(config.get("shared_expert_intermediate_size") or 0),
                decoder_sparse_step=step, mlp_only_layers=[int(i) for i in config.get("mlp_only_layers") or []])
