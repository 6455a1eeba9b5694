"""The Engine gRPC servicer: a thin layer over AsyncLLM.

A full waiting queue refuses a request at once with RESOURCE_EXHAUSTED and a retry hint
(``llmesh.overload``), so the router can try another replica and callers back off
instead of queueing without bound. A dead engine core (its process died, or a step failed)
ends every stream and refuses every new call with UNAVAILABLE naming this engine, so the
router fails over, until the service's supervisor has started a fresh core (supervisor.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
import numpy as np
from opentelemetry import trace

from llmesh import prefix_hash
from llmesh.engine.async_llm import AsyncLLM
from llmesh.engine.errors import EngineDeadError, EngineError, EngineOverloadedError
from llmesh.engine.request import FinishReason
from llmesh.engine.text.token_text import TokenTexts
from llmesh.errors import ServiceError
from llmesh.overload import overloaded
from llmesh.sampling_proto import FINISH_REASONS, priority_from_proto, sampling_from_proto
from llmesh.v1 import common_pb2, engine_pb2, engine_pb2_grpc


def _logprobs_to_proto(lps, texts: TokenTexts) -> list[common_pb2.TokenLogprob]:
    out = []
    for lp in lps or ():
        token, raw = texts.of(lp.token_id)
        top = []
        for t, v in lp.top:
            alt, alt_raw = texts.of(t)
            top.append(common_pb2.TopLogprob(token_id=t, logprob=v, token=alt, token_bytes=alt_raw))
        out.append(common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, top=top,
                                           token=token, token_bytes=raw))
    return out


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, engine: AsyncLLM, *, instance_id: str, epoch: int, backend: str = "torch",
                 quantization: str = "none") -> None:
        self.engine, self.instance_id, self.epoch = engine, instance_id, epoch
        self.address = ""
        """host:port the router reaches this engine at (set once the server is bound)."""
        self.backend, self.quantization = backend, quantization
        self.model = engine.model_name
        self.token_texts = TokenTexts(engine.tokenizer)

    @property
    def where(self) -> str:
        """This engine as errors name it: its instance id, and its address when the id lacks it."""
        if not self.address or self.address in self.instance_id:
            return f"engine {self.instance_id}"
        return f"engine {self.instance_id} at {self.address}"

    def _unavailable(self, e: EngineDeadError) -> ServiceError:
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"{self.where} is unavailable: {e}")

    async def Generate(self, request: engine_pb2.EngineGenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[common_pb2.GenerateResponse]:
        try:
            async for msg in self._generate(request):
                yield msg
        except EngineDeadError as e:
            raise self._unavailable(e) from e
        except EngineOverloadedError as e:
            trace.get_current_span().add_event("refused_overloaded")
            raise overloaded(f"{self.where}: {e}", e.retry_after_s) from None
        except EngineError as e:
            if type(e) is not EngineError:  # InvalidRequest, Unsupported...: their own status (status_for)
                raise
            raise ServiceError(grpc.StatusCode.INTERNAL, f"{self.where}: {e}") from e

    async def _generate(self, request: engine_pb2.EngineGenerateRequest) -> AsyncIterator[common_pb2.GenerateResponse]:
        params = sampling_from_proto(request.sampling)
        request_id = request.request_id or uuid.uuid4().hex
        span = trace.get_current_span()
        span.set_attributes({"llmesh.request_id": request_id, "llmesh.model": self.model,
                             "llmesh.replica": self.instance_id,
                             "llmesh.prompt_tokens": len(request.prompt_token_ids)})
        span.add_event("queued")
        t0, completion, first = time.perf_counter(), 0, True
        choices_left, cached = params.n, None
        async for out in self.engine.generate(list(request.prompt_token_ids), params, request_id=request_id,
                                              priority=priority_from_proto(request.priority),
                                              cache_salt=request.cache_salt or None):
            if first and out.token_ids:
                first = False
                span.add_event("first_token", {"llmesh.ttft_ms": 1000 * (time.perf_counter() - t0),
                                               "llmesh.cached_tokens": out.num_cached_tokens})
            completion += len(out.token_ids)
            msg = common_pb2.GenerateResponse(request_id=request_id, model=self.model, text=out.text,
                                              token_ids=out.token_ids, index=out.index,
                                              logprobs=_logprobs_to_proto(out.logprobs, self.token_texts))
            if out.prompt_logprobs is not None:
                msg.prompt_logprobs.extend(_logprobs_to_proto(out.prompt_logprobs, self.token_texts))
            if out.finished:
                if out.finish_reason is FinishReason.ERROR:
                    raise ServiceError(grpc.StatusCode.INTERNAL, f"{self.where}: {out.error}")
                msg.finish_reason = FINISH_REASONS[str(out.finish_reason)]
                msg.stop_reason = "" if out.stop_reason is None else str(out.stop_reason)
                msg.replica = self.instance_id
                choices_left -= 1
                if out.index == 0 or cached is None:
                    cached = out.num_cached_tokens  # the first choice's: the others forked from it
            if out.finished and choices_left == 0:
                # Usage once, on the stream's last message: the prompt counts once, the
                # completions of every choice add up.
                msg.usage.CopyFrom(common_pb2.Usage(prompt_tokens=len(request.prompt_token_ids),
                                                    cached_tokens=cached, completion_tokens=completion))
                span.set_attributes({"llmesh.cached_tokens": cached,
                                     "llmesh.completion_tokens": completion,
                                     "llmesh.finish_reason": str(out.finish_reason), "llmesh.n": params.n})
                span.add_event("finished")
            yield msg

    async def Embed(self, request: engine_pb2.EngineEmbedRequest, context: grpc.aio.ServicerContext
                    ) -> engine_pb2.EmbedResponse:
        request_id = request.request_id or uuid.uuid4().hex
        span = trace.get_current_span()
        prompts = [list(x.token_ids) for x in request.inputs]
        span.set_attributes({"llmesh.request_id": request_id, "llmesh.model": self.model,
                             "llmesh.replica": self.instance_id, "llmesh.inputs": len(prompts),
                             "llmesh.prompt_tokens": sum(map(len, prompts))})
        if not prompts:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{self.where}: Embed needs at least one input")
        try:
            outs = await self.engine.embed(prompts, request_id=request_id, dimensions=request.dimensions or None,
                                           priority=priority_from_proto(request.priority),
                                           cache_salt=request.cache_salt or None)
        except EngineDeadError as e:
            raise self._unavailable(e) from e
        except EngineOverloadedError as e:
            span.add_event("refused_overloaded")
            raise overloaded(f"{self.where}: {e}", e.retry_after_s) from None
        except EngineError as e:
            if type(e) is not EngineError:  # InvalidRequest: INVALID_ARGUMENT (status_for)
                raise
            raise ServiceError(grpc.StatusCode.INTERNAL, f"{self.where}: {e}") from e
        cached = sum(o.num_cached_tokens for o in outs)
        span.set_attribute("llmesh.cached_tokens", cached)
        return engine_pb2.EmbedResponse(
            request_id=request_id, model=self.model, replica=self.instance_id,
            dimensions=len(outs[0].embedding),
            data=[engine_pb2.Embedding(index=i, vector=np.asarray(o.embedding, "<f4").tobytes())
                  for i, o in enumerate(outs)],
            usage=common_pb2.Usage(prompt_tokens=sum(o.num_prompt_tokens for o in outs), cached_tokens=cached))

    async def Abort(self, request: engine_pb2.AbortRequest, context) -> engine_pb2.AbortResponse:
        try:
            result = await self.engine.abort_request(request.request_id)
        except EngineDeadError as e:
            raise self._unavailable(e) from e
        return engine_pb2.AbortResponse(found=result.found, freed_blocks=result.freed_blocks)

    async def Info(self, request, context) -> engine_pb2.InfoResponse:
        eng = self.engine
        return engine_pb2.InfoResponse(
            model=self.model, instance_id=self.instance_id, block_size=eng.config.cache.block_size,
            max_model_len=eng.max_model_len, dtype=eng.dtype,
            quantization=self.quantization, prefix_caching=eng.config.cache.enable_prefix_caching,
            hash_algorithm=prefix_hash.PREFIX_HASH_ALGORITHM, hash_seed=prefix_hash.PREFIX_HASH_SEED.hex(),
            vocab_size=eng.model_config.vocab_size, backend=self.backend, device=eng.device,
            kv_blocks_total=eng.kv_blocks_total, epoch=self.epoch,
            pooling=eng.config.pooler.pooling, normalize=eng.config.pooler.normalize,
            matryoshka=eng.config.pooler.matryoshka, embedding_dimensions=eng.model_config.hidden_size,
            num_experts=eng.model_config.num_experts, num_experts_per_tok=eng.model_config.num_experts_per_tok,
            tensor_parallel_size=eng.config.tensor_parallel_size, **_speculative_info(eng.config.speculative),
            kv_cache_dtype=eng.dtype if eng.config.cache.kv_cache_dtype == "auto" else eng.config.cache.kv_cache_dtype)

    async def Load(self, request, context) -> engine_pb2.LoadResponse:
        s = self.engine.stats()
        return engine_pb2.LoadResponse(num_waiting=s.num_waiting, num_running=s.num_running,
                                       kv_blocks_used=s.kv_blocks_used, kv_blocks_total=s.kv_blocks_total,
                                       steps=s.steps, seconds_since_last_step=time.monotonic() - s.last_step_time)


def _speculative_info(spec) -> dict:
    """InfoResponse's speculative-decoding fields (empty method and zeros when off)."""
    if not spec.enabled:
        return {}
    return dict(speculative_method=spec.speculative_method, num_speculative_tokens=spec.num_speculative_tokens,
                prompt_lookup_max=spec.prompt_lookup_max, prompt_lookup_min=spec.prompt_lookup_min,
                speculative_model=spec.speculative_model or "",
                speculative_disable_batch_size=spec.speculative_disable_batch_size)
