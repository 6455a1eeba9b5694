"""OpenTelemetry set-up shared by every service.

Tracing is configured by the standard ``OTEL_*`` variables. Spans are always created and
W3C trace context always travels in gRPC metadata (``traceparent``), so one request is
one trace across gateway → router → engine. Export is on when the environment asks for
it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, or
``OTEL_TRACES_EXPORTER=otlp|console``; ``OTEL_SDK_DISABLED=true`` turns tracing off.
Endpoint, headers, TLS, batching and sampling follow the same variables, read by the SDK.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_provider: TracerProvider | None = None


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
    provider = TracerProvider(resource=resource)
    kind = _exporter_kind()
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif kind == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif kind is not None:
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r} is not supported (use otlp, console or none)")
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Flush pending spans (call before the process exits)."""
    if _provider is not None:
        _provider.force_flush(timeout_millis=5000)
        _provider.shutdown()


def server_interceptors() -> list:
    """Interceptors that open a server span per RPC, parented by the caller's traceparent."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors() -> list:
    """Interceptors that open a client span per call and send traceparent downstream."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
