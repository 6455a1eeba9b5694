"""AsyncLLM.call runs a function on the engine thread and hands back its result or error."""

from __future__ import annotations

import asyncio

import pytest

from llmesh.engine import AsyncLLM, build_engine_config


def test_call_returns_results_and_raises_errors(tiny_llama):
    engine = AsyncLLM(build_engine_config(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=16))
    try:
        async def main():
            assert await engine.call(lambda eng: eng.kv.num_total_blocks) == 16
            with pytest.raises(ZeroDivisionError):
                await engine.call(lambda eng: 1 / 0)

        asyncio.run(main())
    finally:
        engine.shutdown()
