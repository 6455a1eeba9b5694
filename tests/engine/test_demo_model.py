"""The demo model (SmolLM2-135M-Instruct, Q4_1 GGUF) answers chat prompts, and its greedy
output equals Hugging Face transformers' greedy on the same GGUF file."""

from __future__ import annotations

import os

import pytest

from llmesh.engine import LLM, SamplingParams
from llmesh.engine.loader import find_demo_model
from tests.engine.hf_reference import hf_greedy, load_hf

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a CPU does.",
    "List three primary colors.",
    "How many days are there in a week?",
]


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM(find_demo_model(), dtype="float32", device="cpu")


def test_demo_greedy_equals_hf(demo_llm):
    path = find_demo_model()
    hf = load_hf(os.path.dirname(path), gguf_file=os.path.basename(path))
    tok = demo_llm.get_tokenizer()
    convs = [[{"role": "user", "content": p}] for p in PROMPTS]
    outs = demo_llm.chat(convs, SamplingParams(max_tokens=64, temperature=0.0))
    eos = set(demo_llm.engine.eos_token_ids)
    for conv, out in zip(convs, outs):
        ref, _ = hf_greedy(hf, tok.encode_chat(conv), 64, eos=eos)
        assert out.token_ids == ref, f"diverged for {conv[0]['content']!r}: {out.text!r}"


def test_demo_answers_sensibly(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                        SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert "Paris" in out.text
    assert out.finish_reason is not None
