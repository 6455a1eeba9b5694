"""Prompt logprobs equal Hugging Face transformers' log-softmax at every prompt position,
with chunked prefill, a prompt the prefix cache holds, preemption and batch mixes."""

from __future__ import annotations

import random

import pytest
import torch

from llmesh.engine import LLMEngine, SamplingParams, build_engine_config
from llmesh.engine.errors import InvalidRequestError
from tests.engine.hf_reference import load_hf

TOP = 3


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


@torch.no_grad()
def _hf_prompt_logprobs(path: str, prompt: list[int]) -> torch.Tensor:
    """[P - 1, V]: row i is the distribution of prompt token i + 1."""
    logits = load_hf(path)(torch.tensor([prompt])).logits[0].float()
    return logits[:-1].log_softmax(dim=-1)


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> dict[str, list]:
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(p, sp, request_id=f"r{i}")
    got: dict[str, list] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return got
        for d in engine.step():
            if d.prompt_logprobs is not None:
                assert d.request_id not in got, "prompt logprobs sent twice"
                got[d.request_id] = d.prompt_logprobs
    raise AssertionError("engine did not drain")


def _check(path: str, prompt: list[int], entries) -> None:
    ref = _hf_prompt_logprobs(path, prompt)
    assert [e.token_id for e in entries] == prompt[1:]
    for i, e in enumerate(entries):
        row = ref[i]
        assert e.logprob == pytest.approx(row[prompt[i + 1]].item(), abs=2e-4)
        assert e.rank == int((row > row[prompt[i + 1]]).sum()) + 1
        assert [t for t, _ in e.top] == row.topk(TOP).indices.tolist()
        assert [v for _, v in e.top] == pytest.approx(row.topk(TOP).values.tolist(), abs=2e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_prompt_logprobs_match_hf_through_chunks_and_a_cached_prefix(tiny_model_dirs, arch):
    path = tiny_model_dirs[arch]
    engine = LLMEngine(build_engine_config(path, dtype="float32", device="cpu", max_num_batched_tokens=16))
    prompt = _prompt(1, 70)  # five chunks of 16
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    asks = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=TOP)
    # r0 fills the prefix cache with the prompt; r1 asks for prompt logprobs of the same prompt
    # (computed whole, not served from the cache); r2 shares the batch without asking.
    _run(engine, [prompt], [plain])
    got = _run(engine, [prompt, prompt, _prompt(2, 30)], [asks, asks, plain])
    assert set(got) == {"r0", "r1"}
    for rid in ("r0", "r1"):
        assert len(got[rid]) == len(prompt) - 1
        _check(path, prompt, got[rid])


def test_prompt_logprobs_survive_preemption_without_duplicates(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    # 9 blocks of 16 tokens for three 40-token prompts growing by 30: someone is preempted.
    engine = LLMEngine(build_engine_config(path, dtype="float32", device="cpu", num_kv_blocks=9,
                                           max_num_batched_tokens=24))
    prompts = [_prompt(10 + i, 40) for i in range(3)]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, prompt_logprobs=TOP)
    got = _run(engine, prompts, [params] * 3)
    assert engine.scheduler.num_preemptions_total > 0
    for i, p in enumerate(prompts):
        _check(path, p, got[f"r{i}"])


@pytest.mark.parametrize("value", [-1, 21, True, 1.5])
def test_bad_prompt_logprobs_are_refused_naming_the_field(value):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(prompt_logprobs=value)
    assert e.value.field == "prompt_logprobs"
