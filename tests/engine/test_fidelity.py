"""Greedy output of the engine equals Hugging Face transformers', token for token.

Tiny random-weight Llama, Qwen2 and Qwen3 models are loaded by both from the same
saved folder. Each scenario exercises a different engine path: continuous batching
with staggered arrivals, chunked prefill under a 7-token budget, a prefix-cache hit,
and preemption by recompute in a pool too small for everyone.
"""

from __future__ import annotations

import random

import pytest
import torch

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config
from tests.engine.hf_reference import hf_greedy, load_hf

NEW_TOKENS = 24


def _prompts(n: int, seed: int, lo: int = 5, hi: int = 70) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _engine(path: str, **kw) -> LLMEngine:
    kw.setdefault("dtype", "float32")
    kw.setdefault("device", "cpu")
    return LLMEngine(build_engine_config(path, **kw))


def _run(engine: LLMEngine, prompts, arrive_at=None, params=None):
    """Add prompt i before step arrive_at[i]; returns (tokens per prompt, Request objects)."""
    arrive_at = arrive_at or [0] * len(prompts)
    params = params or SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    reqs, outs, step = {}, {}, 0
    while len(reqs) < len(prompts) or engine.has_unfinished_requests():
        for i, p in enumerate(prompts):
            if i not in reqs and arrive_at[i] <= step:
                reqs[i] = engine.add_request(p, params, request_id=f"r{i}")
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
        assert step < 10_000, "engine did not drain"
    return [outs[f"r{i}"] for i in range(len(prompts))], [reqs[i] for i in range(len(prompts))]


def _reference(path: str, prompts):
    hf = load_hf(path)
    return [hf_greedy(hf, p, NEW_TOKENS)[0] for p in prompts]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_single_request_tokens_and_logits(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    prompt = _prompts(1, seed=1)[0]
    ref_tokens, ref_logits = hf_greedy(load_hf(path), prompt, NEW_TOKENS)
    engine = _engine(path)
    seen: list[torch.Tensor] = []
    engine.runner.logits_observer = lambda reqs, logits: seen.append(logits[0].clone())
    tokens, _ = _run(engine, [prompt])
    assert tokens[0] == ref_tokens
    assert len(seen) == len(ref_logits)
    worst = max(float((a - b).abs().max()) for a, b in zip(seen, ref_logits))
    assert worst < 1e-4, f"max |logit - HF logit| = {worst}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_concurrent_staggered_requests(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    prompts = _prompts(8, seed=2)
    tokens, _ = _run(_engine(path), prompts, arrive_at=[0, 0, 1, 2, 3, 5, 8, 13])
    assert tokens == _reference(path, prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_prefill_tiny_budget(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    prompts = _prompts(4, seed=3, lo=20, hi=60)
    engine = _engine(path, max_num_batched_tokens=7)
    tokens, _ = _run(engine, prompts, arrive_at=[0, 1, 4, 9])
    assert tokens == _reference(path, prompts)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_prefix_cache_hit(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    rng = random.Random(4)
    shared = [rng.randrange(3, 512) for _ in range(3 * 16 + 5)]  # 3 full blocks + a partial one
    first = shared + [rng.randrange(3, 512) for _ in range(7)]
    second = shared + [rng.randrange(3, 512) for _ in range(11)]
    engine = _engine(path, block_size=16)
    tokens_a, _ = _run(engine, [first])
    tokens_b, reqs = _run(engine, [second])
    assert reqs[0].num_cached_tokens == 48
    assert [tokens_a[0], tokens_b[0]] == _reference(path, [first, second])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_forced_preemption(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    prompts = _prompts(6, seed=5, lo=20, hi=40)
    # 6 requests of up to 39 + 24 tokens need ~4 blocks of 16 each; 12 blocks cannot hold them all.
    engine = _engine(path, block_size=16, num_kv_blocks=12, enable_prefix_caching=False)
    tokens, reqs = _run(engine, prompts)
    assert sum(r.num_preemptions for r in reqs) > 0, "the pool was meant to force preemption"
    assert tokens == _reference(path, prompts)
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks
