"""llmesh.engine: continuous-batching LLM engine with a paged KV cache and prefix caching.

    from llmesh.engine import LLM, SamplingParams
"""

from llmesh.engine.async_llm import AsyncLLM
from llmesh.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from llmesh.engine.errors import EngineError, InvalidRequestError, ModelLoadError, UnsupportedModelError
from llmesh.engine.llm import LLM, build_engine_config
from llmesh.engine.llm_engine import EngineStats, LLMEngine
from llmesh.engine.outputs import RequestOutput, TokenLogprob
from llmesh.engine.request import FinishReason, Priority
from llmesh.engine.sampling_params import SamplingParams

__all__ = [
    "LLM", "AsyncLLM", "LLMEngine", "EngineStats", "SamplingParams", "RequestOutput", "TokenLogprob",
    "FinishReason", "Priority", "EngineConfig", "CacheConfig", "SchedulerConfig", "build_engine_config",
    "EngineError", "InvalidRequestError", "ModelLoadError", "UnsupportedModelError",
]
