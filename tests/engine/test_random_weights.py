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


def test_random_tokenizer_covers_the_vocabulary_with_llama3_specials():
    from llmesh.engine.loader.random_weights import random_tokenizer_for
    from llmesh.engine.text.loading import load_tokenizer

    tok = load_tokenizer("random:llama3-8b")  # what the gateway loads: no weights built
    assert tok.vocab_size == 128256 and tok.bos_token_id == 128000 and tok.eos_token_ids == [128001]
    text = "Hello, wörld ✓ 123"
    ids = tok.encode(text)
    assert ids[0] == 128000 and max(ids[1:]) < 128000 and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode([128001], skip_special_tokens=False) == "<|end_of_text|>" and tok.decode([128001]) == ""
    assert tok.decode([128255], skip_special_tokens=False) == "<|reserved_special_token_255|>"
    assert tok.decode([127999]) and tok.decode([300, 70000]) == tok.decode([300]) + tok.decode([70000])
    same = random_tokenizer_for("random:llama3-8b").backend
    assert same.encode(text).ids == tok.backend.encode(text).ids


def test_random_tokenizer_of_a_toy_vocabulary_drops_out_of_range_specials():
    from llmesh.engine.loader.random_weights import full_vocab_tokenizer_data

    data = full_vocab_tokenizer_data(300, 128000, (128001,))
    assert data.backend.get_vocab_size(with_added_tokens=True) == 300
    assert data.bos_token_id is None and data.eos_token_id is None
    with pytest.raises(ModelLoadError, match="256 bytes"):
        full_vocab_tokenizer_data(200, None, ())
