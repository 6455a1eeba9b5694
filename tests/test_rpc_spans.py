"""The gRPC spans of every llmesh call (llmesh.rpc_spans): a real grpc.aio server and client over
loopback with the project's interceptors, spans collected by the OpenTelemetry SDK's in-memory
exporter. The mesh-wide picture (one trace from gateway to engine, polls untraced, OTLP export)
is tests/faults/test_observability.py's."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from llmesh.telemetry import client_interceptors, server_interceptors

UNARY, STREAM, UNTRACED = "/test.Echo/Unary", "/test.Echo/Stream", "/grpc.health.v1.Health/Check"


@pytest.fixture(scope="module")
def exporter():
    exp = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # nothing in this process installed the SDK yet
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exp))
    return exp


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"internal":
        await context.abort(grpc.StatusCode.INTERNAL, "the handler broke")
    if request == b"invalid":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a bad request")
    return request


async def _stream(request: bytes, context: grpc.aio.ServicerContext):
    for i in range(int(request)):
        await asyncio.sleep(0.01)
        yield b"%d" % i


def _handlers() -> grpc.GenericRpcHandler:
    same = {"request_deserializer": None, "response_serializer": None}
    return grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary, **same),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream, **same),
    })


def _health() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(_unary)})


async def _calls(body):
    server = grpc.aio.server(interceptors=server_interceptors())
    server.add_generic_rpc_handlers((_handlers(), _health()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors())
    try:
        return await asyncio.wait_for(body(channel), timeout=20)
    finally:
        await channel.close()
        await server.stop(None)


def _spans(exporter, name: str) -> dict[SpanKind, object]:
    got = {s.kind: s for s in exporter.get_finished_spans() if s.name == name}
    assert set(got) == {SpanKind.CLIENT, SpanKind.SERVER}, [(s.name, s.kind) for s in exporter.get_finished_spans()]
    return got


def test_a_unary_call_is_one_client_span_and_its_server_child_in_the_callers_trace(exporter):
    exporter.clear()
    tracer = trace.get_tracer("test")

    async def body(channel):
        with tracer.start_as_current_span("caller") as caller:
            assert await channel.unary_unary(UNARY)(b"hello") == b"hello"
            return caller.get_span_context()

    caller = asyncio.run(_calls(body))
    spans = _spans(exporter, UNARY)
    client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
    assert client.context.trace_id == server.context.trace_id == caller.trace_id
    assert client.parent.span_id == caller.span_id and server.parent.span_id == client.context.span_id
    for span in (client, server):
        assert dict(span.attributes) == {"rpc.system": "grpc", "rpc.service": "test.Echo", "rpc.method": "Unary",
                                         "rpc.grpc.status_code": 0}
        assert span.status.status_code is StatusCode.UNSET
    assert client.start_time <= server.start_time and server.end_time <= client.end_time


def test_failed_calls_carry_their_code_and_the_server_span_fails_only_for_server_faults(exporter):
    exporter.clear()

    async def body(channel):
        for request, code in ((b"internal", grpc.StatusCode.INTERNAL), (b"invalid", grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await channel.unary_unary(UNARY)(request)
            assert e.value.code() is code

    asyncio.run(_calls(body))
    spans = sorted((s for s in exporter.get_finished_spans() if s.name == UNARY), key=lambda s: s.start_time)
    internal = {s.kind: s for s in spans[:2]}
    invalid = {s.kind: s for s in spans[2:]}
    assert internal[SpanKind.SERVER].attributes["rpc.grpc.status_code"] == 13
    assert internal[SpanKind.SERVER].status.status_code is StatusCode.ERROR
    assert internal[SpanKind.CLIENT].status.status_code is StatusCode.ERROR
    assert "the handler broke" in internal[SpanKind.CLIENT].status.description
    assert invalid[SpanKind.SERVER].attributes["rpc.grpc.status_code"] == 3
    assert invalid[SpanKind.SERVER].status.status_code is StatusCode.UNSET  # the caller's fault
    assert invalid[SpanKind.CLIENT].status.status_code is StatusCode.ERROR


def test_a_stream_span_ends_after_its_last_message_and_the_call_is_the_callers_own(exporter):
    exporter.clear()

    async def body(channel):
        call = channel.unary_stream(STREAM)(b"5")
        got = [m async for m in call]
        assert await call.code() is grpc.StatusCode.OK  # the call object, not a wrapper
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len([s for s in exporter.get_finished_spans() if s.name == STREAM]) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return got

    assert asyncio.run(_calls(body)) == [b"0", b"1", b"2", b"3", b"4"]
    spans = _spans(exporter, STREAM)
    client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
    assert server.parent.span_id == client.context.span_id
    assert client.attributes["rpc.grpc.status_code"] == 0 and server.attributes["rpc.grpc.status_code"] == 0
    assert server.end_time - server.start_time >= 40e6  # five messages 10 ms apart, inside the span
    assert client.end_time >= server.end_time


def test_polls_make_no_span_on_either_side(exporter):
    exporter.clear()

    async def body(channel):
        assert await channel.unary_unary(UNTRACED)(b"ping") == b"ping"

    asyncio.run(_calls(body))
    assert exporter.get_finished_spans() == ()
