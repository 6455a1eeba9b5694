"""Draft-model speculative decoding: greedy output equals speculation off; a draft equal
to the target has every draft accepted (its KV is kept in step); no blocks leak."""

from __future__ import annotations

import random

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config
from tests.engine.hf_reference import hf_greedy, load_hf


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(5, 40))] for _ in range(n)]


def _run(engine: LLMEngine, prompts, params, arrive_at):
    added, outs, step = set(), {}, 0
    while len(added) < len(prompts) or engine.has_unfinished_requests():
        for i, p in enumerate(prompts):
            if i not in added and arrive_at[i] <= step:
                engine.add_request(p, params, request_id=f"r{i}")
                added.add(i)
        for d in engine.step():
            outs.setdefault(d.request_id, []).extend(d.token_ids)
        step += 1
        assert step < 5000
    return [outs[f"r{i}"] for i in range(len(prompts))]


def _engine(path: str, draft: str, **kw) -> LLMEngine:
    spec = {"method": "draft", "model": draft, "num_speculative_tokens": 3}
    return LLMEngine(build_engine_config(path, dtype="float32", device="cpu", speculative_config=spec, **kw))


def test_draft_equal_to_target_accepts_everything(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    prompts = _prompts(3, seed=1)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = _engine(path, path, block_size=4, max_num_batched_tokens=16)
    tokens = _run(engine, prompts, params, [0, 1, 3])
    hf = load_hf(path)
    assert tokens == [hf_greedy(hf, p, 20)[0] for p in prompts]
    stats = engine.core.spec_stats
    assert stats.verify_steps > 0 and stats.accepted == stats.proposed
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks
    proposer = engine.core.proposer
    assert proposer.num_free_blocks == proposer.runner.num_blocks


def test_a_different_draft_keeps_greedy_output(tiny_model_dirs):
    path, draft = tiny_model_dirs["qwen3"], tiny_model_dirs["llama"]
    prompts = _prompts(4, seed=2)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = _engine(path, draft, block_size=4, num_kv_blocks=40, enable_prefix_caching=False)
    tokens = _run(engine, prompts, params, [0, 0, 2, 5])
    hf = load_hf(path)
    assert tokens == [hf_greedy(hf, p, 20)[0] for p in prompts]
    assert engine.core.spec_stats.verify_steps > 0
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks
