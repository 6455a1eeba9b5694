"""The gateway reuses an API key's record read from a real Redis for ``key_cache_s``: no
round trip within it, a revocation or a deleted key seen once it has passed."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio as aioredis

from llmesh.errors import ServiceError
from llmesh.gateway.auth import KeyAuthenticator
from llmesh.gateway.keys import REDIS_PREFIX, new_key
from llmesh.gateway.ratelimit import RedisGuard
from tests.mesh_helpers import RedisServer


class _Context:
    def __init__(self, key: str) -> None:
        self._md = (("authorization", f"Bearer {key}"),)

    def invocation_metadata(self):
        return self._md


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _run(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    key, record = new_key("acme", rpm=5)
    await client.hset(REDIS_PREFIX + record.key_id, mapping=record.to_redis())
    clock = _Clock()
    auth = KeyAuthenticator(client, None, RedisGuard("closed"), salt_key=b"s", cache_s=0.5, clock=clock)
    reads = []
    real_hgetall = client.hgetall

    async def counting_hgetall(name):
        reads.append(name)
        return await real_hgetall(name)

    client.hgetall = counting_hgetall
    assert (await auth.authenticate(_Context(key))).rpm == 5
    assert (await auth.authenticate(_Context(key))).tenant == "acme"
    assert len(reads) == 1  # the second call reused the record
    with pytest.raises(ServiceError) as bad:  # the secret is still checked against the reused record
        await auth.authenticate(_Context(key[:-4] + "AAAA"))
    assert bad.value.code == grpc.StatusCode.UNAUTHENTICATED and len(reads) == 1

    await client.hset(REDIS_PREFIX + record.key_id, "revoked", "1")
    clock.now += 0.4
    await auth.authenticate(_Context(key))  # within key_cache_s: not read again
    clock.now += 0.2
    with pytest.raises(ServiceError) as revoked:
        await auth.authenticate(_Context(key))
    assert "revoked" in revoked.value.message and len(reads) == 2

    await client.delete(REDIS_PREFIX + record.key_id)
    clock.now += 1.0
    for _ in range(2):  # gone from Redis: refused, and read again each time
        with pytest.raises(ServiceError):
            await auth.authenticate(_Context(key))
    assert len(reads) == 4

    guard = RedisGuard("closed")
    guarded = KeyAuthenticator(client, None, guard, salt_key=b"s", cache_s=0.5, clock=clock)
    key3, record3 = new_key("third")
    await client.hset(REDIS_PREFIX + record3.key_id, mapping=record3.to_redis())
    await guarded.authenticate(_Context(key3))
    before = len(reads)
    guard.observed(False)  # the health check found Redis down: the record is read again (and would fail)
    await guarded.authenticate(_Context(key3))
    assert len(reads) == before + 1 and not guard.down  # the read answered: up again
    await guarded.authenticate(_Context(key3))
    assert len(reads) == before + 1

    uncached = KeyAuthenticator(client, None, RedisGuard("closed"), salt_key=b"s", cache_s=0.0, clock=clock)
    key2, record2 = new_key("other")
    await client.hset(REDIS_PREFIX + record2.key_id, mapping=record2.to_redis())
    uncached_reads = len(reads)
    for _ in range(3):
        await uncached.authenticate(_Context(key2))
    assert len(reads) == uncached_reads + 3  # 0: read on every call
    await client.aclose()


def test_key_records_are_reused_for_key_cache_s():
    with RedisServer() as server:
        asyncio.run(_run(server.url))
