"""AsyncLLM: streaming from the engine thread, cancellation and abort free KV blocks at once."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from llmesh.engine import LLM, AsyncLLM, FinishReason, InvalidRequestError, SamplingParams, build_engine_config


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLM(build_engine_config(tiny_llama, dtype="float32", device="cpu", max_model_len=512,
                                       num_kv_blocks=128))
    yield eng
    eng.shutdown()


async def _collect(engine, prompt, params, rid):
    ids, text, last = [], "", None
    async for d in engine.generate(prompt, params, request_id=rid):
        ids.extend(d.token_ids)
        text += d.text
        last = d
    return ids, text, last


def test_concurrent_streams_match_offline(engine, tiny_llama):
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = ["first prompt", "a second, longer prompt with more words", "third"]

    async def main():
        return await asyncio.gather(*(_collect(engine, p, params, f"c{i}") for i, p in enumerate(prompts)))

    streamed = asyncio.run(main())
    offline = LLM(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=64).generate(prompts, params)
    for (ids, text, last), ref in zip(streamed, offline):
        assert ids == ref.token_ids and text == ref.text
        assert last.finished and last.finish_reason is FinishReason.LENGTH


def test_closing_the_stream_aborts_the_request_and_frees_its_blocks(engine):
    # The scheduler frees an aborted request's blocks at once (test_scheduler checks that);
    # here the point is that closing the stream reaches the core at all. The client's view of
    # the step count lags the core by the outputs in flight, and on a loaded host by more, so
    # the bound is "long before the request would have ended by itself", not "within a step".
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        n = 0
        async for _ in engine.generate([7] * 60, params, request_id="cancel-me"):
            n += 1
            if n == 3:
                assert engine.stats().kv_blocks_used > 0
                steps_at_cancel = engine.stats().steps
                break  # closes the generator: the engine aborts the request
        deadline = time.monotonic() + 5
        while engine.stats().kv_blocks_used and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        return steps_at_cancel

    steps_at_cancel = asyncio.run(main())
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stats.steps - steps_at_cancel < 200, "the request ran on for most of its 400 tokens after the close"


def test_abort_reports_freed_blocks(engine):
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        agen = engine.generate([9] * 40, params, request_id="abort-me")
        first = await agen.__anext__()
        assert first.token_ids
        freed = await engine.abort("abort-me")
        rest = [d async for d in agen]
        return freed, rest

    freed, rest = asyncio.run(main())
    assert freed >= 3  # 40 prompt tokens + ≥1 generated in blocks of 16
    assert rest[-1].finished and rest[-1].finish_reason is FinishReason.ABORT
    assert engine.stats().kv_blocks_used == 0


def test_admission_error_surfaces_before_streaming(engine):
    async def main():
        with pytest.raises(InvalidRequestError):
            async for _ in engine.generate([1] * 600, SamplingParams(max_tokens=4), request_id="too-long"):
                pass

    asyncio.run(main())
    assert engine.stats().kv_blocks_used == 0


def test_an_id_reused_right_after_its_abort_streams_only_its_own_tokens(engine):
    """A router escalating or a client retrying reuses a request id at once. The aborted
    request's last outputs, still on their way back from the core, must not reach the new
    request's stream: keyed by the caller's id alone they did (tests/router/test_escalation.py
    once saw a token of the aborted request at the head of the next one). The aborted request
    reads another prompt, so any token of it in the new stream shows."""
    prompt = [5, 17, 99, 250, 300, 41, 7, 128]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        want = (await _collect(engine, prompt, params, "fresh"))[0]
        got = []
        for _ in range(5):
            async with contextlib.aclosing(engine.generate([11] * 30, long, request_id="reused")) as stream:
                n = 0
                async for _ in stream:
                    n += 1
                    if n == 3:
                        break  # the stream closes here: the core aborts it, its outputs in flight are stale
            got.append((await _collect(engine, prompt, params, "reused"))[0])
        return want, got

    want, got = asyncio.run(main())
    assert got == [want] * 5
