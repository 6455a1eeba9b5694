"""How every RPC of every llmesh server ended: counted, timed and, when it failed, logged
with its reason.

One server interceptor (installed by ``GrpcServer``) so that each service counts its
calls the same way, under the same label names — ``grpc_service``, ``grpc_method`` and
``code`` (the status code's name, ``OK`` included) — and every RPC is counted, the small
unary ones (Tokenize, ListModels, Load, health checks) as well as the streams. A failed
call's log line carries the status code, the message the caller got and (from the log
formatter) the trace id, so the line, the metric and the Jaeger trace lead to each other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import grpc
from prometheus_client import Counter, Histogram

log = logging.getLogger("llmesh.rpc")

HANDLED = Counter("llmesh_rpc_server_handled", "RPCs finished, by service, method and status code.",
                  ["grpc_service", "grpc_method", "code"])
HANDLING_SECONDS = Histogram(
    "llmesh_rpc_server_handling_seconds", "From an RPC's start to its end (a stream's whole life).",
    ["grpc_service", "grpc_method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0))

_CALLER_FAULTS = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
})
"""Refusals of what the caller asked (logged at info); any other failure is the mesh's (warning)."""


def split_method(full_method: str) -> tuple[str, str]:
    """'/pkg.Service/Method' → ('pkg.Service', 'Method')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def caller_gone(context, exc: BaseException | None) -> tuple[grpc.StatusCode, str] | None:
    """A call cut short by its caller (cancelled, or its deadline passed): the status it
    ends with and why; None for any other ending."""
    if not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return None
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the caller's deadline passed"
    return grpc.StatusCode.CANCELLED, "the caller cancelled the call"


def final_code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> tuple[grpc.StatusCode, str]:
    """The status the call ends with and its message."""
    gone = caller_gone(context, exc)
    if gone is not None:
        return gone
    code = context.code()
    if isinstance(code, int):  # set_code may hand back the raw enum value
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if code is None:
        code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
    details = context.details() or (f"{type(exc).__name__}: {exc}" if exc is not None else "")
    if isinstance(details, bytes):
        details = details.decode("utf-8", "replace")
    return code, details


def method_name(method: str | bytes) -> str:
    """A handler's full method name (some grpc versions hand bytes)."""
    return method.decode() if isinstance(method, bytes) else method


Observe = Callable[[str, grpc.aio.ServicerContext], AbstractContextManager]
"""Opened around one RPC (its full method name and context): it sees the exception the call
ends with, if any, and what it makes current is current while the handler runs."""


def observe_handler(handler: grpc.RpcMethodHandler, method: str, observe: Observe) -> grpc.RpcMethodHandler:
    """``handler`` with every call run inside ``observe`` (a whole stream, for streamed
    responses): the one way the server interceptors that watch calls wrap them."""
    io = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, method, observe), *io)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, method, observe), *io)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_stream(handler.unary_stream, method, observe), *io)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(_stream(handler.stream_stream, method, observe), *io)
    return handler


def _unary(inner, method: str, observe: Observe):
    async def handler(request, context):
        with observe(method, context):
            return await inner(request, context)
    return handler


def _stream(inner, method: str, observe: Observe):
    async def handler(request_or_iterator, context) -> AsyncIterator:
        with observe(method, context):
            async for item in inner(request_or_iterator, context):
                yield item
    return handler


@contextmanager
def on_end(context: grpc.aio.ServicerContext,
           ended: Callable[[grpc.StatusCode, str, BaseException | None], None]) -> Iterator[None]:
    """Runs the call's body, then, however it ended, ``ended(code, details, exception)`` with
    the status the call ends with (``final_code``): the one reading of a call's end that the
    outcome counter and the server spans share."""
    exc = None
    try:
        yield
    except BaseException as e:
        exc = e
        raise
    finally:
        ended(*final_code(context, exc), exc)


@contextmanager
def _outcome(full_method: str, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Counts, times and (when it failed) logs the call."""
    service, method = split_method(full_method)
    started = time.perf_counter()

    def ended(code: grpc.StatusCode, details: str, exc: BaseException | None) -> None:
        HANDLED.labels(service, method, code.name).inc()
        HANDLING_SECONDS.labels(service, method).observe(time.perf_counter() - started)
        if code is not grpc.StatusCode.OK:
            level = logging.INFO if code in _CALLER_FAULTS else logging.WARNING
            log.log(level, "rpc failed: %s %s: %s", full_method, code.name, details,
                    extra={"rpc": full_method, "code": code.name, "error": details})

    with on_end(context, ended):
        yield


class RpcOutcomeInterceptor(grpc.aio.ServerInterceptor):
    """Counts, times and logs each RPC's outcome. Goes inside the tracing interceptor (so
    the log line carries the call's trace id) and outside the error interceptor (so it
    sees the status that turned an exception into)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return observe_handler(handler, method_name(handler_call_details.method), _outcome)
