"""What every llmesh gRPC server has: one error interceptor, tracing, the standard
health service, reflection, Prometheus metrics (every RPC counted by status code, and
failures logged with their reason: rpc_outcomes) and a graceful shutdown.

Internal servers also check the mesh secret (``llmesh.mesh_secret``).

With ``health_port`` set, the same health service is also served in plaintext on that
port, alone: Kubernetes' native gRPC probes speak neither TLS nor the mesh secret, and an
mTLS-only port would fail them. Besides the overall status ('') it answers ``liveness``,
SERVING from start to shutdown whatever the readiness is (a service that reports
NOT_SERVING while Redis is down is not wedged, and must not be restarted for it).

A service builds a ``ServiceConfig`` subclass, registers its servicers in a
``GrpcServer`` and calls ``run()``; on SIGTERM/SIGINT the server reports NOT_SERVING,
stops accepting calls, lets in-flight streams finish within the grace period and
cancels the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_reflection.v1alpha import reflection, reflection_pb2

from llmesh.config import option, require
from llmesh.errors import ServiceError, status_for
from llmesh.parent_death import arm_from_env
from llmesh.rpc_outcomes import RpcOutcomeInterceptor
from llmesh.mesh_secret import CredentialInterceptor, secret_of
from llmesh.tls import server_credentials
from llmesh.telemetry import current_trace_id, server_interceptors, setup_tracing, shutdown_tracing

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServiceConfig:
    """Fields every service has; each service's config dataclass extends it."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)")
    port: int = option(0, "gRPC port (0 picks a free one)")
    metrics_port: int = option(0, "Prometheus /metrics HTTP port (0 disables it)")
    health_port: int = option(0, "also serve grpc.health.v1 alone, in plaintext, on this port (Kubernetes gRPC "
                                 "probes, which speak no TLS); 0 disables it")
    grace_period_s: float = option(5.0, "on shutdown, seconds in-flight calls get to finish")
    log_level: str = option("info", "debug, info, warning or error")
    tls_cert: str | None = option(None, "PEM certificate: serve TLS, and present it to peers asking for mTLS")
    tls_key: str | None = option(None, "PEM private key of tls_cert")
    tls_ca: str | None = option(None, "PEM CA of the peers: verify servers this service calls (and clients, with "
                                      "tls_require_client_cert)")
    tls_require_client_cert: bool = option(False, "mTLS: accept only clients with a certificate signed by tls_ca")
    tls_client_cert: str | None = option(None, "PEM certificate presented on this service's own calls instead "
                                               "of tls_cert (a service whose port serves no TLS)")
    tls_client_key: str | None = option(None, "PEM private key of tls_client_cert")
    internal_secret_file: str | None = option(None, "file holding the mesh secret: sent on this service's calls "
                                                    "to other services; internal services refuse calls without "
                                                    "it; the gateway keys tenants' cache salts with it")

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        require(0 <= self.metrics_port <= 65535, f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        require(0 <= self.health_port <= 65535, f"health_port must be in [0, 65535], got {self.health_port}")
        require(self.grace_period_s >= 0, f"grace_period_s must be >= 0, got {self.grace_period_s}")
        require(self.log_level.lower() in ("debug", "info", "warning", "error"),
                f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        require(bool(self.tls_client_cert) == bool(self.tls_client_key),
                "tls_client_cert and tls_client_key must be given together")


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    mapped = status_for(exc)
    if mapped is None:
        trace_id = current_trace_id()
        log.error("unhandled error: %s\n%s", exc, traceback.format_exc())
        code, message = grpc.StatusCode.INTERNAL, (
            f"internal error ({type(exc).__name__}); trace id {trace_id or 'n/a'} — see the service log")
    else:
        code, message = mapped
    if isinstance(exc, ServiceError) and exc.trailers:
        context.set_trailing_metadata(exc.trailers)
    await context.abort(code, message)


class _Undecodable:
    """What a request's bytes decode to when they are not a valid message of its type.

    grpc would answer a deserializer's exception with UNKNOWN and a Python exception
    repr; the guards answer INVALID_ARGUMENT naming the method instead."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error

    def refusal(self, method: str) -> ServiceError:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request is not a valid protobuf message ({self.error})")


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except DecodeError as e:
            return _Undecodable(e)
    return decode


async def _checked(requests: AsyncIterator, method: str) -> AsyncIterator:
    """A client stream whose undecodable message ends the call with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.refusal(method)
        yield request


def _guard_unary(inner, method: str):
    async def handler(request, context):
        try:
            if isinstance(request, _Undecodable):
                raise request.refusal(method)
            return await inner(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort_with(context, e)
    return handler


def _guard_client_stream(inner, method: str):
    async def handler(request_iterator, context):
        try:
            return await inner(_checked(request_iterator, method), context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort_with(context, e)
    return handler


def _guard_stream(inner, method: str, client_streaming: bool):
    """For server-streaming and bidi handlers alike: both are async generators."""
    async def handler(request_or_iterator, context) -> AsyncIterator:
        try:
            if client_streaming:
                request_or_iterator = _checked(request_or_iterator, method)
            elif isinstance(request_or_iterator, _Undecodable):
                raise request_or_iterator.refusal(method)
            async for item in inner(request_or_iterator, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await _abort_with(context, e)
    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions escaping a handler into a status with a clear message."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        io = (_tolerant(handler.request_deserializer), handler.response_serializer)
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_guard_unary(handler.unary_unary, method), *io)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_guard_stream(handler.unary_stream, method, False), *io)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_guard_client_stream(handler.stream_unary, method), *io)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_guard_stream(handler.stream_stream, method, True), *io)
        return handler


LIVENESS = "liveness"
"""Health service name that stays SERVING while the process runs (liveness probes)."""

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
"""The stable reflection service (current grpcurl and Postman ask for it first)."""


def _register_reflection_v1_descriptor() -> None:
    """Put grpc/reflection/v1/reflection.proto in the default pool, so that reflection can
    describe its own v1 service. grpcio-reflection ships only v1alpha; v1 is the same
    file under another package (identical messages and field numbers)."""
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass  # not registered yet: build it below
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for service in file.service:
        for method in service.method:
            for field in ("input_type", "output_type"):
                setattr(method, field, getattr(method, field).replace(".grpc.reflection.v1alpha.",
                                                                      ".grpc.reflection.v1."))
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    file.options.Clear()
    pool.Add(file)


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Serve reflection as both grpc.reflection.v1 and v1alpha over the same servicer.

    The two protocols are wire-identical, so the v1 method decodes its messages with the
    v1alpha classes; only the service name differs.
    """
    _register_reflection_v1_descriptor()
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    for service in (reflection.SERVICE_NAME, REFLECTION_V1):
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))


class GrpcServer:
    """One service's server. ``register`` adds servicers and returns their full names.

    An ``internal`` server (every one but the gateway's public port) refuses calls without
    the mesh secret when the config names an ``internal_secret_file``. Ports are exclusive
    (a second server on a taken port fails to start) unless ``reuse_port``: the gateway's
    worker processes share theirs (``llmesh.gateway.workers``).
    """

    def __init__(self, name: str, config: ServiceConfig,
                 register: Callable[[grpc.aio.Server], list[str]],
                 on_shutdown: Callable[[], Awaitable[None]] | None = None, *, internal: bool = True,
                 reuse_port: bool = False) -> None:
        setup_tracing(f"llmesh-{name}")
        self.name, self.config, self._on_shutdown = name, config, on_shutdown
        secret = secret_of(config) if internal else None
        credential = [CredentialInterceptor(name, secret)] if secret else []
        self.server = grpc.aio.server(
            interceptors=[*server_interceptors(), RpcOutcomeInterceptor(), *credential, ErrorInterceptor()],
            options=[("grpc.so_reuseport", int(reuse_port)), ("grpc.max_receive_message_length", 64 << 20)],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = register(self.server)
        enable_reflection([*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name],
                          self.server)
        creds = server_credentials(config)
        bind = f"{config.host}:{config.port}"
        self.port = (self.server.add_secure_port(bind, creds) if creds is not None
                     else self.server.add_insecure_port(bind))
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        self.health_server: grpc.aio.Server | None = None
        if config.health_port:
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            if self.health_server.add_insecure_port(f"{config.host}:{config.health_port}") == 0:
                raise OSError(f"{name}: cannot listen on health_port {config.host}:{config.health_port}")
        self._stopping = asyncio.Event()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        """Overall and per-service health ('' is the whole server)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def start(self) -> None:
        if self.config.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(self.config.metrics_port, addr=self.config.host)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(True)
        log.info("serving", extra={"service": self.name, "address": self.address,
                                   "metrics_port": self.config.metrics_port})

    async def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        await self.health.enter_graceful_shutdown()
        log.info("shutting down", extra={"grace_period_s": self.config.grace_period_s})
        await self.server.stop(self.config.grace_period_s)
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self._on_shutdown is not None:
            await self._on_shutdown()
        shutdown_tracing()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        stopping: list[asyncio.Future] = []

        def on_signal() -> None:
            if not stopping:
                stopping.append(asyncio.ensure_future(self.stop()))

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await self.start()
        print(f"LLMESH_READY {self.name} {self.address}", flush=True)
        await self.server.wait_for_termination()
        # The server stops before stop() has run its cleanup (on_shutdown, span flush):
        # wait for it, or the loop closes and cancels it half-way.
        if stopping:
            await stopping[0]


def run_async(main: Callable[[], Awaitable[None]]) -> None:
    """Run a service's main coroutine on uvloop (asyncio's loop when uvloop is missing)."""
    arm_from_env()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    uvloop.run(main())
