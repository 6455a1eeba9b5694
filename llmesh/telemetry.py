"""OpenTelemetry set-up shared by every service.

Tracing is configured by the standard ``OTEL_*`` variables. Spans are always created and
W3C trace context always travels in gRPC metadata (``traceparent``), so one request is
one trace across gateway → router → engine. Export is on when the environment asks for
it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, or
``OTEL_TRACES_EXPORTER=otlp|console``; ``OTEL_SDK_DISABLED=true`` turns tracing off.
Endpoint, headers, TLS, batching and sampling follow the same variables, read by the SDK;
``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` picks ``grpc`` (default) or ``http/protobuf``.

Background traffic is kept out of the traces, or it would bury the requests: health
checks, the router's Load/Info polls, the engines' heartbeats and KV-event streams and
reflection are never traced (a filter on both the client and the server interceptors),
and a model-list poll (``Router/ListModels``) is traced only inside a request's trace,
never as a root.
"""

from __future__ import annotations

import os
import sys

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
# The SDK's own reading of OTEL_TRACES_SAMPLER(_ARG), which NoRootForPolls wraps.
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult, _get_from_env_or_default

_provider: TracerProvider | None = None

UNTRACED_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/llmesh.v1.Engine/Load",
    "/llmesh.v1.Engine/Info",
    "/llmesh.v1.PrefixIndex/Heartbeat",
    "/llmesh.v1.PrefixIndex/Publish",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
})
"""Polls, probes and the engines' KV-event stream (one span per connection, open for the
engine's life, parent of nothing): no span at all, on either side."""

NO_ROOT_METHODS = frozenset({"/llmesh.v1.Router/ListModels"})
"""Called by requests (a client's ListModels) and by background refreshes alike: traced
as part of a request's trace, dropped when it would start a trace of its own."""


class NoRootForPolls(Sampler):
    """Drops the root spans of NO_ROOT_METHODS; every other decision is ``inner``'s (the
    sampler OTEL_TRACES_SAMPLER configures)."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None) -> SamplingResult:
        if name in NO_ROOT_METHODS and not trace.get_current_span(parent_context).get_span_context().is_valid:
            return SamplingResult(Decision.DROP)
        return self.inner.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"NoRootForPolls{{{self.inner.get_description()}}}"


def _exporter_kind() -> str | None:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if kind in ("none", ""):
        has_endpoint = any(os.environ.get(v) for v in (
            "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        return "otlp" if kind == "" and has_endpoint else None
    return kind


def setup_tracing(service: str) -> TracerProvider | None:
    """Install the global tracer provider for ``service`` (once per process)."""
    global _provider
    if _provider is not None:
        return _provider
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource, sampler=NoRootForPolls(_get_from_env_or_default()))
    kind = _exporter_kind()
    if kind == "otlp":
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
    elif kind == "console":
        # stderr, the logs' stream, so each span reaches the log in one write: on stdout, which the
        # launcher copies into the log line by line beside stderr, log lines landed inside spans'
        # multi-line JSON and a reader (bench/mesh_trace.py) lost those spans
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif kind is not None:
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported (use otlp, console or none)")
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def _otlp_exporter():
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported (use grpc or http/protobuf)")
    return OTLPSpanExporter()


def shutdown_tracing() -> None:
    """Flush pending spans (call before the process exits)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)
        _provider.shutdown()


def server_interceptors() -> list:
    """Interceptors that open a server span per RPC, parented by the caller's traceparent."""
    from llmesh.rpc_spans import ServerSpans

    return [ServerSpans(traced)]


def client_interceptors() -> list:
    """Interceptors that open a client span per call and send traceparent downstream."""
    from llmesh.rpc_spans import client_spans

    return client_spans(traced)


def traced(method: str) -> bool:
    """True for the calls (``/pkg.Service/Method``) that get a span."""
    return method not in UNTRACED_METHODS


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
