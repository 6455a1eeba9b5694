"""Draft-model speculative decoding: greedy output equals speculation off; a draft equal
to the target has every draft accepted (its KV is kept in step); no blocks leak; the two
KV pools share one budget block for block; the draft's catch-up never exceeds the step's
token budget; embedding and opted-out requests get no drafts and no draft blocks."""

from __future__ import annotations

import random

import pytest

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config
from llmesh.engine.pooling_params import PoolingParams
from llmesh.engine.request import Request
from tests.engine.hf_reference import hf_greedy, load_hf
from tests.fixtures.tiny_models import build_tiny_model


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


@pytest.fixture(scope="module")
def one_layer_draft(tmp_path_factory) -> str:
    """A llama with half the target's layers: half its KV bytes per block."""
    return build_tiny_model(str(tmp_path_factory.mktemp("draft") / "llama1"), "llama", seed=1, num_hidden_layers=1)


def _pool_bytes(runner) -> int:
    return runner.kv_caches.numel() * runner.kv_caches.element_size()


def test_kv_cache_memory_is_the_budget_of_both_pools(tiny_model_dirs, one_layer_draft):
    budget = 100_000
    engine = _engine(tiny_model_dirs["llama"], one_layer_draft, block_size=4, kv_cache_memory=budget)
    target, draft = engine.runner, engine.core.proposer.runner
    assert draft.kv_bytes_per_block * 2 == target.kv_bytes_per_block
    assert target.num_blocks == draft.num_blocks == engine.kv.num_total_blocks
    assert _pool_bytes(target) == target.kv_pool_bytes and _pool_bytes(draft) == draft.kv_pool_bytes
    assert _pool_bytes(target) + _pool_bytes(draft) <= budget
    # the whole budget is split, not just what is left after the target's pool
    assert (target.num_blocks + 1) * (target.kv_bytes_per_block + draft.kv_bytes_per_block) > budget
    assert engine.core.proposer.num_free_blocks == draft.num_blocks


def test_num_kv_blocks_sizes_both_pools(tiny_model_dirs, one_layer_draft):
    engine = _engine(tiny_model_dirs["llama"], one_layer_draft, block_size=4, num_kv_blocks=37)
    assert engine.runner.num_blocks == engine.core.proposer.runner.num_blocks == 37
    assert engine.core.proposer.runner.kv_caches.shape[2] == 37


def test_catch_up_is_chunked_by_the_step_budget(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (100, 70)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine = _engine(path, path, block_size=4, max_num_batched_tokens=16)
    tokens = _run(engine, prompts, params, [0, 4])
    hf = load_hf(path)
    assert tokens == [hf_greedy(hf, p, 40)[0] for p in prompts]
    forward = engine.core.proposer.forward_stats
    assert forward.max_tokens <= 16
    assert forward.tokens >= sum(len(p) for p in prompts)  # it did catch up on both prompts
    stats = engine.core.spec_stats
    assert stats.verify_steps > 0 and stats.accepted == stats.proposed  # the chunked KV is exact
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks
    assert engine.core.proposer.num_free_blocks == engine.core.proposer.runner.num_blocks


def test_no_drafts_nor_blocks_for_embedding_or_opted_out_requests(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    engine = _engine(path, path, block_size=4, num_kv_blocks=64)
    proposer = engine.core.proposer
    prompt = list(range(3, 30))
    opted_out = Request("out", prompt, SamplingParams(max_tokens=8, temperature=0.0, speculative=False))
    embedding = Request("emb", prompt, SamplingParams(max_tokens=1), pooling=PoolingParams(mode="last"))
    speculating = Request("spec", prompt, SamplingParams(max_tokens=8, temperature=0.0))
    proposals = proposer.propose([opted_out, embedding, speculating], [3, 3, 3])
    assert [len(p.token_ids) for p in proposals] == [0, 0, 3]
    used = -(-(len(prompt) + 2) // 4)
    assert proposer.num_free_blocks == proposer.runner.num_blocks - used
    proposer.retain(set())
    assert proposer.num_free_blocks == proposer.runner.num_blocks
