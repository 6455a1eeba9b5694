"""API-key authentication: ``authorization: Bearer llm_<id>_<secret>`` metadata → Caller.

The record is looked up by the key's id (Redis first, then the keys file); a record read from
Redis is reused for ``key_cache_s`` (0.5 s by default: a round trip off each request's path),
so a revocation reaches every gateway within that. When Redis cannot be reached,
fail-closed refuses with UNAVAILABLE; fail-open accepts keys verified before the outage
(their last known record). The key never appears in a message or a log line. A caller's
prefix-cache salt is keyed by the mesh secret (``llmesh.mesh_secret.cache_salt``), never
the tenant's name itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from llmesh.errors import ServiceError
from llmesh.gateway import metrics
from llmesh.gateway.caller import CallContext, Caller
from llmesh.gateway.keys import REDIS_PREFIX, KeyFormatError, KeyRecord, KeysFile, matches, parse_key
from llmesh.gateway.ratelimit import RedisGuard
from llmesh.mesh_secret import cache_salt

MAX_KNOWN_KEYS = 100_000
"""Key records kept in memory (for reuse within ``cache_s`` and for fail-open)."""

MAX_AUTH_HEADER = 512
"""Longer authorization values are refused before any parsing (a key is ~60 bytes)."""


def _unauthenticated(reason: str, message: str) -> ServiceError:
    metrics.AUTH_FAILURES.labels(reason).inc()
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


class KeyAuthenticator:
    def __init__(self, redis_client: aioredis.Redis | None, keys_file: KeysFile | None, guard: RedisGuard,
                 pepper: str = "", *, salt_key: bytes, cache_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``salt_key`` keys the tenants' cache salts (the mesh secret). ``cache_s``: how long
        a record read from Redis is reused (0: read on every call)."""
        self._redis = redis_client
        self._salt_key = salt_key
        self._file = keys_file
        self._guard = guard
        self._pepper = pepper
        self._cache_s = cache_s
        self._clock = clock
        self._known: dict[str, KeyRecord] = {}
        self._read_at: dict[str, float] = {}
        """When each record of ``_known`` was read from Redis (monotonic seconds)."""

    async def authenticate(self, context: CallContext) -> Caller:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if not values:
            raise _unauthenticated("missing", "missing API key: send metadata 'authorization: Bearer <key>' "
                                              "(set LLMESH_API_KEY; create one with `llmesh keys create`)")
        if len(values) > 1:
            raise _unauthenticated("malformed", "send exactly one 'authorization' metadata entry")
        value = values[0]
        if isinstance(value, bytes) or len(value) > MAX_AUTH_HEADER:
            raise _unauthenticated("malformed", "the 'authorization' metadata is malformed: expected "
                                                "'Bearer <key>'")
        scheme, _, key = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthenticated("malformed", "the 'authorization' metadata must use the Bearer scheme: "
                                                "'Bearer <key>'")
        try:
            key_id, _ = parse_key(key.strip())
        except KeyFormatError as e:
            raise _unauthenticated("malformed", str(e)) from None
        record = await self._lookup(key_id)
        if record is None or not matches(record, key.strip(), self._pepper):
            raise _unauthenticated("invalid", "invalid API key (unknown or wrong secret)")
        if record.revoked:
            raise _unauthenticated("revoked", f"API key {key_id} has been revoked")
        return Caller(key_id=record.key_id, tenant=record.tenant, tier=record.tier,
                      allowed_models=None if record.models is None else frozenset(record.models),
                      cache_salt=cache_salt(self._salt_key, record.tenant), rpm=record.rpm, tpm=record.tpm,
                      concurrency=record.concurrency, response_cache=record.response_cache)

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        if self._redis is not None:
            read_at = self._read_at.get(key_id)
            if read_at is not None and not self._guard.down and self._clock() - read_at < self._cache_s:
                return self._known[key_id]
            try:
                data = await self._redis.hgetall(REDIS_PREFIX + key_id)
            except (RedisError, OSError, asyncio.TimeoutError) as e:
                self._guard.failed("auth", e)
                if self._guard.mode == "open" and key_id in self._known:
                    return self._known[key_id]
                file_record = self._file.get(key_id) if self._file else None
                if file_record is not None:
                    return file_record
                raise self._guard.refuse("API keys") from None
            self._guard.ok()
            if data:
                record = KeyRecord.from_redis(data)
                if len(self._known) >= MAX_KNOWN_KEYS and key_id not in self._known:
                    self._known.clear()  # bounded: only keys that exist get here, so this is rare
                    self._read_at.clear()
                self._known[key_id] = record
                self._read_at[key_id] = self._clock()
                return record
            self._read_at.pop(key_id, None)  # deleted: never served from the cache
        return self._file.get(key_id) if self._file else None
