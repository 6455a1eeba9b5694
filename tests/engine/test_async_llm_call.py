"""AsyncLLM.call runs a module-level function in the engine-core process between steps and
hands back its result or error; a function that cannot travel fails at once, clearly."""

from __future__ import annotations

import asyncio

import pytest

from llmesh.engine import AsyncLLM, build_engine_config


def total_blocks(core) -> int:
    return core.kv.num_total_blocks


def divide(core, a: int, b: int) -> float:
    return a / b


def test_call_returns_results_and_raises_errors(tiny_llama):
    engine = AsyncLLM(build_engine_config(tiny_llama, dtype="float32", device="cpu", num_kv_blocks=16))
    try:
        async def main():
            assert await engine.call(total_blocks) == 16
            assert await engine.call(divide, 3, 2) == 1.5
            with pytest.raises(ZeroDivisionError):
                await engine.call(divide, 1, 0)
            with pytest.raises(TypeError, match="module-level function"):
                await engine.call(lambda core: 1)
            assert await engine.call(total_blocks) == 16  # the core survived all of it

        asyncio.run(main())
    finally:
        engine.shutdown()
