"""Tenant-scoped bytes in Redis with a TTL, where every call is bounded and none raises.

A cache is an optimisation: a Redis that is down, slow or full must never fail or stall
the request that asked it. Each call waits at most ``timeout_s`` (lookups sit on the
request's path to its first token); a failure is returned as an error string, counted by
the caller and logged once per outage, and for ``retry_after_s`` afterwards calls are
answered "unavailable" at once without touching Redis, so an outage costs each request
nothing rather than one timeout each.

Keys are ``<prefix><tenant>:<digest>``: the tenant (URL-quoted, ``-`` for the anonymous
caller) is in the name so that one tenant's entries can be listed or dropped with one
SCAN pattern, and the digest (keyed by the tenant too, see ``key``) keeps tenants apart
even for a reader of the raw keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import quote

from redis.exceptions import RedisError

log = logging.getLogger("llmesh.gateway.response_cache")

_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


@dataclasses.dataclass(frozen=True)
class Got:
    """The outcome of one lookup: the value (None: not stored), or why Redis did not answer."""

    value: bytes | None = None
    error: str = ""


@dataclasses.dataclass(frozen=True)
class GotMany:
    """The outcome of one batched lookup: a value or None per digest, in order (empty when
    Redis did not answer: ``error`` says why)."""

    values: tuple[bytes | None, ...] = ()
    error: str = ""


class TenantStore:
    def __init__(self, client, prefix: str, timeout_s: float, *, store_timeout_s: float | None = None,
                 retry_after_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        """``store_timeout_s`` bounds writes (off the request's path: default the larger of
        ``timeout_s`` and 0.5 s); ``retry_after_s`` is the pause after a failure."""
        self._redis = client
        self._prefix = prefix
        self._timeout = timeout_s
        self._store_timeout = store_timeout_s if store_timeout_s is not None else max(timeout_s, 0.5)
        self._retry_after = retry_after_s
        self._clock = clock
        self._paused_until = 0.0
        self._down = False

    def redis_key(self, tenant: str, digest: str) -> str:
        return f"{self._prefix}{quote(tenant, safe='') or '-'}:{digest}"

    async def get(self, tenant: str, digest: str) -> Got:
        if self._paused():
            return Got(error="unavailable (paused after a failure)")
        try:
            # asyncio.timeout, not wait_for: no extra task on the path to a hit's first token.
            async with asyncio.timeout(self._timeout):
                value = await self._redis.get(self.redis_key(tenant, digest))
        except _FAILURES as e:
            return Got(error=self._failed("lookup", e))
        self._ok()
        return Got(value=value)

    async def get_many(self, tenant: str, digests: Sequence[str]) -> GotMany:
        """Every digest's value in one round trip (MGET), within the same bound as ``get``."""
        if self._paused():
            return GotMany(error="unavailable (paused after a failure)")
        try:
            async with asyncio.timeout(self._timeout):
                values = await self._redis.mget([self.redis_key(tenant, d) for d in digests])
        except _FAILURES as e:
            return GotMany(error=self._failed("lookup", e))
        self._ok()
        return GotMany(values=tuple(values))

    async def put(self, tenant: str, digest: str, value: bytes, ttl_s: float) -> str:
        """Store ``value`` for ``ttl_s`` seconds; returns "" or why it was not stored."""
        return await self.put_many(tenant, [(digest, value)], ttl_s)

    async def put_many(self, tenant: str, items: Sequence[tuple[str, bytes]], ttl_s: float) -> str:
        """Store each (digest, value) for ``ttl_s`` seconds in one round trip (a pipeline of
        SETs, not a transaction: an entry is whole on its own); returns "" or why not."""
        if self._paused():
            return "unavailable (paused after a failure)"
        ttl_ms = max(1, round(ttl_s * 1000))
        try:
            async with asyncio.timeout(self._store_timeout):
                if len(items) == 1:
                    (digest, value), = items
                    await self._redis.set(self.redis_key(tenant, digest), value, px=ttl_ms)
                else:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for digest, value in items:
                            pipe.set(self.redis_key(tenant, digest), value, px=ttl_ms)
                        await pipe.execute()
        except _FAILURES as e:
            return self._failed("store", e)
        self._ok()
        return ""

    def _paused(self) -> bool:
        return self._clock() < self._paused_until

    def _failed(self, op: str, exc: BaseException) -> str:
        why = f"timed out after {self._timeout if op == 'lookup' else self._store_timeout:g} s" \
            if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
        self._paused_until = self._clock() + self._retry_after
        if not self._down:
            log.warning("response cache: redis failed; requests go to the engines until it answers",
                        extra={"op": op, "error": why})
        self._down = True
        return why

    def _ok(self) -> None:
        if self._down:
            log.warning("response cache: redis answers again")
        self._down = False


async def configure_lru(client, max_memory_bytes: int) -> None:
    """Bound a dedicated cache Redis by LRU eviction: Redis itself drops the least recently
    used entries past ``max_memory_bytes``. Refused CONFIG (a managed Redis) is logged: such
    a Redis is configured by its operator."""
    try:
        await client.config_set("maxmemory", str(max_memory_bytes))
        await client.config_set("maxmemory-policy", "allkeys-lru")
    except _FAILURES as e:
        log.warning("response cache: could not set maxmemory/allkeys-lru on its redis; configure it there",
                    extra={"error": f"{type(e).__name__}: {e}"})


async def evictions_loop(client, interval_s: float, on_evicted: Callable[[int], None]) -> None:
    """Read INFO stats every ``interval_s`` and report each increase of evicted_keys (a
    Redis restart resets it: the new count is then taken as it is)."""
    last: int | None = None
    while True:
        try:
            stats = await asyncio.wait_for(client.info("stats"), max(interval_s, 1.0))
            now = int(stats.get("evicted_keys", 0))
        except _FAILURES:
            now = None
        if now is not None:
            if last is not None and now != last:
                on_evicted(now - last if now > last else now)
            last = now
        await asyncio.sleep(interval_s)
