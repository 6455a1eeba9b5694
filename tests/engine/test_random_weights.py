"""random:<preset> models (benchmark shapes) build and run through the engine."""

from __future__ import annotations

import dataclasses

import pytest

from llmesh.engine import LLM, ModelLoadError, SamplingParams
from llmesh.engine.loader.random_weights import PRESETS, RandomWeights, parameter_shapes


def test_presets_have_the_published_shapes():
    c = PRESETS["llama3-8b"]
    n = sum(a * (b if len(s) > 1 else 1) for _, s in parameter_shapes(c) for a, b in [(s[0], s[-1])])
    assert 8.0e9 < n < 8.1e9  # Llama-3-8B has 8.03B parameters
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_key_value_heads) == (32, 4096, 14336, 8)


def test_a_small_random_model_generates(monkeypatch):
    small = dataclasses.replace(PRESETS["llama3.2-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300)
    monkeypatch.setitem(PRESETS, "tiny-test", small)
    llm = LLM("random:tiny-test", dtype="float32", device="cpu", num_kv_blocks=32)
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
    names = [n for n, _ in RandomWeights(small, device=None)]
    assert names == [n for n, _ in parameter_shapes(small)]


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="llama3-8b"):
        LLM("random:nope", device="cpu")
