"""The OpenAI-compatible HTTP front of the gateway (aiohttp, in the gateway's own loop).

    POST /v1/chat/completions   POST /v1/completions   POST /v1/embeddings   GET /v1/models   GET /health
    POST /tokenize   POST /detokenize   (vLLM's shapes)

Each request is parsed into the gateway's own ChatRequest/GenerateRequest and run
through ``InferenceServicer.stream``, the path the gRPC front takes: the same API keys
(``Authorization: Bearer``), rate limits, usage lines, validation, generation defaults
and spans. aiohttp was chosen over starlette/uvicorn by measurement (bench/http_front.py
records both stacks' time to the first SSE event).

Headers are sent only once the first token arrives (or the request fails), so every
refusal, a rate limit or a missing replica included, is a proper HTTP status; an error
after that ends the SSE stream with one ``data: {"error": ...}`` event. A client that
disconnects cancels its handler, which cancels the router call and frees the engine's KV
blocks, as a cancelled gRPC call does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate

from llmesh.gateway.http_errors import HttpError, http_error_for
from llmesh.gateway.openai_request import (
    ParsedRequest,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_tokenize,
)
from llmesh.gateway.openai_embeddings import cache_outcome, embeddings_body, parse_embeddings
from llmesh.gateway.openai_response import CompletionBuilder
from llmesh.gateway.response_cache.policy import parse_mode_header
from llmesh.gateway.servicer import InferenceServicer
from llmesh.gateway.tokenizers import ModelTokenizers
from llmesh.v1 import common_pb2

log = logging.getLogger(__name__)

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CACHE_HEADER = "x-llmesh-cache"
"""Request: the response cache mode (use, bypass, refresh). Response: ``hit`` when the answer
was replayed from the response cache (its JSON then also has ``"cached_response": true``);
/v1/embeddings answers ``hit``, ``partial`` or ``miss`` (how many vectors the cache gave)."""
OWNED_BY = "llmesh"


@dataclasses.dataclass(frozen=True)
class HttpCallContext:
    """The ``CallContext`` of an HTTP request: its Authorization headers as metadata."""

    authorization: tuple[str, ...]
    """Every Authorization header value (more than one is refused, as in gRPC)."""

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return [("authorization", v) for v in self.authorization]

    def time_remaining(self) -> float | None:
        return None  # HTTP has no deadline header; a client that gives up disconnects


def _context(request: web.Request) -> HttpCallContext:
    return HttpCallContext(tuple(request.headers.getall("Authorization", ())))


def _json_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body, ensure_ascii=False).encode(), status=status,
                        headers=headers, content_type="application/json")


def _error_response(err: HttpError) -> web.Response:
    return _json_response(err.body(), err.status, err.headers)


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@web.middleware
async def _errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every error, routing ones included (404, 405, 413), in OpenAI's JSON shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        type_ = "not_found_error" if e.status == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.path}; llmesh serves /v1/chat/completions, "
                        "/v1/completions, /v1/embeddings, /v1/models, /tokenize, /detokenize and /health",
                   405: f"method {request.method} is not allowed on {request.path}",
                   413: f"request body is over the gateway's limit of {request.app['max_bytes']} bytes "
                        "(max_request_bytes)"}.get(e.status, e.reason)
        return _json_response(HttpError(e.status, message, type_=type_).body(), e.status)
    except HttpError as e:
        return _error_response(e)


class HttpFront:
    """The aiohttp application and its server; ``start``/``stop`` from the gateway's main."""

    def __init__(self, servicer: InferenceServicer, tokenizers: ModelTokenizers, max_request_bytes: int) -> None:
        self._servicer = servicer
        self._tokenizers = tokenizers
        self.app = web.Application(middlewares=[_errors], client_max_size=max_request_bytes)
        self.app["max_bytes"] = max_request_bytes
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_post("/tokenize", self.tokenize)
        self.app.router.add_post("/detokenize", self.detokenize)
        self.app.router.add_get("/health", self.health)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """``reuse_port``: the gateway's workers share the port (``llmesh.gateway.workers``)."""
        # handler_cancellation: a client that disconnects cancels its handler (and so the
        # router call), instead of the stream running on until its next write fails.
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the bound port when port was 0

    async def stop(self, grace_s: float) -> None:
        if self._runner is not None:
            await self._runner.shutdown()
            await self._runner.cleanup()

    # ---- handlers ---------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, "ChatCompletions")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, "Completions")

    async def embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's embeddings: ``{"model", "input", "encoding_format"?, "dimensions"?}``."""
        try:
            message, encoding = parse_embeddings(await _body(request), request.headers.get(CACHE_HEADER))
            token = otel_context.attach(propagate.extract(request.headers))
            try:
                out = await self._servicer.Embed(message, _context(request))
            finally:
                otel_context.detach(token)
        except Exception as e:  # noqa: BLE001 - every failure becomes its HTTP status
            return _error_response(http_error_for(e))
        return _json_response(embeddings_body(out, encoding), headers={CACHE_HEADER: cache_outcome(out)})

    async def models(self, request: web.Request) -> web.Response:
        try:
            listed = await self._servicer.list_models(_context(request))
        except Exception as e:  # noqa: BLE001 - every failure becomes its HTTP status
            return _error_response(http_error_for(e))
        data = []
        for card in listed.models:
            defaults = {f.name: v for f, v in card.generation_defaults.ListFields()}
            data.append({"id": card.name, "object": "model", "created": 0, "owned_by": OWNED_BY,
                         "max_model_len": card.max_model_len, "size_class": card.size_class,
                         "healthy_replicas": card.healthy_replicas, "replicas": card.replicas,
                         "generation_defaults": defaults, "has_chat_template": card.has_chat_template})
        return _json_response({"object": "list", "data": data})

    async def tokenize(self, request: web.Request) -> web.Response:
        """``{"model", "prompt"}`` or ``{"model", "messages"}`` → ``{"tokens", "count", "max_model_len"}``."""
        try:
            body = await _body(request)
            message = parse_tokenize(body)
            out = await self._servicer.Tokenize(message, _context(request))
        except Exception as e:  # noqa: BLE001 - every failure becomes its HTTP status
            return _error_response(http_error_for(e))
        return _json_response({"tokens": list(out.token_ids), "count": len(out.token_ids),
                               "max_model_len": out.max_model_len, "token_strs": list(out.tokens)})

    async def detokenize(self, request: web.Request) -> web.Response:
        """``{"model", "tokens": [ids]}`` → ``{"prompt": text}``."""
        try:
            body = await _body(request)
            message = parse_detokenize(body)
            out = await self._servicer.Detokenize(message, _context(request))
        except Exception as e:  # noqa: BLE001
            return _error_response(http_error_for(e))
        return _json_response({"prompt": out.text})

    async def health(self, request: web.Request) -> web.Response:
        """200 while the router lists at least one model with a healthy replica."""
        try:
            cards = await self._servicer.catalog.cards()
        except Exception as e:  # noqa: BLE001
            return _json_response({"status": "unavailable", "reason": str(e)}, 503)
        healthy = sum(1 for c in cards.values() if c.healthy_replicas > 0)
        status = 200 if healthy else 503
        return _json_response({"status": "ok" if healthy else "unavailable", "models_serving": healthy}, status)

    async def _generate(self, request: web.Request, parse: Callable[[Any], ParsedRequest],
                        rpc: str) -> web.StreamResponse:
        try:
            parsed = parse(await _body(request))
            parsed.message.cache = parse_mode_header(request.headers.get(CACHE_HEADER))
        except HttpError as e:
            return _error_response(e)
        except ValueError as e:
            return _error_response(HttpError(400, str(e)))
        parsed.message.request_id = uuid.uuid4().hex
        token = otel_context.attach(propagate.extract(request.headers))
        try:
            return await self._run(request, parsed, rpc)
        finally:
            otel_context.detach(token)

    async def _run(self, request: web.Request, parsed: ParsedRequest, rpc: str) -> web.StreamResponse:
        builder = CompletionBuilder(chat=rpc == "ChatCompletions", request_id=parsed.message.request_id,
                                    tokenizer_of=self._tokenizers.get, logprobs=parsed.logprobs,
                                    echo=parsed.echo)
        async with aclosing(self._servicer.stream(rpc, parsed.message, _context(request))) as stream:
            try:
                first = await anext(stream, None)
                if first is not None:
                    builder.observe(first)
            except Exception as e:  # noqa: BLE001 - refused before any token: a plain HTTP error
                return _error_response(http_error_for(e))
            if not parsed.stream:
                return await self._whole(stream, first, builder)
            return await self._sse(request, stream, first, builder, parsed.include_usage)

    async def _whole(self, stream: AsyncIterator[common_pb2.GenerateResponse],
                     first: common_pb2.GenerateResponse | None, builder: CompletionBuilder) -> web.Response:
        try:
            async for resp in stream:
                builder.observe(resp)
        except Exception as e:  # noqa: BLE001
            return _error_response(http_error_for(e))
        body = builder.whole()
        if first is not None and first.cached_response:
            body["cached_response"] = True
            return _json_response(body, headers={CACHE_HEADER: "hit"})
        return _json_response(body)

    async def _sse(self, request: web.Request, stream: AsyncIterator[common_pb2.GenerateResponse],
                   first: common_pb2.GenerateResponse | None, builder: CompletionBuilder,
                   include_usage: bool) -> web.StreamResponse:
        cached = first is not None and first.cached_response
        response = web.StreamResponse(headers={**SSE_HEADERS, CACHE_HEADER: "hit"} if cached else SSE_HEADERS)
        await response.prepare(request)
        try:
            if first is not None:
                chunk = builder.chunk(first)
                if chunk is not None:
                    await response.write(_sse(_marked(chunk, cached)))
            async for resp in stream:
                builder.observe(resp)
                chunk = builder.chunk(resp)
                if chunk is not None:
                    await response.write(_sse(_marked(chunk, cached)))
            if include_usage:
                await response.write(_sse(_marked(builder.usage_chunk(), cached)))
        except (ConnectionResetError, ConnectionError):
            return response  # the client went away; closing the stream cancels the request
        except Exception as e:  # noqa: BLE001 - headers are out: the error is the last event
            await response.write(_sse(http_error_for(e).body()))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response


def _marked(chunk: dict[str, Any], cached: bool) -> dict[str, Any]:
    """A chunk of a replayed answer says so (a field OpenAI's SDK keeps as an extra)."""
    if cached:
        chunk["cached_response"] = True
    return chunk


async def _body(request: web.Request) -> Any:
    try:
        return await request.json(loads=_strict_json)
    except (ValueError, UnicodeDecodeError) as e:
        raise HttpError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise HttpError(400, "the request body nests JSON arrays or objects too deeply") from None


def _strict_json(text: str) -> Any:
    """json.loads without NaN/Infinity (not JSON, and not a valid sampling value)."""
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")
    return json.loads(text, parse_constant=refuse)
