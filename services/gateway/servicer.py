"""The public Inference service: authenticate, validate, tokenize once, route, stream.

Both fronts run through it: the gRPC handlers below, and the OpenAI-compatible HTTP
front (``http_front``), which builds the same request messages and calls ``stream`` and
``list_models`` with its own ``CallContext``; so keys, limits, usage, validation,
generation defaults and tracing are one implementation.

Each Generate/Chat call runs its checks cheapest first, so a refusal costs as little as
possible: the gateway's stream cap (``max_streams``), the API key, every check that
needs no tokenizer (size, prompt bytes, stop strings, priority, sampling ranges, model),
the key's rate limits; only then is the prompt tokenized (large ones in worker
processes, off the event loop), the window checked and the token reservation completed
(``route_builder``, docs/operations.md "Admission control"). It is routed as token ids: in ``direct`` routing the router's ``Route``
names the engine and the gateway streams from it (``direct``); in ``proxy`` routing the
router's ``Generate`` stream is passed through unchanged. Either call lives exactly as
long as the client's: a client that goes away (or whose deadline passes) cancels it,
which cancels the engine request and frees its KV blocks. The client's request_id is
unique per API key only; router and engines see an id of the gateway's (``request_ids``),
and responses carry the client's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from opentelemetry.trace import Status, StatusCode

from llmesh.errors import ServiceError, invalid_argument, not_found, status_for, unavailable
from llmesh.gateway import metrics
from llmesh.gateway.admission import StreamCap
from llmesh.gateway.caller import Authenticator, CallContext, Caller, NoAuth
from llmesh.gateway.catalog import ModelCatalog
from llmesh.gateway.choices import ChoiceAccumulator
from llmesh.gateway.config import GatewayConfig
from llmesh.gateway.direct import DirectStreamer
from llmesh.gateway.echo import PromptEcho
from llmesh.gateway.generation_defaults import GenerationDefaults
from llmesh.gateway.ratelimit import Lease, RateLimiter
from llmesh.gateway.request_ids import LiveRequestIds, RequestIds
from llmesh.gateway.response_cache.cache import ResponseCache
from llmesh.gateway.route_builder import RouteBuilder, check_allowed
from llmesh.gateway.tokenizers import ModelTokenizers, TokenizerPool
from llmesh.gateway.tool_calls import ToolCallParser, output_format
from llmesh.gateway.usage import UsageRecord
from llmesh.gateway.usage_store import UsageStore
from llmesh.gateway.validation import (AUTO, check_messages, check_prompt_bytes, check_request_size, check_text,
                                       check_token_ids)
from llmesh.overload import passed_on
from llmesh.rpc_outcomes import caller_gone
from llmesh.telemetry import tracer
from llmesh.v1 import common_pb2, engine_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

_tracer = tracer("llmesh.gateway")


MAX_DETOKENIZE_IDS = 32768
"""Ids one Detokenize call may decode (a window's worth); larger calls are refused."""


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, config: GatewayConfig, tokenizers: ModelTokenizers, catalog: ModelCatalog,
                 router: router_pb2_grpc.RouterStub, authenticator: Authenticator | None = None,
                 limiter: RateLimiter | None = None, usage_store: UsageStore | None = None,
                 defaults: GenerationDefaults | None = None, direct: DirectStreamer | None = None,
                 pool: TokenizerPool | None = None, response_cache: ResponseCache | None = None) -> None:
        self._config = config
        self._response_cache = response_cache
        """Answers repeated deterministic requests from Redis (None: off)."""
        self._defaults = defaults or GenerationDefaults({})
        self._tokenizers = tokenizers
        self._pool = pool or TokenizerPool(tokenizers, workers=0, inline_bytes=0)
        """Tokenizes large inputs off the event loop (no workers: everything inline)."""
        self._routes = RouteBuilder(config, tokenizers, self._pool, catalog, self._defaults)
        self._streams = StreamCap(config.max_streams)
        self._catalog = catalog
        self._router = router
        self._direct = direct
        """Streams from the engines itself (direct routing); None streams through the router."""
        self._auth = authenticator or NoAuth()
        self._limiter = limiter
        self._usage_store = usage_store
        self._background: set[asyncio.Task] = set()
        self._live_ids = LiveRequestIds()
        from llmesh.gateway.embeddings import Embedder  # it reuses this module's call outcomes

        self._embedder = Embedder(config, self._routes, self._pool, catalog, router, self._auth, self._streams,
                                  self._live_ids, limiter, usage_store,
                                  None if response_cache is None else response_cache.embedding_cache())

    @property
    def catalog(self) -> ModelCatalog:
        return self._catalog

    # ---- RPCs ----------------------------------------------------------------------------
    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        async with aclosing(self.stream("Generate", request, context)) as stream:
            async for resp in stream:
                yield resp

    async def Chat(self, request: inference_pb2.ChatRequest,
                   context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        async with aclosing(self.stream("Chat", request, context)) as stream:
            async for resp in stream:
                yield resp

    async def Complete(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.CompleteResponse:
        return await self._unary("Complete", request, context)

    async def ChatComplete(self, request: inference_pb2.ChatRequest,
                           context: grpc.aio.ServicerContext) -> inference_pb2.CompleteResponse:
        return await self._unary("ChatComplete", request, context)

    async def _unary(self, rpc: str, request, context) -> inference_pb2.CompleteResponse:
        """The streaming path read to its end: the same checks, limits, usage and routing."""
        gathered = ChoiceAccumulator()
        async with aclosing(self.stream(rpc, request, context)) as stream:
            async for resp in stream:
                gathered.add(resp)
        return gathered.response()

    async def Detokenize(self, request: inference_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.DetokenizeResponse:
        caller = await self._auth.authenticate(context)
        check_request_size(request.ByteSize(), self._config.max_request_bytes)
        model = self._tokenizer_model(request.model.strip(), caller, "Detokenize")
        tok = self._tokenizers.get(model)
        ids = list(request.token_ids)
        if len(ids) > MAX_DETOKENIZE_IDS:  # decoded on the event loop: bound the work
            raise invalid_argument(f"token_ids: {len(ids)} ids, at most {MAX_DETOKENIZE_IDS} per Detokenize call")
        check_token_ids(ids, tok.vocab_size, model, "token_ids")
        skip = not request.include_special_tokens
        return inference_pb2.DetokenizeResponse(
            text=tok.decode(ids, skip_special_tokens=skip),
            tokens=[tok.decode([t], skip_special_tokens=False) for t in ids])

    def _tokenizer_model(self, model: str, caller: Caller, rpc: str) -> str:
        """The named model of a tokenizer call, checked: allowed to the caller and served."""
        check_allowed(model, self._tokenizers.names, caller)
        names = [n for n in self._tokenizers.names if caller.may_use(n)]
        if model == AUTO or not model:
            raise invalid_argument(f"{rpc} needs a model name (tokenizers differ between models); "
                                   f"available models: {', '.join(sorted(names))}")
        if model not in names:
            raise not_found(f"model {model!r} is not served; available models: {', '.join(sorted(names))}")
        return model

    async def Tokenize(self, request: inference_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.TokenizeResponse:
        caller = await self._auth.authenticate(context)
        check_request_size(request.ByteSize(), self._config.max_request_bytes)
        model = self._tokenizer_model(request.model.strip(), caller, "Tokenize")
        if request.messages:
            messages = check_messages([(m.role, m.content) for m in request.messages])
            check_prompt_bytes(sum(len(m["content"].encode()) for m in messages), self._config.max_prompt_bytes,
                               "messages")
            out = await self._pool.tokenize(model, messages=messages)
        else:
            check_text(request.text, "text")
            check_prompt_bytes(len(request.text.encode()), self._config.max_prompt_bytes, "text")
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            out = await self._pool.tokenize(model, text=request.text, add_special_tokens=add_special)
        try:
            await self._catalog.cards(model)
        except ServiceError:
            pass  # tokenizing does not need the router; the window is then reported as 0
        return inference_pb2.TokenizeResponse(token_ids=out.token_ids, tokens=out.tokens,
                                              max_model_len=self._catalog.window(model))

    async def Embed(self, request: inference_pb2.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> engine_pb2.EmbedResponse:
        return await self._embedder.embed(request, context)

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        return await self.list_models(context)

    # ---- what both fronts call ---------------------------------------------------------------
    async def list_models(self, context: CallContext) -> inference_pb2.ListModelsResponse:
        """The router's cards the caller may use, with what only the gateway knows (the
        generation defaults it applies, whether it has a chat template) filled in."""
        caller = await self._auth.authenticate(context)
        cards = await self._catalog.fresh_cards()
        out = inference_pb2.ListModelsResponse()
        for name, card in sorted(cards.items()):
            if caller.may_use(name):
                shown = out.models.add()
                shown.CopyFrom(card)
                if name in self._tokenizers.unavailable:
                    shown.healthy_replicas = 0  # the gateway cannot serve it (its files are missing)
                shown.generation_defaults.CopyFrom(self._defaults.of(name))
                tok = self._tokenizers.get(name)
                shown.has_chat_template = tok is not None and tok.chat_template is not None
        return out

    async def stream(self, rpc: str, request: inference_pb2.GenerateRequest | inference_pb2.ChatRequest,
                     context: CallContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Authenticate, build the route request, stream it; one usage record either way.

        ``rpc`` names the call in usage lines, metrics and the span (``gateway.<rpc>``);
        the request's type says whether it is a completion or a chat.
        """
        usage = UsageRecord(rpc, request.request_id, requested_model=request.model)
        status = "OK"
        caller: Caller | None = None
        ids: RequestIds | None = None
        lease: Lease | None = None
        prompt_len = 0
        holds_slot = False
        try:
            self._streams.acquire()
            holds_slot = True
            caller = await self._auth.authenticate(context)
            usage.tenant, usage.key_id = caller.tenant, caller.key_id
            checked = await self._routes.check(request, caller)
            ids = self._live_ids.claim(caller.key_id, request.request_id)
            usage.request_id, usage.engine_request_id = ids.client, ids.engine
            if self._limiter is not None:
                lease = await self._limiter.admit(caller, checked.known_tokens)
            route = await self._routes.build(checked, caller)
            route.request_id = ids.engine
            usage.model = route.model
            prompt_len = len(route.prompt_token_ids) or max(
                (len(t.ids) for t in route.prompt_token_ids_by_model.values()), default=0)
            if lease is not None:
                choices = route.sampling.n if route.sampling.HasField("n") else 1
                await lease.extend(prompt_len + choices * route.sampling.max_tokens)
            echo = PromptEcho(request, route, self._tokenizers.get) if getattr(request, "echo", False) else None
            async with aclosing(self._serve(request, caller, route, usage, context)) as stream:
                parsers: dict[int, ToolCallParser] = {}
                async for resp in stream:
                    if echo is not None:
                        echo.fill(resp)
                    if checked.tool_use is not None:  # one parser per choice
                        if resp.index not in parsers:
                            template = self._routes.tokenizer(resp.model).chat_template if resp.model else None
                            parsers[resp.index] = ToolCallParser(checked.tool_use, output_format(template))
                        _parse_tool_calls(parsers[resp.index], resp)
                    resp.request_id = ids.client  # the engine's id is the mesh's, never shown
                    yield resp
        except BaseException as e:
            status, usage.error = _outcome(e, context)
            requested = request.model.strip() or AUTO
            if not usage.model and (requested == AUTO or requested in self._catalog.names):
                usage.model = requested  # a known name: a bounded metric label
            raise
        finally:
            if ids is not None:
                self._live_ids.release(caller.key_id, ids)
            if holds_slot:
                self._streams.release()
            usage.finish(status)
            self._after_stream(caller, lease, usage, prompt_len)

    def _after_stream(self, caller: Caller | None, lease: Lease | None, usage: UsageRecord,
                      prompt_len: int) -> None:
        """Settle the token reservation and record usage, in the background: the stream may
        be ending because its task was cancelled, and neither must delay the caller."""
        started = usage.ttft_s is not None or usage.completion_tokens > 0
        # A response cache hit spent no engine token: its reservation is given back whole.
        used = 0 if usage.cached_response else (
            max(usage.prompt_tokens, prompt_len if started else 0) + usage.completion_tokens)
        jobs = []
        if lease is not None:
            jobs.append(lease.settle(used))
        if self._usage_store is not None and caller is not None and usage.model and started:
            jobs.append(self._usage_store.add(caller.key_id, caller.tenant, usage.model, usage.prompt_tokens
                                              or prompt_len, usage.cached_tokens, usage.completion_tokens,
                                              cached_response=usage.cached_response))
        for job in jobs:
            task = asyncio.ensure_future(job)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---- streaming -------------------------------------------------------------------------
    def _serve(self, request: inference_pb2.GenerateRequest | inference_pb2.ChatRequest, caller: Caller,
               route: router_pb2.RouteRequest, usage: UsageRecord,
               context: CallContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        """The engines' stream, through the response cache when it is on (docs/response-cache.md)."""
        if self._response_cache is None:
            return self._stream(route, usage, context)
        return self._response_cache.serve(self._response_cache.plan(request, caller, route),
                                          lambda: self._stream(route, usage, context), usage)

    async def _stream(self, route: router_pb2.RouteRequest, usage: UsageRecord,
                      context: CallContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        prompt_tokens = len(route.prompt_token_ids) or max(
            (len(t.ids) for t in route.prompt_token_ids_by_model.values()), default=0)
        attributes = {"llmesh.model": route.model, "llmesh.request_id": usage.request_id,
                      "llmesh.engine_request_id": route.request_id,
                      "llmesh.prompt_tokens": prompt_tokens,
                      "llmesh.max_tokens": route.sampling.max_tokens}
        with _tracer.start_as_current_span(f"gateway.{usage.rpc}", attributes=attributes,
                                           record_exception=False, set_status_on_exception=False) as span:
            span.set_attribute("llmesh.routing", "proxy" if self._direct is None else "direct")
            usage.trace_id = format(span.get_span_context().trace_id, "032x")
            call = (self._router.Generate(route, timeout=_time_remaining(context)) if self._direct is None else
                    self._direct.stream(route, lambda: _time_remaining(context)))
            metrics.IN_FLIGHT.inc()
            try:
                async for resp in call:
                    usage.observe(resp)
                    yield resp
            except grpc.aio.AioRpcError as e:
                span.set_status(Status(StatusCode.ERROR, e.code().name))
                # Only the channel's own connection error is about the router: the router's
                # errors about engines may quote an engine's "failed to connect" too.
                if e.code() == grpc.StatusCode.UNAVAILABLE and (e.details() or "").startswith("failed to connect"):
                    raise unavailable(f"the router at {self._config.router} is unreachable; try again "
                                      f"shortly ({e.details()})") from None
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # keep the retry hint for the caller
                    raise ServiceError(e.code(), e.details() or e.code().name, trailers=passed_on(e)) from None
                raise
            except BaseException as e:
                span.set_status(Status(StatusCode.ERROR, _outcome(e, context)[0]))
                raise
            finally:
                if isinstance(call, grpc.aio.Call):
                    call.cancel()
                else:
                    await call.aclose()
                metrics.IN_FLIGHT.dec()
                span.set_attributes({"llmesh.model": usage.model, "llmesh.replica": usage.replica,
                                     "llmesh.prompt_tokens": usage.prompt_tokens or prompt_tokens,
                                     "llmesh.cached_tokens": usage.cached_tokens,
                                     "llmesh.completion_tokens": usage.completion_tokens,
                                     "llmesh.finish_reason": usage.finish_reason})


def _parse_tool_calls(parser: ToolCallParser, resp: common_pb2.GenerateResponse) -> None:
    """Withhold the text of function calls from ``resp``; the last message gets the calls."""
    text = parser.feed(resp.text)
    if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
        rest, calls = parser.finish()
        text += rest
        resp.tool_calls.extend(calls)
    resp.text = text


def _time_remaining(context: CallContext) -> float | None:
    """The caller's remaining deadline, for the router call (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 ** 8:
        return None
    return max(remaining, 0.0)


def _outcome(exc: BaseException, context: CallContext) -> tuple[str, str]:
    """The status a call ends with (its name, for logs and metrics) and what the caller was told."""
    gone = caller_gone(context, exc)
    if gone is not None:
        return gone[0].name, gone[1]
    mapped = status_for(exc) if isinstance(exc, Exception) else None
    if mapped is not None:
        return mapped[0].name, mapped[1]
    return "INTERNAL", f"internal error ({type(exc).__name__}: {exc})"


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> str:
    """Register the Inference service; returns its full name. (Undecodable request bytes
    are refused with INVALID_ARGUMENT by the error interceptor every server has.)"""
    inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    return inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
