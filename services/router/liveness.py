"""Is an engine still answering? Streams from one that stopped end instead of hanging.

A frozen engine (SIGSTOPped, swapped out, partitioned away) keeps its TCP connections
open, so a stream from it neither ends nor errors: without a client deadline it would
hang for as long as the engine is frozen. ``Liveness`` records when the engine last
answered a ``grpc.health.v1`` Check (with any status: NOT_SERVING still proves it is
alive, e.g. while it drains); once no check has been answered for ``stall_timeout_s``
it is *frozen* and ``until_frozen`` ends every stream reading from it with
``ReplicaFrozen``. One missed check is not enough, so a briefly overloaded engine keeps
its streams.

The router feeds ``Liveness`` from its per-replica health monitor; the gateway's direct
streams, which bypass the router, run a ``LivenessProbe`` per engine address while
streams use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0


class ReplicaFrozen(Exception):
    """The replica answered no health check for the stall timeout."""


class Liveness:
    def __init__(self, stall_timeout_s: float) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.last_answer = time.monotonic()
        self.last_error = ""
        self.frozen = asyncio.Event()

    def answered(self) -> None:
        self.last_answer = time.monotonic()
        self.last_error = ""
        self.frozen.clear()

    def missed(self, error: str) -> None:
        """A check got no answer (deadline, refused connection)."""
        self.last_error = error
        if time.monotonic() - self.last_answer >= self.stall_timeout_s:
            self.frozen.set()

    @property
    def reason(self) -> str:
        return (f"no health check answered for {time.monotonic() - self.last_answer:.1f}s "
                f"(last: {self.last_error or 'none'})")


async def until_frozen(stream: AsyncIterator[T], liveness: Liveness) -> AsyncIterator[T]:
    """``stream``'s items, ending with ReplicaFrozen when the replica freezes while the
    next item is awaited."""
    it = stream.__aiter__()
    frozen = asyncio.ensure_future(liveness.frozen.wait())
    nxt: asyncio.Future | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            await asyncio.wait((nxt, frozen), return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                raise ReplicaFrozen(liveness.reason)
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield item
    finally:
        frozen.cancel()
        if nxt is not None and not nxt.done():
            nxt.cancel()


async def probe(health: health_pb2_grpc.HealthStub, liveness: Liveness, timeout: float) -> bool:
    """One health Check into ``liveness``; True when it answered SERVING."""
    try:
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        liveness.missed(f"{e.code().name}: {e.details()}")
        return False
    liveness.answered()
    return resp.status == health_pb2.HealthCheckResponse.SERVING


class LivenessProbe:
    """Checks one engine every PROBE_INTERVAL_S while at least one stream holds it."""

    def __init__(self, health: health_pb2_grpc.HealthStub, stall_timeout_s: float) -> None:
        self._health = health
        self.liveness = Liveness(stall_timeout_s)
        self._users = 0
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[Liveness]:
        self._users += 1
        if self._task is None:
            # A probe idle since its last stream starts over: its old answers prove nothing now.
            self.liveness.answered()
            self._task = asyncio.ensure_future(self._run())
        try:
            yield self.liveness
        finally:
            self._users -= 1
            if self._users == 0 and self._task is not None:
                self._task.cancel()
                self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            await probe(self._health, self.liveness, PROBE_TIMEOUT_S)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
