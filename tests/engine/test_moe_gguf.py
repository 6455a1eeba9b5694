"""Mixture-of-experts GGUF files: the tiny HF MoE models written as llama.cpp's converter
writes them (experts stacked into ffn_{gate,up,down}_exps, the router as ffn_gate_inp, the
shared expert as *_shexp, Mixtral as a ``llama`` file with permuted Q/K) load into the same
model: greedy tokens equal HF's on the original folder."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from llmesh.engine.loader.load import load_model
from tests.engine.test_fidelity import _engine, _prompts, _reference, _run
from tests.engine.test_loader_gguf import _llamacpp_permute
from tests.fixtures.tiny_models import build_tiny_model

_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "block_sparse_moe.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
_EXPERT_PROJ = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps",
                "w3": "ffn_up_exps", "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}


def hf_moe_to_gguf(folder: str, path: Path) -> None:
    """What convert_hf_to_gguf.py writes for these architectures, in float32."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[cfg["model_type"]]
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    experts = cfg.get("num_experts") or cfg["num_local_experts"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    if "moe_intermediate_size" in cfg:
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if cfg.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    w.add_tokenizer_model("gpt2")
    chars = [chr(c) for c in range(ord("!"), ord("!") + cfg["vocab_size"] - 5)]
    w.add_token_list(["<unk>", "<s>", "</s>", *chars, "ab", "abc"])
    w.add_token_types([1] * cfg["vocab_size"])
    w.add_token_merges(["a b", "ab c"])
    w.add_eos_token_id(cfg["eos_token_id"])
    stacked: dict[str, list[np.ndarray | None]] = {}
    for name, value in tensors.items():
        module, kind = name.rsplit(".", 1)
        if module in ("model.embed_tokens", "model.norm", "lm_head"):
            w.add_tensor({"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[module]
                         + f".{kind}", value)
            continue
        layer, rest = module.removeprefix("model.layers.").split(".", 1)
        if ".experts." in rest:
            _, expert, proj = rest.rsplit(".", 2)
            stacked.setdefault(f"blk.{layer}.{_EXPERT_PROJ[proj]}.weight", [None] * experts)[int(expert)] = value
            continue
        if arch == "llama" and rest == "self_attn.q_proj":
            value = _llamacpp_permute(value, cfg["num_attention_heads"])
        elif arch == "llama" and rest == "self_attn.k_proj":
            value = _llamacpp_permute(value, cfg["num_key_value_heads"])
        elif rest == "mlp.shared_expert_gate":
            value = value.reshape(-1)  # llama.cpp keeps it a vector
        w.add_tensor(f"blk.{layer}.{_BLOCK[rest]}.{kind}", value)
    for name, parts in stacked.items():
        w.add_tensor(name, np.stack(parts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_gguf_equals_hf(tmp_path_factory, arch):
    root = tmp_path_factory.mktemp(f"moe-gguf-{arch}")
    folder = build_tiny_model(str(root / arch), arch)
    path = root / f"{arch}.gguf"
    hf_moe_to_gguf(folder, path)
    hf_cfg = load_model(folder).config
    cfg = load_model(str(path)).config
    for field in ("architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "shared_expert_intermediate_size", "qk_norm", "attention_bias"):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field
    assert cfg.sparse_layers == hf_cfg.sparse_layers
    prompts = _prompts(3, seed=9)
    tokens, _ = _run(_engine(str(path)), prompts, arrive_at=[0, 1, 2])
    assert tokens == _reference(folder, prompts)
