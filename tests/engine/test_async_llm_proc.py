"""AsyncLLM with its engine core in a child process: stop strings in the front end,
failure containment (a killed core, a failing step) and no core outliving its front end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llmesh.engine import LLM, AsyncLLM, FinishReason, SamplingParams, build_engine_config
from llmesh.engine.errors import EngineDeadError


def _config(model: str):
    return build_engine_config(model, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=64)


async def _collect(engine, prompt, params, rid):
    ids, text, last = [], "", None
    async for d in engine.generate(prompt, params, request_id=rid):
        ids.extend(d.token_ids)
        text += d.text
        last = d
    return ids, text, last


async def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited: its parent just has not reaped it
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLM(_config(tiny_llama))
    yield eng
    eng.shutdown()


def test_core_runs_in_another_process(engine):
    assert engine.core_pid != os.getpid() and _alive(engine.core_pid)


def test_stop_strings_are_cut_in_the_front_end(engine, tiny_llama):
    prompts = [[11, 42, 7, 300, 12], [5, 99, 23, 64, 128, 256]]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    llm = LLM(tiny_llama, dtype="float32", device="cpu", max_model_len=256, num_kv_blocks=64)
    texts = [o.text for o in llm.generate(prompts, greedy)]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=[t[5:8]]) for t in texts]
    offline = llm.generate(prompts, params)

    async def main():
        got = await asyncio.gather(*(_collect(engine, p, sp, f"stop-{i}")
                                     for i, (p, sp) in enumerate(zip(prompts, params))))
        # The front end finished them in the core: their blocks come back within a step or two.
        assert await _wait_for(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().num_running == 0, 5)
        return got

    for (ids, text, last), ref, t in zip(asyncio.run(main()), offline, texts):
        assert text == ref.text == t[: t.index(t[5:8])]
        assert ids == ref.token_ids
        assert last.finish_reason is FinishReason.STOP and last.stop_reason == t[5:8]


def _dying_engine(model: str, **faults) -> AsyncLLM:
    return AsyncLLM(_config(model), **faults)


def test_killed_core_ends_streams_at_once_and_refuses_new_work(tiny_llama):
    engine = _dying_engine(tiny_llama)
    try:
        async def main():
            params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            agens = [engine.generate([7] * 20, params, request_id=f"k{i}") for i in range(3)]
            for agen in agens:
                assert (await agen.__anext__()).token_ids
            os.kill(engine.core_pid, signal.SIGKILL)
            t0 = time.monotonic()
            for agen in agens:
                with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
                    async for _ in agen:
                        pass
            assert time.monotonic() - t0 < 1.0
            assert engine.dead is not None and not engine.has_work
            with pytest.raises(EngineDeadError):
                async for _ in engine.generate([1, 2, 3], params, request_id="after"):
                    pass
            with pytest.raises(EngineDeadError):
                await engine.abort_request("k0")

        asyncio.run(main())
    finally:
        engine.shutdown()


def test_failing_step_ends_streams_and_stops_the_core(tiny_llama):
    engine = _dying_engine(tiny_llama, fault_fail_step_at=4)
    pid = engine.core_pid
    try:
        async def main():
            params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
            with pytest.raises(EngineDeadError, match="step failed.*fault injection"):
                await _collect(engine, [9] * 10, params, "s0")
            with pytest.raises(EngineDeadError, match="step failed"):
                await _collect(engine, [9] * 10, params, "s1")
            assert await _wait_for(lambda: not _alive(pid), 5), "the failed core process did not exit"

        asyncio.run(main())
    finally:
        engine.shutdown()


_ORPHAN_SCRIPT = textwrap.dedent("""
    import sys, time
    from llmesh.engine import AsyncLLM, build_engine_config

    if __name__ == "__main__":
        eng = AsyncLLM(build_engine_config(sys.argv[1], dtype="float32", device="cpu", num_kv_blocks=16))
        print(eng.core_pid, flush=True)
        time.sleep(120)
""")


def test_core_dies_with_its_front_end(tiny_llama, tmp_path):
    script = tmp_path / "front.py"
    script.write_text(_ORPHAN_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), tiny_llama], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"the front end did not start: {line!r}"
        core_pid = int(line)
        assert _alive(core_pid)
        proc.kill()  # the front end only: the core must notice on its own
        proc.wait(10)
        deadline = time.monotonic() + 5
        while _alive(core_pid):
            assert time.monotonic() < deadline, "the engine core outlived its front end"
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
