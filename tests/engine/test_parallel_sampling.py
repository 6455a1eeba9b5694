"""n > 1 through AsyncLLM (real engine-core process): choices fork from one prefill."""

from __future__ import annotations

import asyncio
import time

import pytest

from llmesh.engine import AsyncLLM, FinishReason, SamplingParams, build_engine_config

BLOCK = 16
PROMPT = list(range(5, 5 + 3 * BLOCK + 5))  # three full blocks and a partial one


@pytest.fixture(scope="module")
def engine(tiny_llama):
    # Prefix caching off: whatever the choices share, they share through the fork.
    eng = AsyncLLM(build_engine_config(tiny_llama, dtype="float32", device="cpu", max_model_len=512,
                                       num_kv_blocks=64, block_size=BLOCK, enable_prefix_caching=False))
    yield eng
    eng.shutdown()


def run(engine, params, rid, prompt=PROMPT):
    async def main():
        by_index: dict[int, dict] = {}
        async for d in engine.generate(prompt, params, request_id=rid):
            assert d.request_id == rid
            c = by_index.setdefault(d.index, {"ids": [], "text": "", "last": None})
            assert c["last"] is None or not c["last"].finished, "a choice got a delta after it finished"
            c["ids"] += d.token_ids
            c["text"] += d.text
            c["last"] = d
        return by_index
    return asyncio.run(asyncio.wait_for(main(), 120))


def wait_blocks_free(engine):
    deadline = time.monotonic() + 10
    while engine.stats().kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.stats().kv_blocks_used


def test_greedy_choices_are_identical_to_one_choice_and_fork_the_prompt_blocks(engine):
    one = run(engine, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), "g1")[0]
    many = run(engine, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=3), "g3")
    assert sorted(many) == [0, 1, 2]
    for i, c in many.items():
        assert c["ids"] == one["ids"] and c["text"] == one["text"]
        assert c["last"].finished and c["last"].finish_reason is FinishReason.LENGTH
    # Choice 0 computed the prompt; the others started from its three full prompt blocks.
    assert many[0]["last"].num_cached_tokens == 0
    assert [many[i]["last"].num_cached_tokens for i in (1, 2)] == [3 * BLOCK, 3 * BLOCK]
    assert wait_blocks_free(engine) == 0


def test_seeded_choice_i_samples_with_seed_plus_i(engine):
    params = dict(max_tokens=10, temperature=1.0, ignore_eos=True)
    many = run(engine, SamplingParams(**params, seed=40, n=3), "s3")
    singles = [run(engine, SamplingParams(**params, seed=40 + i), f"s1-{i}")[0]["ids"] for i in range(3)]
    assert [many[i]["ids"] for i in range(3)] == singles
    assert len({tuple(s) for s in singles}) > 1
    again = run(engine, SamplingParams(**params, seed=40, n=3), "s3-again")
    assert [again[i]["ids"] for i in range(3)] == singles


def test_closing_the_stream_aborts_every_choice_and_frees_their_blocks(engine):
    async def main():
        n = 0
        async for _ in engine.generate(PROMPT, SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True,
                                                              n=4), request_id="cancel-n"):
            n += 1
            if n == 6:
                break
    asyncio.run(asyncio.wait_for(main(), 120))
    assert wait_blocks_free(engine) == 0
    # The id is free again, and the engine still serves.
    assert run(engine, SamplingParams(max_tokens=2, temperature=0.0, n=2), "cancel-n")[1]["last"].finished


def test_abort_by_request_id_ends_every_choice(engine):
    async def main():
        got: dict[int, object] = {}
        aborted = False
        gen = engine.generate(PROMPT, SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True, n=2),
                              request_id="abort-n")
        async for d in gen:
            # Once: tokens already on their way arrive after the abort (a loaded host shows them),
            # and a second abort of the same id rightly finds nothing.
            if d.token_ids and not aborted:
                aborted = True
                result = await engine.abort_request("abort-n")
                assert result.found
            if d.finished:
                got[d.index] = d.finish_reason
        return got
    got = asyncio.run(asyncio.wait_for(main(), 120))
    assert got == {0: FinishReason.ABORT, 1: FinishReason.ABORT}
    assert wait_blocks_free(engine) == 0


def test_every_choice_carries_the_prompt_logprobs_computed_once(engine):
    async def main():
        firsts: dict[int, object] = {}
        async for d in engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                              n=3, prompt_logprobs=1), request_id="plp"):
            if d.prompt_logprobs is not None:
                assert d.index not in firsts, "prompt logprobs sent twice to a choice"
                firsts[d.index] = d.prompt_logprobs
        return firsts
    firsts = asyncio.run(asyncio.wait_for(main(), 120))
    assert sorted(firsts) == [0, 1, 2]
    assert [e.token_id for e in firsts[0]] == PROMPT[1:]
    assert firsts[1] == firsts[0] and firsts[2] == firsts[0]
    assert wait_blocks_free(engine) == 0
