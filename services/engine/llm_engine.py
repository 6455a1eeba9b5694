"""LLMEngine: the front end and an in-process EngineCore, for the offline ``LLM`` API,
benchmarks and evaluation. ``step()`` is one core step plus the text work on its outputs.

The gRPC engine runs the same two halves in two processes (``AsyncLLM``). Not
thread-safe: exactly one thread drives it.
"""

from __future__ import annotations

import itertools

from llmesh.engine.config import EngineConfig
from llmesh.engine.core.engine_core import EngineCore
from llmesh.engine.core.messages import EngineCoreOutput, EngineStats
from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.input_processor import InputProcessor
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.loader import load_model
from llmesh.engine.output_processor import OutputProcessor
from llmesh.engine.pooling_params import PoolingParams, pooling_for_model
from llmesh.engine.outputs import RequestOutput
from llmesh.engine.request import FinishReason, Priority, Request
from llmesh.engine.sampling_params import SamplingParams

__all__ = ["EngineStats", "LLMEngine"]


class LLMEngine:
    def __init__(self, config: EngineConfig, publisher: KVEventPublisher | None = None) -> None:
        loaded = load_model(config.model, name=config.served_model_name)
        self.input_processor = InputProcessor(loaded)
        self.tokenizer = self.input_processor.tokenizer
        self.eos_token_ids = self.input_processor.eos_token_ids
        self.core = EngineCore(config, publisher=publisher, loaded=loaded)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._pending_outputs: list[RequestOutput] = []

    # ---- the core's parts, for benchmarks, tests and evaluation --------------------------
    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model_config(self):
        return self.core.model_config

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def device(self):
        return self.core.device

    @property
    def dtype(self):
        return self.core.dtype

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def quantization(self):
        return self.core.quantization

    @property
    def runner(self):
        return self.core.runner

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def kv(self):
        return self.core.kv

    # ---- requests -------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        priority: int = Priority.INTERACTIVE,
        cache_salt: str | None = None,
        pooling: PoolingParams | None = None,
        text_deltas: bool = True,
    ) -> Request:
        """Admit a request; raises InvalidRequestError (nothing is admitted) when it cannot run.
        With ``pooling`` it is an embedding request (see ``pooling_params``). ``text_deltas``
        False: its text comes whole in the final output, not a delta per step
        (OutputProcessor.add_request)."""
        if params is not None and params.n != 1:
            raise InvalidRequestError(f"n={params.n}: the synchronous engine returns one sequence per request; "
                                      "several choices share a prompt through AsyncLLM (the engine service)",
                                      field="n")
        core_req = self.input_processor.process(
            prompt, params, request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            priority=priority, cache_salt=cache_salt, pooling=pooling)
        req = self.core.add_request(core_req)
        self.output_processor.add_request(core_req, text_deltas=text_deltas)
        return req

    def pooling_params(self, dimensions: int | None = None) -> PoolingParams:
        """The PoolingParams of an embedding request to this engine (InvalidRequestError when
        it runs without a pooling mode, or cannot give ``dimensions``)."""
        p = self.config.pooler
        return pooling_for_model(self.model_name, p.pooling, p.normalize, p.matryoshka,
                                 self.model_config.hidden_size, dimensions)

    def abort_request(self, request_id: str, *, emit_output: bool = True) -> int:
        """Abort at any moment; returns how many KV blocks were freed (0 if unknown/finished).

        With ``emit_output`` the next step returns a final ABORT delta for the request;
        callers that end the stream themselves turn it off."""
        req = self.scheduler.get_request(request_id)
        freed = self.core.abort_request(request_id)
        self.output_processor.remove(request_id)
        if req is not None and emit_output:
            self._pending_outputs.append(RequestOutput(
                request_id=request_id, prompt_token_ids=req.prompt_token_ids, finished=True,
                finish_reason=FinishReason.ABORT, num_cached_tokens=req.num_cached_tokens))
        return freed

    @property
    def async_scheduling(self) -> bool:
        return self.core.async_scheduling

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests() or bool(self._pending_outputs)

    # ---- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One core step, then the text work on what it returned (under async scheduling
        that is the previous step's tokens, processed while this step computes)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        outputs.extend(self._process(self.core.step()))
        return outputs

    def _process(self, items: list[EngineCoreOutput]) -> list[RequestOutput]:
        """Detokenize and check stop strings for requests that received tokens."""
        outputs = []
        for out in items:
            if not self.output_processor.has(out.request_id):
                continue  # aborted meanwhile; its final delta is already pending
            delta, hit_stop = self.output_processor.process(out)
            if hit_stop:
                # With async scheduling the request may already be in the next step's batch:
                # finishing it now makes that step drop its token.
                self.core.finish_request(out.request_id, FinishReason.STOP)
            outputs.append(delta)
        return outputs

    def stats(self) -> EngineStats:
        return self.core.stats()
