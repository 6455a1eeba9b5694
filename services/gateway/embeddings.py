"""Inference.Embed: embeddings of texts or token-id lists, through the same gate as generation.

One call runs the checks of a Generate call, cheapest first: the stream cap (an Embed call
holds one slot), the API key, every check that needs no tokenizer (size, request id,
priority, the inputs' presence, count and bytes, the model and the caller's right to it),
the key's rate limits (an embedding costs its input tokens: token-id inputs are reserved
at admission, text inputs one token each until tokenized, then the rest), tokenizing (large
texts in the tokenizer workers), each input's window check; then ``compute`` sends the
token-id inputs to the router's ``Embed``, which picks a replica and fails over. One usage
record per call (prompt tokens = the inputs' tokens, no completion tokens) and one span,
``gateway.Embed``.

``compute`` is the one function from token-id inputs to vectors: with the embedding cache
on (``response_cache.embedding_cache``) it takes the vectors of inputs seen before from
Redis and sends only the others to the engine; rate limits then charge only the engine's
tokens, while the answer's usage still counts every input. Embeddings always go through the router (in direct routing
too): a call is unary and its vectors are small beside a generation's stream, so the
extra hop buys one failover implementation (the router's).
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
from opentelemetry.trace import Status, StatusCode

from llmesh.errors import ServiceError, invalid_argument, unavailable
from llmesh.gateway.admission import StreamCap
from llmesh.gateway.caller import Authenticator, CallContext, Caller
from llmesh.gateway.catalog import ModelCatalog
from llmesh.gateway.config import GatewayConfig
from llmesh.gateway.ratelimit import Lease, RateLimiter
from llmesh.gateway.request_ids import LiveRequestIds, RequestIds
from llmesh.gateway.response_cache.embedding_cache import EmbedPlan, EmbeddingCache
from llmesh.gateway.response_cache.policy import check_mode
from llmesh.gateway.route_builder import RouteBuilder, check_allowed, tier_priority
from llmesh.gateway.servicer import _outcome, _time_remaining
from llmesh.gateway.tokenizers import TokenizerPool, input_bytes
from llmesh.gateway.usage import UsageRecord
from llmesh.gateway.usage_store import UsageStore
from llmesh.gateway.validation import (AUTO, check_priority, check_prompt_bytes, check_request_id,
                                       check_request_size, check_text, check_token_ids, resolve_model)
from llmesh.overload import passed_on
from llmesh.telemetry import tracer
from llmesh.v1 import engine_pb2, inference_pb2, router_pb2, router_pb2_grpc

_tracer = tracer("llmesh.gateway")

MAX_EMBED_INPUTS = 2048
"""Inputs one Embed call may carry (OpenAI's limit)."""


@dataclasses.dataclass
class CheckedEmbed:
    """An Embed request that passed every check needing no tokenizer."""

    model: str
    inputs: list[str | list[int]]
    dimensions: int | None
    priority: int

    @property
    def known_tokens(self) -> int:
        """Tokens it costs for sure before tokenizing: token-id inputs' lengths, one per text."""
        return sum(1 if isinstance(x, str) else len(x) for x in self.inputs)


class Embedder:
    """Inference.Embed, for both fronts (the HTTP front's /v1/embeddings calls it too)."""

    def __init__(self, config: GatewayConfig, routes: RouteBuilder, pool: TokenizerPool, catalog: ModelCatalog,
                 router: router_pb2_grpc.RouterStub, auth: Authenticator, streams: StreamCap,
                 live_ids: LiveRequestIds, limiter: RateLimiter | None, usage_store: UsageStore | None,
                 cache: EmbeddingCache | None = None) -> None:
        self._config, self._routes, self._pool, self._catalog = config, routes, pool, catalog
        self._router, self._auth, self._streams, self._live_ids = router, auth, streams, live_ids
        self._limiter, self._usage_store = limiter, usage_store
        self._cache = cache
        """Vectors of inputs seen before, from Redis (None: off; docs/response-cache.md)."""
        self._background: set[asyncio.Task] = set()

    async def embed(self, request: inference_pb2.EmbedRequest, context: CallContext) -> engine_pb2.EmbedResponse:
        usage = UsageRecord("Embed", request.request_id, requested_model=request.model)
        status = "OK"
        caller: Caller | None = None
        ids: RequestIds | None = None
        lease: Lease | None = None
        holds_slot = False
        try:
            self._streams.acquire()
            holds_slot = True
            caller = await self._auth.authenticate(context)
            usage.tenant, usage.key_id = caller.tenant, caller.key_id
            checked = await self._check(request, caller)
            usage.model = checked.model
            ids = self._live_ids.claim(caller.key_id, request.request_id)
            usage.request_id, usage.engine_request_id = ids.client, ids.engine
            if self._limiter is not None:
                lease = await self._limiter.admit(caller, checked.known_tokens)
            token_inputs = await self._tokenize(checked)
            total = sum(map(len, token_inputs))
            if lease is not None:
                await lease.extend(total)
            plan = None if self._cache is None else self._cache.plan(
                checked.model, token_inputs, checked.dimensions, caller, request.cache)
            resp = await self.compute(checked.model, token_inputs, dimensions=checked.dimensions,
                                      priority=checked.priority, cache_salt=caller.cache_salt,
                                      request_id=ids.engine, usage=usage, context=context, plan=plan)
            resp.request_id = ids.client  # the engine's id is the mesh's, never shown
            return resp
        except BaseException as e:
            status, usage.error = _outcome(e, context)
            raise
        finally:
            if ids is not None:
                self._live_ids.release(caller.key_id, ids)
            if holds_slot:
                self._streams.release()
            usage.finish(status)
            self._settle(caller, lease, usage)

    async def _check(self, request: inference_pb2.EmbedRequest, caller: Caller) -> CheckedEmbed:
        cfg = self._config
        check_request_size(request.ByteSize(), cfg.max_request_bytes)
        check_request_id(request.request_id)
        check_priority(request.priority)
        check_mode(request.cache)
        if not request.inputs:
            raise invalid_argument("inputs is empty: send at least one text or token-id list to embed")
        if len(request.inputs) > MAX_EMBED_INPUTS:
            raise invalid_argument(f"inputs has {len(request.inputs)} entries, over the limit of {MAX_EMBED_INPUTS} "
                                   "per call; split the batch")
        inputs: list[str | list[int]] = []
        for i, x in enumerate(request.inputs):
            kind = x.WhichOneof("input")
            if kind == "text" and x.text:
                check_text(x.text, f"inputs[{i}].text")
                inputs.append(x.text)
            elif kind == "token_ids" and x.token_ids.ids:
                inputs.append(list(x.token_ids.ids))
            else:
                raise invalid_argument(f"inputs[{i}] is empty: set its text or its token_ids")
        check_prompt_bytes(sum(input_bytes(x) for x in inputs if isinstance(x, str)), cfg.max_prompt_bytes,
                           "inputs")
        requested = request.model.strip()
        if not requested or requested == AUTO:
            raise invalid_argument("Embed needs a model name: embeddings of different models are not comparable, "
                                   f"so {AUTO!r} is not taken")
        cards = await self._catalog.cards(requested)
        check_allowed(requested, list(cards), caller)
        model = resolve_model(requested, [n for n in cards if caller.may_use(n)])
        tok = self._routes.tokenizer(model)
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                check_token_ids(x, tok.vocab_size, model, f"inputs[{i}].token_ids")
        if request.HasField("dimensions") and request.dimensions < 1:
            raise invalid_argument("dimensions must be ≥ 1 (leave it unset for the model's full vectors)")
        return CheckedEmbed(model, inputs, request.dimensions if request.HasField("dimensions") else None,
                            tier_priority(request.priority, caller))

    async def _tokenize(self, checked: CheckedEmbed) -> list[list[int]]:
        tok = self._routes.tokenizer(checked.model)
        out = await asyncio.gather(*(self._pool.encode(tok, checked.model, x) if isinstance(x, str)
                                     else _ready(x) for x in checked.inputs))
        window = self._catalog.window(checked.model)
        for i, ids in enumerate(out):
            if not ids:
                raise invalid_argument(f"inputs[{i}] has no tokens")
            if window and len(ids) >= window:
                raise invalid_argument(f"inputs[{i}] has {len(ids)} tokens but the window of model "
                                       f"{checked.model!r} is {window} tokens; at most {window - 1} fit")
        return out

    async def compute(self, model: str, inputs: list[list[int]], *, dimensions: int | None, priority: int,
                      cache_salt: str, request_id: str, usage: UsageRecord, context: CallContext,
                      plan: EmbedPlan | None = None) -> engine_pb2.EmbedResponse:
        """The vectors of token-id inputs, in order: those the embedding cache holds (``plan``)
        from Redis, the others from one replica of ``model`` (the router picks it and fails
        over), which the cache then keeps."""
        attributes = {"llmesh.model": model, "llmesh.request_id": usage.request_id,
                      "llmesh.engine_request_id": request_id, "llmesh.inputs": len(inputs),
                      "llmesh.prompt_tokens": sum(map(len, inputs))}
        with _tracer.start_as_current_span("gateway.Embed", attributes=attributes, record_exception=False,
                                           set_status_on_exception=False) as span:
            usage.trace_id = format(span.get_span_context().trace_id, "032x")
            found = await self._cache.lookup(plan) if plan is not None and plan.decision.lookup else {}
            missing = [i for i in range(len(inputs)) if i not in found]
            engine = None
            if missing:
                engine = await self._engine_embed(model, [inputs[i] for i in missing], dimensions=dimensions,
                                                  priority=priority, cache_salt=cache_salt, request_id=request_id,
                                                  context=context, span=span)
                stale = [i for i, v in found.items() if len(v) != 4 * engine.dimensions]
                if stale:  # a stored width the model no longer gives: only a damaged entry does that
                    self._cache.distrust(plan, len(stale))
                    found, missing = {}, list(range(len(inputs)))
                    engine = await self._engine_embed(model, inputs, dimensions=dimensions, priority=priority,
                                                      cache_salt=cache_salt, request_id=request_id,
                                                      context=context, span=span)
            computed = {} if engine is None else {missing[e.index]: e.vector for e in engine.data}
            if plan is not None:
                self._cache.store_later(plan, computed)
            resp = _assemble(model, inputs, found, computed, engine)
            if engine is None:  # every vector from the cache: no engine token was spent
                usage.model, usage.cached_response, usage.prompt_tokens = model, True, resp.usage.prompt_tokens
            else:  # the engine's tokens only: what rate limits and usage charge
                usage.model, usage.replica = engine.model or model, engine.replica
                usage.prompt_tokens, usage.cached_tokens = engine.usage.prompt_tokens, engine.usage.cached_tokens
            span.set_attributes({"llmesh.replica": resp.replica, "llmesh.cached_tokens": resp.usage.cached_tokens,
                                 "llmesh.dimensions": resp.dimensions, "llmesh.embedding_cache.hits": len(found)})
            return resp

    async def _engine_embed(self, model: str, inputs: list[list[int]], *, dimensions: int | None, priority: int,
                            cache_salt: str, request_id: str, context: CallContext, span) -> engine_pb2.EmbedResponse:
        engine_request = engine_pb2.EngineEmbedRequest(
            request_id=request_id, dimensions=dimensions or 0, priority=priority, cache_salt=cache_salt,
            inputs=[engine_pb2.EngineEmbedInput(token_ids=x) for x in inputs])
        try:
            return await self._router.Embed(router_pb2.RouterEmbedRequest(model=model, request=engine_request),
                                            timeout=_time_remaining(context))
        except grpc.aio.AioRpcError as e:
            span.set_status(Status(StatusCode.ERROR, e.code().name))
            if e.code() == grpc.StatusCode.UNAVAILABLE and (e.details() or "").startswith("failed to connect"):
                raise unavailable(f"the router at {self._config.router} is unreachable; try again "
                                  f"shortly ({e.details()})") from None
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # keep the retry hint for the caller
                raise ServiceError(e.code(), e.details() or e.code().name, trailers=passed_on(e)) from None
            raise

    def _settle(self, caller: Caller | None, lease: Lease | None, usage: UsageRecord) -> None:
        """Settle the reservation to the tokens embedded and record usage, in the background."""
        jobs = []
        # Cached inputs spent no engine token: their share of the reservation is given back,
        # as a response cache hit's is (a call answered whole from the cache gives back all).
        spent = 0 if usage.cached_response else usage.prompt_tokens
        if lease is not None:
            jobs.append(lease.settle(spent))
        if self._usage_store is not None and caller is not None and usage.model and usage.prompt_tokens:
            jobs.append(self._usage_store.add(caller.key_id, caller.tenant, usage.model, spent,
                                              usage.cached_tokens, 0, cached_response=usage.cached_response))
        for job in jobs:
            task = asyncio.ensure_future(job)
            self._background.add(task)
            task.add_done_callback(self._background.discard)


def _assemble(model: str, inputs: list[list[int]], found: dict[int, bytes], computed: dict[int, bytes],
              engine: engine_pb2.EmbedResponse | None) -> engine_pb2.EmbedResponse:
    """One answer in input order from the cache's vectors and the engine's. Usage counts
    every input's tokens (what the caller sent); ``cached_inputs`` says how many cost none."""
    resp = engine_pb2.EmbedResponse(model=model, cached_inputs=len(found))
    for i in range(len(inputs)):
        cached = i in found
        resp.data.add(index=i, vector=found[i] if cached else computed[i], cached=cached)
    resp.usage.prompt_tokens = sum(map(len, inputs))
    if engine is None:
        resp.dimensions = len(resp.data[0].vector) // 4
        resp.usage.cached_response = True
    else:
        resp.model, resp.replica, resp.dimensions = engine.model or model, engine.replica, engine.dimensions
        resp.usage.cached_tokens = engine.usage.cached_tokens
    return resp


async def _ready(ids: list[int]) -> list[int]:
    return ids
