"""Activation-aware INT4 and INT8 (quant/activation_aware.py): on inputs with outlier channels
the searched scales cut the quantized layers' output error below round-to-nearest's, the folds
keep the float function, and the engine serves both on load."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmesh.engine.loader.random_weights import PRESETS, RandomWeights
from llmesh.engine.model.llama import LlamaForCausalLM
from llmesh.engine.quant.activation_aware import apply_awq, fold_awq_scales, output_error, quantize, search_scale
from llmesh.kernels.paged_attention import AttentionMetadata

TINY = dataclasses.replace(PRESETS["llama3.2-1b"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=300,
                           tie_word_embeddings=True)
OUTLIERS = (3, 77, 130, 201)


def _outlier_inputs(rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, k, generator=gen)
    x[:, list(OUTLIERS)] *= 25.0  # a few channels carry most of the activation energy (as in LLMs)
    return x


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_searched_scale_beats_round_to_nearest_on_held_out_inputs(fmt):
    gen = torch.Generator().manual_seed(0)
    n, k = 128, 256
    w = torch.randn(n, k, generator=gen) * 0.02
    calib, held_out = _outlier_inputs(256, k, gen), _outlier_inputs(256, k, gen)
    s, alpha, rtn_err, best_err = search_scale(w, calib, calib.abs().mean(0), 128, fmt=fmt)
    assert alpha > 0 and best_err < rtn_err
    rtn = output_error(w, held_out, torch.ones(k), 128, fmt)
    awq = output_error(w, held_out, s, 128, fmt)
    assert awq < 0.7 * rtn, (awq, rtn)


def test_formats_the_search_does_not_serve_are_refused():
    with pytest.raises(ValueError, match="int4, int8"):
        quantize(torch.zeros(4, 4), "fp8")


def _model(outliers: bool) -> LlamaForCausalLM:
    model = LlamaForCausalLM(TINY, RandomWeights(TINY, device=None, seed=1), device="cpu", dtype=torch.float32)
    if outliers:
        with torch.no_grad():
            for layer in model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm[list(OUTLIERS)] *= 30.0
    return model


def _forward(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    n, c = len(ids), model.config
    kv = torch.zeros((c.num_hidden_layers, 2, -(-n // 16), 16, c.num_key_value_heads, c.head_dim))
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(-(-n // 16), dtype=torch.int32)[None, :],
        seq_lens=torch.tensor([n], dtype=torch.int32), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n, max_seq_len=n, host_query_start_loc=[0, n], host_seq_lens=[n])
    return model.forward(torch.tensor(ids), torch.arange(n), kv, meta)  # [T, H]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_awq_model_output_is_closer_to_float_than_round_to_nearest(fmt):
    from llmesh.engine.quant.packed import Int4Weight, Int8Weight

    gen = torch.Generator().manual_seed(2)
    calib = torch.randint(0, TINY.vocab_size, (256,), generator=gen).tolist()
    held_out = torch.randint(0, TINY.vocab_size, (96,), generator=gen).tolist()
    ref = _forward(_model(True), held_out)

    rtn = _model(True)
    for layer in rtn.layers:
        for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            lin.weight = quantize(lin.weight, fmt)
    awq = _model(True)
    report = apply_awq(awq, calib, fmt=fmt)
    assert report.linears == 4 * TINY.num_hidden_layers and report.error_ratio < 1.0
    packed = Int4Weight if fmt == "int4" else Int8Weight
    assert all(isinstance(lin.weight, packed) for _, lin in awq.named_linears()) and awq.linear_method == fmt
    err_rtn = (_forward(rtn, held_out) - ref).pow(2).mean().item()
    err_awq = (_forward(awq, held_out) - ref).pow(2).mean().item()
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)


def test_folding_keeps_the_float_function():
    """The folds alone (scales into norms, v rows and up rows) leave the float output as it was."""
    model, ref_model = _model(True), _model(True)
    ids = torch.randint(0, TINY.vocab_size, (64,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = _forward(ref_model, ids)
    report = fold_awq_scales(model, ids, grid=(0.5,))
    assert report.mean_alpha == 0.5
    assert not torch.equal(model.layers[0].input_layernorm, ref_model.layers[0].input_layernorm)
    torch.testing.assert_close(_forward(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_engine_serves_activation_aware_int4_and_int8_on_load(monkeypatch, tmp_path):
    from llmesh.engine import LLM, SamplingParams
    from llmesh.engine.errors import UnsupportedModelError
    from llmesh.engine.quant.packed import Int4Weight, Int8Weight

    monkeypatch.setitem(PRESETS, "tiny-awq", TINY)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    llm = LLM("random:tiny-awq", dtype="float32", device="cpu", num_kv_blocks=32, quantization="int4",
              activation_aware=True, calibration_text=str(text))
    runner = llm.engine.core.runner
    assert runner.awq_report.linears == 4 * TINY.num_hidden_layers
    assert isinstance(runner.model.layers[0].qkv_proj.weight, Int4Weight)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    llm8 = LLM("random:tiny-awq", dtype="float32", device="cpu", num_kv_blocks=32, quantization="int8",
               activation_aware=True, calibration_text=str(text))
    assert isinstance(llm8.engine.core.runner.model.layers[0].down_proj.weight, Int8Weight)
    assert len(llm8.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.0,
                                                             ignore_eos=True))[0].token_ids) == 4
    with pytest.raises(UnsupportedModelError, match="activation_aware calibrates int4 or int8"):
        LLM("random:tiny-awq", dtype="float32", device="cpu", num_kv_blocks=32, quantization="fp8",
            activation_aware=True, calibration_text=str(text))
    with pytest.raises(UnsupportedModelError, match="calibration_text"):
        LLM("random:tiny-awq", dtype="float32", device="cpu", num_kv_blocks=32, quantization="int4",
            activation_aware=True, calibration_text=str(tmp_path / "missing.txt"))


def test_mixture_of_experts_is_refused(tmp_path):
    from llmesh.engine import LLM
    from llmesh.engine.errors import UnsupportedModelError
    from tests.fixtures.tiny_models import build_tiny_model

    path = build_tiny_model(str(tmp_path / "qwen3_moe"), "qwen3_moe")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        LLM(path, dtype="float32", device="cpu", num_kv_blocks=32, quantization="int4",
            activation_aware=True, calibration_text=str(text))
