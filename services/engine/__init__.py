"""llmesh.engine: continuous-batching LLM engine with a paged KV cache and prefix caching.

    from llmesh.engine import LLM, SamplingParams

The public names load lazily, so light users of sub-modules (the gateway reads
tokenizers through ``llmesh.engine.text``) do not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "llm", "build_engine_config": "llm",
    "AsyncLLM": "async_llm",
    "LLMEngine": "llm_engine", "EngineStats": "llm_engine",
    "CacheConfig": "config", "EngineConfig": "config", "SchedulerConfig": "config",
    "EngineError": "errors", "InvalidRequestError": "errors", "ModelLoadError": "errors",
    "UnsupportedModelError": "errors",
    "RequestOutput": "outputs", "TokenLogprob": "outputs",
    "FinishReason": "request", "Priority": "request",
    "SamplingParams": "sampling_params", "StructuredOutputSpec": "structured_output.spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llmesh.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"llmesh.engine.{module}"), name)
    globals()[name] = value
    return value
