"""Request ids per API key: the client's id is the client's, the engine's id is the mesh's.

A client's ``request_id`` names its request in responses, usage lines and its own logs;
it is unique per API key only, so two tenants may both send ``req-1`` at once. Below the
gateway each request runs under an engine request id made here (the key's id and a random
nonce), which never collides across keys and says nothing about other tenants' ids. A
key that reuses one of its own live ids is refused with ALREADY_EXISTS before any engine
work. The live set is this gateway process's (with several gateways behind a load
balancer, one key's duplicates are caught when they reach the same gateway; the engine
ids stay distinct regardless).
"""

from __future__ import annotations

import dataclasses
import uuid

import grpc

from llmesh.errors import ServiceError

ANONYMOUS_KEY = "anon"
"""Stands for the key id of calls without API keys (auth off)."""


@dataclasses.dataclass(frozen=True)
class RequestIds:
    """The two ids of one request."""

    client: str
    """What the client sent (or a fresh uuid when it sent none); what responses carry."""
    engine: str
    """What router and engines see: unique across keys and across reuses of ``client``."""


class LiveRequestIds:
    """The client request ids of the streams in flight, per API key."""

    def __init__(self) -> None:
        self._live: set[tuple[str, str]] = set()

    def claim(self, key_id: str, client_id: str) -> RequestIds:
        """The ids of a new request; ALREADY_EXISTS while the same key has ``client_id`` in flight.
        Call ``release`` with the result once the stream ends."""
        client_id = client_id or uuid.uuid4().hex
        slot = (key_id, client_id)
        if slot in self._live:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id {client_id!r} is already used by a live request of this API key; "
                               "send a request_id that is unique among your requests in flight (or none, "
                               "and the gateway picks one)")
        self._live.add(slot)
        return RequestIds(client_id, f"{key_id or ANONYMOUS_KEY}-{uuid.uuid4().hex}")

    def release(self, key_id: str, ids: RequestIds) -> None:
        self._live.discard((key_id, ids.client))

    def __len__(self) -> int:
        return len(self._live)
