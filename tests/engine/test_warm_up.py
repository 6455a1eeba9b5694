"""The engine's warm-up step (core/warm_up.py): one step of the whole token budget sampling
max_num_seqs rows, on a private scheduler, leaving no blocks, requests or sampler rows behind;
on a GPU the engine core runs it before serving and its stats describe requests only."""

from __future__ import annotations

import pytest
import torch

from llmesh.engine import LLM, SamplingParams
from llmesh.engine.core.warm_up import warm_up, warm_up_shape

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("limits,want", [
    ((1024, 16384, 2048, 10_000, 16), (1024, 16)),  # vLLM's offline limits: 1,024 prompts of 16 tokens
    ((8, 256, 128, 256, 16), (8, 32)),
    ((64, 100, 4096, 1000, 16), (64, 1)),  # a budget of fewer than 2 tokens a row: 1-token prompts
    ((64, 16384, 100, 1000, 16), (64, 99)),  # a prompt is at most max_model_len - 1 tokens
    ((1024, 16384, 2048, 100, 16), (50, 16)),  # a small pool: each request holds its prompt's blocks
])
def test_shape_fills_the_budget_within_the_limits(limits, want):
    seqs, length = warm_up_shape(*limits)
    assert (seqs, length) == want
    max_num_seqs, budget, max_model_len, num_blocks, block_size = limits
    assert seqs <= max_num_seqs and seqs * length <= max(budget, length) and length < max_model_len
    assert seqs * -(-(length + 1) // block_size) <= num_blocks


def test_warm_up_runs_the_peak_step_and_leaves_nothing(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", dtype="float32", max_num_seqs=6, max_num_batched_tokens=60,
              max_model_len=64, num_kv_blocks=64)
    core = llm.engine.core
    want = [o.token_ids for o in llm.generate([[5, 6, 7, 8], [9, 10]], GREEDY)]
    took = warm_up(core.runner, core.config, core.max_model_len)
    assert took["warm_up_requests"] == 6 and took["warm_up_prompt_tokens"] == 10
    assert took["warm_up_steps"] == 1  # 60 tokens, 6 sampled rows: one step
    assert core.kv.num_used_blocks == 0 and not core.scheduler.has_unfinished_requests()
    assert core.runner.sampler.output_counts.num_rows == 0  # the sampler keeps no warm-up row
    # The engine serves as before: same greedy tokens.
    again = llm.generate([[5, 6, 7, 8], [9, 10]], GREEDY)
    assert [o.token_ids for o in again] == want


def _warm_up_prompt_hits(llm: LLM, length: int) -> int:
    """Cached tokens of a request whose prompt is the warm-up's (the engine's prefix cache must
    hold none of it)."""
    from llmesh.engine.core.warm_up import WARM_UP_TOKEN

    return llm.generate([[WARM_UP_TOKEN] * length], GREEDY)[0].num_cached_tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the engine core warms up on a GPU only")
def test_gpu_engine_warms_up_before_serving(tiny_llama):
    pytest.importorskip("triton")
    llm = LLM(tiny_llama, device="cuda", backend="triton", dtype="float32", max_num_seqs=8,
              max_num_batched_tokens=256, max_model_len=128, num_kv_blocks=128)
    core = llm.engine.core
    assert core.warm_up_stats["warm_up_requests"] == 8 and core.warm_up_stats["warm_up_steps"] == 1
    stats = core.runner.stats
    assert stats.eager_steps == stats.decode_graph_steps == stats.mixed_graph_steps == 0
    assert core.kv.num_used_blocks == 0
    assert _warm_up_prompt_hits(llm, core.warm_up_stats["warm_up_prompt_tokens"]) == 0
    out = llm.generate([[5, 6, 7, 8]], GREEDY)
    cpu = LLM(tiny_llama, device="cpu", dtype="float32").generate([[5, 6, 7, 8]], GREEDY)
    assert out[0].token_ids == cpu[0].token_ids
