"""Async scheduling (step N+1 launched before step N's tokens are processed; decode inputs
read on the device) changes nothing a caller sees: same tokens, same text, stop strings never
emitted, no KV block leaked."""

from __future__ import annotations

import random

import pytest

from llmesh.engine import LLM, FinishReason, SamplingParams


@pytest.fixture(scope="module")
def pair(tiny_llama):
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=256)
    return LLM(tiny_llama, async_scheduling=False, **kw), LLM(tiny_llama, async_scheduling=True, **kw)


def _prompts(n, seed):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(4, 40))] for _ in range(n)]


def test_same_tokens_and_text(pair):
    sync, async_ = pair
    assert async_.engine.async_scheduling and not sync.engine.async_scheduling
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


def test_preemption_chunking_and_prefix_hits_match_sync(tiny_llama):
    """A pool too small for the batch (preemption), a small token budget (chunked prefill),
    shared prefixes (cache hits), stop tokens and mixed lengths: async equals sync."""
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=14, block_size=4, max_model_len=96,
              max_num_batched_tokens=20, max_num_seqs=6)
    sync, async_ = LLM(tiny_llama, async_scheduling=False, **kw), LLM(tiny_llama, async_scheduling=True, **kw)
    rng = random.Random(5)
    shared = [rng.randrange(3, 512) for _ in range(9)]
    prompts = [shared + [rng.randrange(3, 512) for _ in range(rng.randrange(1, 14))] for _ in range(9)]
    greedy = [SamplingParams(max_tokens=rng.randrange(1, 24), temperature=0.0, ignore_eos=True) for _ in prompts]
    first = sync.generate(prompts, greedy)
    # stop on a token each request really produces, so some end early by stop token id
    params = [SamplingParams(max_tokens=g.max_tokens, temperature=0.0, ignore_eos=True,
                             stop_token_ids=[o.token_ids[len(o.token_ids) // 2]] if i % 3 == 0 else [])
              for i, (g, o) in enumerate(zip(greedy, first))]
    a, b = sync.generate(prompts, params), async_.generate(prompts, params)
    assert [(o.token_ids, o.finish_reason, o.stop_reason) for o in a] == \
        [(o.token_ids, o.finish_reason, o.stop_reason) for o in b]
    assert async_.engine.scheduler.num_preemptions_total > 0, "the pool was meant to force preemption"
    assert async_.engine.kv.num_used_blocks == 0 and not async_.engine.has_unfinished_requests()


def test_seeded_sampling_and_penalties_match_sync(tiny_llama):
    """Seeded random sampling keeps its stream; penalties count the tokens of the step in
    flight on the device. Same tokens either way."""
    kw = dict(dtype="float32", device="cpu", num_kv_blocks=64, max_model_len=256)
    sync, async_ = LLM(tiny_llama, async_scheduling=False, **kw), LLM(tiny_llama, async_scheduling=True, **kw)
    prompts = _prompts(5, 9)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=11 + i, ignore_eos=True,
                             frequency_penalty=0.5 if i % 2 else 0.0) for i in range(5)]
    a, b = sync.generate(prompts, params), async_.generate(prompts, params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
