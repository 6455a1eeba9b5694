"""The public Inference service: authenticate, validate, tokenize once, route, stream.

Both fronts run through it: the gRPC handlers below, and the OpenAI-compatible HTTP
front (``http_front``), which builds the same request messages and calls ``stream`` and
``list_models`` with its own ``CallContext``; so keys, limits, usage, validation,
generation defaults and tracing are one implementation.

Each Generate/Chat call is checked completely before it costs any engine work (size,
model, prompt, sampling ranges, window), tokenized here with the model's own tokenizer
and chat template, and routed as token ids: in ``direct`` routing the router's ``Route``
names the engine and the gateway streams from it (``direct``); in ``proxy`` routing the
router's ``Generate`` stream is passed through unchanged. Either call lives exactly as
long as the client's: a client that goes away (or whose deadline passes) cancels it,
which cancels the engine request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.trace import Status, StatusCode

from llmesh.errors import ServiceError, invalid_argument, not_found, status_for, unavailable
from llmesh.gateway import metrics
from llmesh.gateway.caller import Authenticator, CallContext, Caller, NoAuth
from llmesh.gateway.catalog import ModelCatalog
from llmesh.gateway.config import GatewayConfig
from llmesh.gateway.direct import DirectStreamer
from llmesh.gateway.generation_defaults import GenerationDefaults, apply_defaults
from llmesh.gateway.ratelimit import Lease, RateLimiter
from llmesh.gateway.tokenizers import ModelTokenizers
from llmesh.gateway.tool_calls import (
    ToolCallParser,
    ToolUse,
    forced_spec,
    output_format,
    template_messages,
    tool_use_of,
)
from llmesh.gateway.usage import UsageRecord
from llmesh.gateway.usage_store import UsageStore
from llmesh.gateway.validation import (
    AUTO,
    check_messages,
    check_prompt_present,
    check_request_id,
    check_request_size,
    check_text,
    check_token_ids,
    fit_window,
    resolve_model,
    sampling_proto_with,
    to_sampling_params,
)
from llmesh.sampling_proto import structured_output_to_proto
from llmesh.telemetry import tracer
from llmesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc, router_pb2, router_pb2_grpc

_tracer = tracer("llmesh.gateway")


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, config: GatewayConfig, tokenizers: ModelTokenizers, catalog: ModelCatalog,
                 router: router_pb2_grpc.RouterStub, authenticator: Authenticator | None = None,
                 limiter: RateLimiter | None = None, usage_store: UsageStore | None = None,
                 defaults: GenerationDefaults | None = None, direct: DirectStreamer | None = None) -> None:
        self._config = config
        self._defaults = defaults or GenerationDefaults({})
        self._tokenizers = tokenizers
        self._catalog = catalog
        self._router = router
        self._direct = direct
        """Streams from the engines itself (direct routing); None streams through the router."""
        self._auth = authenticator or NoAuth()
        self._limiter = limiter
        self._usage_store = usage_store
        self._background: set[asyncio.Task] = set()

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

    async def Tokenize(self, request: inference_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.TokenizeResponse:
        _check_decoded(request)
        caller = await self._auth.authenticate(context)
        check_request_size(request.ByteSize(), self._config.max_request_bytes)
        model = request.model.strip()
        _check_allowed(model, self._tokenizers.names, caller)
        names = [n for n in self._tokenizers.names if caller.may_use(n)]
        if model == AUTO or not model:
            raise invalid_argument(f"Tokenize needs a model name (tokenizers differ between models); "
                                   f"available models: {', '.join(sorted(names))}")
        if model not in names:
            raise not_found(f"model {model!r} is not served; available models: {', '.join(sorted(names))}")
        if request.messages:
            messages = check_messages([(m.role, m.content) for m in request.messages])
            out = self._tokenizers.tokenize(model, messages=messages)
        else:
            check_text(request.text, "text")
            add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
            out = self._tokenizers.tokenize(model, text=request.text, add_special_tokens=add_special)
        try:
            await self._catalog.cards(model)
        except ServiceError:
            pass  # tokenizing does not need the router; the window is then reported as 0
        return inference_pb2.TokenizeResponse(token_ids=out.token_ids, tokens=out.tokens,
                                              max_model_len=self._catalog.window(model))

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        _check_decoded(request)
        return await self.list_models(context)

    # ---- what both fronts call ---------------------------------------------------------------
    async def list_models(self, context: CallContext) -> inference_pb2.ListModelsResponse:
        """The router's cards the caller may use, with what only the gateway knows (the
        generation defaults it applies, whether it has a chat template) filled in."""
        caller = await self._auth.authenticate(context)
        cards = await self._catalog.cards()
        out = inference_pb2.ListModelsResponse()
        for name, card in sorted(cards.items()):
            if caller.may_use(name):
                shown = out.models.add()
                shown.CopyFrom(card)
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
        _check_decoded(request)
        is_chat = isinstance(request, inference_pb2.ChatRequest)
        usage = UsageRecord(rpc, request.request_id, requested_model=request.model)
        status = "OK"
        caller: Caller | None = None
        lease: Lease | None = None
        prompt_len = 0
        try:
            caller = await self._auth.authenticate(context)
            usage.tenant, usage.key_id = caller.tenant, caller.key_id
            use = tool_use_of(request, request.parallel_tool_calls if request.HasField("parallel_tool_calls")
                              else True) if is_chat else None
            route = await (self._route_chat(request, caller, use) if is_chat else
                           self._route_generate(request, caller))
            apply_tier(route, caller)
            usage.request_id, usage.model = route.request_id, route.model
            prompt_len = len(route.prompt_token_ids) or max(
                (len(t.ids) for t in route.prompt_token_ids_by_model.values()), default=0)
            if self._limiter is not None:
                lease = await self._limiter.admit(caller, prompt_len + route.sampling.max_tokens)
            async with aclosing(self._stream(route, usage, context)) as stream:
                parser: ToolCallParser | None = None
                async for resp in stream:
                    if use is not None:
                        if parser is None:
                            template = self._tokenizer(resp.model).chat_template if resp.model else None
                            parser = ToolCallParser(use, output_format(template))
                        _parse_tool_calls(parser, resp)
                    yield resp
        except BaseException as e:
            status = _status_name(e, context)
            requested = request.model.strip() or AUTO
            if not usage.model and (requested == AUTO or requested in self._catalog.names):
                usage.model = requested  # a known name: a bounded metric label
            raise
        finally:
            usage.finish(status)
            self._after_stream(caller, lease, usage, prompt_len)

    def _after_stream(self, caller: Caller | None, lease: Lease | None, usage: UsageRecord,
                      prompt_len: int) -> None:
        """Settle the token reservation and record usage, in the background: the stream may
        be ending because its task was cancelled, and neither must delay the caller."""
        started = usage.ttft_s is not None or usage.completion_tokens > 0
        used = max(usage.prompt_tokens, prompt_len if started else 0) + usage.completion_tokens
        jobs = []
        if lease is not None:
            jobs.append(lease.settle(used))
        if self._usage_store is not None and caller is not None and usage.model and started:
            jobs.append(self._usage_store.add(caller.key_id, caller.tenant, usage.model, usage.prompt_tokens
                                              or prompt_len, usage.cached_tokens, usage.completion_tokens))
        for job in jobs:
            task = asyncio.ensure_future(job)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ---- building the router request -------------------------------------------------------
    async def _route_generate(self, request: inference_pb2.GenerateRequest,
                              caller: Caller) -> router_pb2.RouteRequest:
        check_request_size(request.ByteSize(), self._config.max_request_bytes)
        check_request_id(request.request_id)
        model = await self._resolve(request.model, caller)
        kind = request.WhichOneof("prompt")
        check_prompt_present(kind, request.text, request.token_ids.ids)
        to_sampling_params(request.sampling, self._config.default_max_tokens)
        if kind == "token_ids":
            if model == AUTO:
                raise invalid_argument("a token_ids prompt needs an explicit model: token ids belong to one "
                                       "model's tokenizer; send prompt text to use 'auto'")
            ids = list(request.token_ids.ids)
            check_token_ids(ids, self._tokenizer(model).vocab_size, model, "prompt.token_ids")
            prompts = {model: ids}
        else:
            prompts = {m: self._tokenizer(m).encode(request.text) for m in self._candidates(model, caller)}
        return self._route_request(request.request_id, model, prompts, request.sampling,
                                   request.priority, caller, request.text if model == AUTO else "")

    async def _route_chat(self, request: inference_pb2.ChatRequest, caller: Caller,
                          use: ToolUse | None) -> router_pb2.RouteRequest:
        check_request_size(request.ByteSize(), self._config.max_request_bytes)
        check_request_id(request.request_id)
        model = await self._resolve(request.model, caller)
        messages = check_messages([(m.role, m.content) for m in request.messages])
        for message, extra in zip(messages, template_messages(request.messages)):
            message.update(extra)
        sampling = request.sampling
        forced = forced_spec(use) if use is not None else None
        if forced is not None:
            if request.sampling.WhichOneof("structured_output") is not None:
                raise invalid_argument("tool_choice forces a function call, which is generated under its own "
                                       "grammar: drop sampling.structured_output (or use tool_choice auto)")
            sampling = common_pb2.SamplingParams()
            sampling.CopyFrom(request.sampling)
            structured_output_to_proto(forced, sampling)
        to_sampling_params(sampling, self._config.default_max_tokens)
        tools = {"tools": use.tools} if use is not None else {}
        prompts = {m: self._tokenizer(m).encode_chat(messages, **tools) for m in self._candidates(model, caller)}
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return self._route_request(request.request_id, model, prompts, sampling,
                                   request.priority, caller, last_user if model == AUTO else "")

    async def _resolve(self, requested: str, caller: Caller) -> str:
        cards = await self._catalog.cards(requested.strip())
        _check_allowed(requested.strip(), list(cards), caller)
        return resolve_model(requested, [n for n in cards if caller.may_use(n)])

    def _candidates(self, model: str, caller: Caller) -> list[str]:
        """The models a text prompt is tokenized for: the one named, or every one for auto."""
        if model != AUTO:
            return [model]
        names = [n for n in self._catalog.names if caller.may_use(n) and self._tokenizers.get(n)]
        if not names:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "no served model has a tokenizer in the gateway's models file")
        return names

    def _tokenizer(self, model: str):
        tok = self._tokenizers.get(model)
        if tok is None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the gateway has no tokenizer for model {model!r}: add it to the gateway's "
                               "models file")
        return tok

    def _route_request(self, request_id: str, model: str, prompts: dict[str, list[int]],
                       sampling: common_pb2.SamplingParams, priority: int, caller: Caller,
                       prompt_text: str) -> router_pb2.RouteRequest:
        """Window checks, the effective max_tokens, and the RouteRequest itself.

        For ``auto`` only the models whose window fits the prompt are offered to the
        router; the request fails only when none does.
        """
        requested = sampling.max_tokens if sampling.HasField("max_tokens") else None
        fitting: dict[str, int] = {}
        errors: list[ServiceError] = []
        for name, ids in prompts.items():
            try:
                fitting[name] = fit_window(len(ids), requested, self._config.default_max_tokens,
                                           self._catalog.window(name), name)
            except ServiceError as e:
                errors.append(e)
        if not fitting:
            raise errors[0]
        max_tokens = min(fitting.values())
        effective = sampling_proto_with(sampling, max_tokens)
        apply_defaults(effective, self._defaults.common(fitting) if model == AUTO else self._defaults.of(model))
        to_sampling_params(effective, max_tokens)
        route = router_pb2.RouteRequest(
            request_id=request_id or uuid.uuid4().hex, model=model,
            sampling=effective, priority=priority,
            cache_salt=caller.cache_salt, prompt_text=prompt_text, tier=caller.tier)
        if model == AUTO:
            for name in fitting:
                route.prompt_token_ids_by_model[name].ids.extend(prompts[name])
        else:
            route.prompt_token_ids.extend(prompts[model])
        return route

    # ---- streaming -------------------------------------------------------------------------
    async def _stream(self, route: router_pb2.RouteRequest, usage: UsageRecord,
                      context: CallContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        prompt_tokens = len(route.prompt_token_ids) or max(
            (len(t.ids) for t in route.prompt_token_ids_by_model.values()), default=0)
        attributes = {"llmesh.model": route.model, "llmesh.request_id": route.request_id,
                      "llmesh.prompt_tokens": prompt_tokens,
                      "llmesh.max_tokens": route.sampling.max_tokens}
        with _tracer.start_as_current_span(f"gateway.{usage.rpc}", attributes=attributes,
                                           record_exception=False, set_status_on_exception=False) as span:
            span.set_attribute("llmesh.routing", "proxy" if self._direct is None else "direct")
            call = (self._router.Generate(route, timeout=_time_remaining(context)) if self._direct is None else
                    self._direct.stream(route, lambda: _time_remaining(context)))
            metrics.IN_FLIGHT.inc()
            try:
                async for resp in call:
                    usage.observe(resp)
                    yield resp
            except grpc.aio.AioRpcError as e:
                span.set_status(Status(StatusCode.ERROR, e.code().name))
                if e.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (e.details() or ""):
                    raise unavailable(f"the router at {self._config.router} is unreachable; try again "
                                      f"shortly ({e.details()})") from None
                raise
            except BaseException as e:
                span.set_status(Status(StatusCode.ERROR, _status_name(e, context)))
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


def _check_allowed(model: str, served, caller: Caller) -> None:
    """A served model outside the key's list is PERMISSION_DENIED (not NOT_FOUND)."""
    if model in served and not caller.may_use(model):
        metrics.AUTH_FAILURES.labels("model_not_allowed").inc()
        allowed = ", ".join(sorted(n for n in served if caller.may_use(n))) or "none"
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                           f"API key {caller.key_id} may not use model {model!r}; it may use: {allowed}")


def apply_tier(route: router_pb2.RouteRequest, caller: Caller) -> None:
    """The key's tier is the request's priority: an interactive key's unset priority becomes
    interactive; a batch key's requests run at batch priority and may not ask for interactive."""
    if caller.tier == "interactive" and route.priority == common_pb2.PRIORITY_UNSPECIFIED:
        route.priority = common_pb2.PRIORITY_INTERACTIVE
    if caller.tier != "batch":
        return
    if route.priority == common_pb2.PRIORITY_INTERACTIVE:
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                           "this API key's tier is batch: it cannot ask for PRIORITY_INTERACTIVE "
                           "(leave priority unset or use PRIORITY_BATCH)")
    route.priority = common_pb2.PRIORITY_BATCH


def _time_remaining(context: CallContext) -> float | None:
    """The caller's remaining deadline, for the router call (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 ** 8:
        return None
    return max(remaining, 0.0)


def _status_name(exc: BaseException, context: CallContext) -> str:
    """The status code a call ends with, as a name, for logs and metrics."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    mapped = status_for(exc) if isinstance(exc, Exception) else None
    return mapped[0].name if mapped is not None else "INTERNAL"


class UndecodableRequest:
    """Bytes that are not a valid request message (e.g. a string field that is not UTF-8).

    The stock deserializer fails such calls with UNKNOWN before any handler runs; the
    gateway's own deserializers hand this marker to the handler instead, which answers
    INVALID_ARGUMENT like any other bad input.
    """

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(message_cls):
    def deserialize(data: bytes):
        try:
            return message_cls.FromString(data)
        except DecodeError as e:
            return UndecodableRequest(str(e))

    return deserialize


def _check_decoded(request) -> None:
    if isinstance(request, UndecodableRequest):
        raise invalid_argument(f"the request could not be decoded ({request.error}); "
                               "send a valid message with UTF-8 strings")


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> str:
    """Register the Inference service (as the generated helper does, with tolerant
    deserializers); returns its full name."""
    unary_stream, unary_unary = grpc.unary_stream_rpc_method_handler, grpc.unary_unary_rpc_method_handler
    handlers = {
        "Generate": unary_stream(servicer.Generate, request_deserializer=_tolerant(inference_pb2.GenerateRequest),
                                 response_serializer=common_pb2.GenerateResponse.SerializeToString),
        "Chat": unary_stream(servicer.Chat, request_deserializer=_tolerant(inference_pb2.ChatRequest),
                             response_serializer=common_pb2.GenerateResponse.SerializeToString),
        "Tokenize": unary_unary(servicer.Tokenize, request_deserializer=_tolerant(inference_pb2.TokenizeRequest),
                                response_serializer=inference_pb2.TokenizeResponse.SerializeToString),
        "ListModels": unary_unary(servicer.ListModels,
                                  request_deserializer=_tolerant(inference_pb2.ListModelsRequest),
                                  response_serializer=inference_pb2.ListModelsResponse.SerializeToString),
    }
    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
    return name
