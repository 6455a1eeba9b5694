"""The response cache around one Generate/Chat stream: plan, look up, replay or record, store.

``plan`` decides from the routed request (its effective sampling, token ids and model)
and the caller whether the request is cacheable and what to do; ``serve`` wraps the
stream that would go to the engines: a hit replays the stored messages instead (the
engines never see the request), a miss passes the engine's messages through while
recording them, and stores them, in the background, once the stream has ended normally
with every choice finished by STOP or LENGTH. Errors, aborts and streams the client
left are never stored: their recording ends with the exception that ends the stream.

The messages are recorded as the engines sent them, before the servicer parses tool calls
or puts in the client's request id, so a replay runs through the same steps as a fresh
answer. Every step is bounded and none raises: a Redis that fails is a miss.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from llmesh.gateway import metrics
from llmesh.gateway.caller import Caller
from llmesh.gateway.response_cache.codec import CorruptEntry, Entry, encode
from llmesh.gateway.response_cache.config import ResponseCacheConfig
from llmesh.gateway.response_cache.embedding_cache import EmbeddingCache
from llmesh.gateway.response_cache.key import CacheKey, cache_key, deterministic
from llmesh.gateway.response_cache.policy import Decision, check_mode, decide
from llmesh.gateway.response_cache.revision import ModelRevisions
from llmesh.gateway.response_cache.store import TenantStore
from llmesh.gateway.usage import UsageRecord
from llmesh.telemetry import tracer
from llmesh.v1 import common_pb2, inference_pb2, router_pb2

_tracer = tracer("llmesh.gateway")
_STORED_REASONS = (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)

Stream = AsyncIterator[common_pb2.GenerateResponse]


@dataclasses.dataclass(frozen=True)
class Plan:
    key: CacheKey
    decision: Decision
    choices: int
    """The request's n: a stored answer has every one of them finished."""


class _Recorder:
    """A miss's messages as they stream, serialized at once (the servicer edits the
    message objects afterwards), and whether the whole is fit to store."""

    def __init__(self, max_bytes: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self._max_bytes = max_bytes
        self.too_large = False
        self.finished: dict[int, int] = {}
        self.has_usage = False

    def add(self, resp: common_pb2.GenerateResponse) -> None:
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finished[resp.index] = resp.finish_reason
        self.has_usage = self.has_usage or resp.HasField("usage")
        if self.too_large:
            return
        request_id, resp.request_id = resp.request_id, ""  # the mesh's id of this call: not kept
        data = resp.SerializeToString()
        resp.request_id = request_id
        self.size += len(data) + 4
        if self.size > self._max_bytes:
            self.too_large, self.parts = True, []
            return
        self.parts.append(data)

    def unfit(self, choices: int) -> str:
        """Why this answer is not stored ("" when it is)."""
        if self.too_large:
            return "too_large"
        if len(self.finished) != choices or any(r not in _STORED_REASONS for r in self.finished.values()):
            return "unfinished"
        if not self.has_usage:
            return "unfinished"
        return ""


class ResponseCache:
    def __init__(self, store: TenantStore, revisions: ModelRevisions, secret: bytes,
                 config: ResponseCacheConfig) -> None:
        """``secret`` keys the digests (the mesh secret or the key pepper; may be empty)."""
        self._store = store
        self._revisions = revisions
        self._secret = secret
        self._config = config
        self._background: set[asyncio.Task] = set()

    def embedding_cache(self) -> EmbeddingCache | None:
        """The embedding cache on this cache's Redis, keys and TTL (None when
        --response-cache-embeddings is off)."""
        if not self._config.response_cache_embeddings:
            return None
        return EmbeddingCache(self._store, self._revisions, self._secret, self._config)

    def plan(self, request: inference_pb2.GenerateRequest | inference_pb2.ChatRequest, caller: Caller,
             route: router_pb2.RouteRequest) -> Plan | None:
        """The cache's part in this request; None leaves it alone (and says why in a metric)."""
        model = route.model
        check_mode(request.cache)
        if not route.prompt_token_ids:  # "auto": the model is the router's choice, made later
            return _skipped(model, "auto")
        if not deterministic(route.sampling):
            return _skipped(model, "sampled")
        decision = decide(self._config.response_cache_ttl_s, caller.response_cache, request.cache)
        if decision is None:
            return _skipped(model, "off")
        revision = self._revisions.of(model)
        if revision is None:
            return _skipped(model, "unknown_model")
        shape = "chat" if isinstance(request, inference_pb2.ChatRequest) else "completion"
        key = cache_key(self._secret, tenant=caller.tenant, model=model, revision=revision, shape=shape,
                        prompt_token_ids=route.prompt_token_ids, sampling=route.sampling)
        return Plan(key, decision, route.sampling.n if route.sampling.HasField("n") else 1)

    async def serve(self, plan: Plan | None, source: Callable[[], Stream], usage: UsageRecord) -> Stream:
        """The request's stream: replayed on a hit, else ``source()``'s, recorded and stored."""
        if plan is None:
            async with aclosing(source()) as stream:
                async for resp in stream:
                    yield resp
            return
        hit = await self._lookup(plan) if plan.decision.lookup else None
        if hit is not None:
            async with aclosing(self._replay(hit, usage)) as stream:
                async for resp in stream:
                    yield resp
            return
        recorder = _Recorder(self._config.response_cache_max_entry_bytes)
        async with aclosing(source()) as stream:
            async for resp in stream:
                recorder.add(resp)
                yield resp
        # Reached only when the stream ended normally (an error or a cancel raises past this).
        self._store_later(plan, recorder)

    async def _lookup(self, plan: Plan) -> Entry | None:
        model = plan.key.model
        with _tracer.start_as_current_span("gateway.response_cache.lookup",
                                           attributes={"llmesh.model": model}) as span:
            got = await self._store.get(plan.key.tenant, plan.key.digest)
            if got.error:
                metrics.RESPONSE_CACHE_ERRORS.labels(model, "lookup").inc()
                span.set_attributes({"llmesh.response_cache": "error", "llmesh.response_cache.error": got.error})
                return None
            if got.value is None:
                metrics.RESPONSE_CACHE_MISSES.labels(model).inc()
                span.set_attribute("llmesh.response_cache", "miss")
                return None
            try:
                messages = Entry(got.value)
            except CorruptEntry as e:
                metrics.RESPONSE_CACHE_ERRORS.labels(model, "decode").inc()
                span.set_attributes({"llmesh.response_cache": "error", "llmesh.response_cache.error": str(e)})
                return None
            metrics.RESPONSE_CACHE_HITS.labels(model).inc()
            span.set_attribute("llmesh.response_cache", "hit")
            return messages

    async def _replay(self, messages: Entry, usage: UsageRecord) -> Stream:
        attributes = {"llmesh.model": messages.first.model, "llmesh.request_id": usage.request_id,
                      "llmesh.response_cache": "hit"}
        with _tracer.start_as_current_span(f"gateway.{usage.rpc}", attributes=attributes) as span:
            usage.trace_id = format(span.get_span_context().trace_id, "032x")
            span.add_event("response_cache.hit", {"llmesh.messages": len(messages)})
            for resp in messages:
                resp.cached_response = True
                if resp.HasField("usage"):
                    resp.usage.cached_response = True
                usage.observe(resp)
                yield resp
            span.set_attributes({"llmesh.completion_tokens": usage.completion_tokens,
                                 "llmesh.finish_reason": usage.finish_reason})

    def _store_later(self, plan: Plan, recorder: _Recorder) -> None:
        why = recorder.unfit(plan.choices)
        if why:
            _skipped(plan.key.model, why)
            return
        value = encode(recorder.parts)
        task = asyncio.ensure_future(self._put(plan, value))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put(self, plan: Plan, value: bytes) -> None:
        error = await self._store.put(plan.key.tenant, plan.key.digest, value, plan.decision.ttl_s)
        model = plan.key.model
        if error:
            metrics.RESPONSE_CACHE_ERRORS.labels(model, "store").inc()
            return
        metrics.RESPONSE_CACHE_STORES.labels(model).inc()
        metrics.RESPONSE_CACHE_STORED_BYTES.labels(model).inc(len(value))


def _skipped(model: str, reason: str) -> None:
    metrics.RESPONSE_CACHE_SKIPPED.labels(model, reason).inc()
    return None
