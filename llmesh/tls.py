"""TLS for every llmesh server and channel, from the service's config.

One set of fields on ServiceConfig covers both directions of a service:

* ``tls_cert`` / ``tls_key``: this service's certificate and key (PEM). The server
  listens with TLS when they are set, and outgoing channels present them as the client
  identity (mTLS) when the peer asks.
* ``tls_ca``: the CA that signs the peers. Outgoing channels use TLS and verify the
  server against it when it is set; with ``tls_require_client_cert`` the server also
  requires and verifies client certificates against it (mTLS between services).

* ``tls_client_cert`` / ``tls_client_key``: the identity outgoing channels present instead,
  for a service whose own port serves no TLS (the gateway: its public port is API-key
  authenticated, its calls to router and engines are mTLS).

The internal services add ``tls_require_client_cert``. Every channel between services is
made by ``aio_channel``, which also sends the mesh secret (``llmesh.mesh_secret``) when the
config names an ``internal_secret_file``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import grpc

from llmesh.mesh_secret import credential_interceptors, secret_of


class TLSConfig(Protocol):
    tls_cert: str | None
    tls_key: str | None
    tls_ca: str | None
    tls_require_client_cert: bool
    tls_client_cert: str | None
    tls_client_key: str | None
    internal_secret_file: str | None


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path}: {e.strerror}") from None


def server_credentials(cfg: TLSConfig) -> grpc.ServerCredentials | None:
    """Credentials for the listening port; None means plaintext."""
    cert, key = _read(cfg.tls_cert, "TLS certificate"), _read(cfg.tls_key, "TLS key")
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ValueError("tls_cert and tls_key must be given together")
    ca = _read(cfg.tls_ca, "TLS CA") if cfg.tls_require_client_cert else None
    if cfg.tls_require_client_cert and ca is None:
        raise ValueError("tls_require_client_cert needs tls_ca to verify client certificates")
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=cfg.tls_require_client_cert)


def channel_credentials(cfg: TLSConfig) -> grpc.ChannelCredentials | None:
    """Credentials for calls this service makes; None means plaintext (no tls_ca)."""
    ca = _read(cfg.tls_ca, "TLS CA")
    if ca is None:
        return None
    cert_path = cfg.tls_client_cert or cfg.tls_cert
    key_path = cfg.tls_client_key or cfg.tls_key
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=_read(key_path, "TLS key"),
                                        certificate_chain=_read(cert_path, "TLS certificate"))


def aio_channel(address: str, cfg: TLSConfig | None, *, interceptors=(), **kwargs) -> grpc.aio.Channel:
    """An asyncio channel to ``address``: TLS (and mTLS) when ``cfg`` has a CA, sending the
    mesh secret when ``cfg`` has one."""
    creds = channel_credentials(cfg) if cfg is not None else None
    secret = secret_of(cfg) if cfg is not None else None
    interceptors = [*(credential_interceptors(secret) if secret else ()), *interceptors]
    if creds is None:
        return grpc.aio.insecure_channel(address, interceptors=interceptors, **kwargs)
    return grpc.aio.secure_channel(address, creds, interceptors=interceptors, **kwargs)
