"""Async output (step N's tokens detokenized while step N+1 computes) changes nothing a
caller sees: same tokens, same text, stop strings never emitted, no KV block leaked."""

from __future__ import annotations

import random

import pytest

from llmesh.engine import LLM, FinishReason, SamplingParams


@pytest.fixture(scope="module")
def pair(tiny_llama):
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=256)
    return LLM(tiny_llama, async_output=False, **kw), LLM(tiny_llama, async_output=True, **kw)


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def test_same_tokens_and_text(pair):
    sync, async_ = pair
    assert async_.engine.async_output and not sync.engine.async_output
    prompts = _prompts(6, 1)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (1, 2, 5, 9, 13, 20)]
    a, b = sync.generate(prompts, params), async_.generate(prompts, params)
    assert [(o.token_ids, o.text, o.finish_reason) for o in a] == [(o.token_ids, o.text, o.finish_reason) for o in b]


def test_stop_strings_and_blocks(pair):
    sync, async_ = pair
    prompts = _prompts(4, 2)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    texts = [o.text for o in sync.generate(prompts, greedy)]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[t[4:7]]) for t in texts]
    a, b = sync.generate(prompts, params), async_.generate(prompts, params)
    for x, y, t in zip(a, b, texts):
        assert y.text == x.text == t[: t.index(t[4:7])]
        assert y.finish_reason is FinishReason.STOP and y.stop_reason == x.stop_reason
        assert y.token_ids == x.token_ids
    assert async_.engine.kv.num_used_blocks == 0 and not async_.engine.has_unfinished_requests()


def test_abort_mid_stream(pair):
    _, async_ = pair
    eng = async_.engine
    eng.add_request([5] * 20, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), request_id="ab")
    for _ in range(4):
        eng.step()
    assert eng.abort_request("ab") > 0
    finals = []
    while eng.has_unfinished_requests():
        finals += [d for d in eng.step() if d.finished]
    assert [d.finish_reason for d in finals] == [FinishReason.ABORT]
    assert eng.kv.num_used_blocks == 0
