"""The mesh secret: the credential services present to each other, and the key of tenants'
prefix-cache salts.

One random secret per mesh, in a file readable by the services only (``llmesh up``
writes a fresh one at each start; ``llmesh certs`` writes one next to the certificates
for compose and Kubernetes). A service finds it through its ``internal_secret_file``
option, never on a command line nor in a log line.

* Internal servers (router, engines, prefix-cache index) install ``CredentialInterceptor``:
  a call without metadata ``llmesh-service-credential: <secret>`` is refused with
  UNAUTHENTICATED, compared in constant time. grpc.health.v1 and reflection stay open, so
  probes and grpcurl's ``list`` work without it.
* Every internal client sends it: ``llmesh.tls.aio_channel``, through which every channel
  between services is made, adds ``credential_interceptors`` to the channel.
* The gateway salts each tenant's prefix cache with ``cache_salt`` = HMAC-SHA256 of the
  tenant under the secret, so a caller who knows a tenant's name cannot name its cache.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "llmesh-service-credential"
MESH_SECRET_FILE = "mesh.secret"
"""Its name in a run folder (``llmesh up``) or a certificates folder (``llmesh certs``)."""
MIN_SECRET_CHARS = 32
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                 "grpc.reflection.v1alpha.ServerReflection")
"""Answered without the credential: liveness probes and service discovery reveal nothing."""
_SALT_DOMAIN = b"llmesh cache salt v1\x00"
"""Keeps the salt key apart from any other use of the secret."""


class MeshSecretError(ValueError):
    """The secret file is missing, unreadable or too short."""


def write_secret(path: str | Path) -> Path:
    """A fresh random secret in ``path`` (created owner-only, replaced atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    os.replace(tmp, p)
    return p


def read_secret(path: str | Path) -> bytes:
    """The secret in ``path`` (surrounding whitespace removed)."""
    try:
        value = Path(path).read_bytes().strip()
    except OSError as e:
        raise MeshSecretError(f"cannot read the mesh secret file {path}: {e.strerror}") from None
    if len(value) < MIN_SECRET_CHARS:
        raise MeshSecretError(f"the mesh secret in {path} has {len(value)} characters, fewer than "
                              f"{MIN_SECRET_CHARS}; write one with `llmesh certs` (or let `llmesh up` make it)")
    return value


def secret_of(cfg) -> bytes | None:
    """The secret named by a service config's ``internal_secret_file``; None when unset."""
    path = cfg.internal_secret_file
    return read_secret(path) if path else None


def _digest(value: bytes) -> bytes:
    # Comparing digests keeps compare_digest's time independent of the presented length too.
    return hashlib.sha256(value).digest()


def cache_salt(secret: bytes, tenant: str) -> str:
    """The prefix-cache salt of ``tenant``: HMAC-SHA256(secret, tenant), hex; '' for no tenant
    (the anonymous caller shares one unsalted cache)."""
    if not tenant:
        return ""
    return hmac.new(secret, _SALT_DOMAIN + tenant.encode("utf-8"), hashlib.sha256).hexdigest()


# ---- server side -----------------------------------------------------------------------
def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that refuses the call."""
    io = (handler.request_deserializer, handler.response_serializer)

    async def refuse_unary(request, context):
        await context.abort(code, message)

    async def refuse_stream(request, context):
        await context.abort(code, message)
        yield  # an async generator, as streaming handlers are

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse_unary, *io)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, *io)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse_unary, *io)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, *io)


class CredentialInterceptor(grpc.aio.ServerInterceptor):
    """Refuses internal calls that do not carry the mesh secret."""

    def __init__(self, service: str, secret: bytes) -> None:
        self._service = service
        self._expected = _digest(secret)

    def _check(self, metadata: Sequence | None) -> str | None:
        """Why the call is refused, or None when it carries the secret."""
        values = [v for k, v in (metadata or ()) if k == METADATA_KEY]
        if not values:
            return "no service credential"
        presented = values[0].encode() if isinstance(values[0], str) else values[0]
        if len(values) > 1 or not hmac.compare_digest(_digest(presented), self._expected):
            return "a wrong service credential"
        return None

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.lstrip("/").split("/", 1)[0] in OPEN_SERVICES:
            return handler
        why = self._check(handler_call_details.invocation_metadata)
        if why is None:
            return handler
        log.warning("refused an internal call", extra={"method": method, "reason": why})
        return _denied(handler, grpc.StatusCode.UNAUTHENTICATED,
                       f"{self._service}: {method} is an internal call and came with {why}; this service "
                       f"expects the mesh secret in metadata '{METADATA_KEY}' (services send it from "
                       "their internal_secret_file)")


# ---- client side -----------------------------------------------------------------------
def _with_credential(details: grpc.aio.ClientCallDetails, value: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[METADATA_KEY] = value
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


class _SendCredential:
    def __init__(self, secret: bytes) -> None:
        self._value = secret.decode()


# grpc.aio files an interceptor under the first call kind it derives from, so each kind
# needs its own object.
class _UnaryUnary(_SendCredential, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_credential(details, self._value), request)


class _UnaryStream(_SendCredential, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_credential(details, self._value), request)


class _StreamUnary(_SendCredential, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_credential(details, self._value), request_iterator)


class _StreamStream(_SendCredential, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_credential(details, self._value), request_iterator)


def credential_interceptors(secret: bytes) -> list:
    """Client interceptors sending ``secret`` on every call of a channel, of every call kind."""
    return [kind(secret) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
