"""The gateway's health follows its Redis when API keys live there.

With auth on and keys only in Redis, a gateway that cannot reach Redis refuses every call
(fail-closed) or cannot check any key; either way load balancers and ``llmesh health``
should send traffic elsewhere, so the gateway reports NOT_SERVING (grpc.health.v1) until
Redis answers again, then SERVING, without a restart. redis-py's pool drops a broken
connection and dials anew on the next command, so the same client serves again as soon
as Redis is back (scripts are re-sent on NOSCRIPT by redis-py's Script).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from llmesh.gateway import metrics
from llmesh.gateway.ratelimit import RedisGuard

log = logging.getLogger("llmesh.gateway.redis_health")


async def redis_health_loop(client, guard: RedisGuard, interval_s: float,
                            set_serving: Callable[[bool], Awaitable[None]]) -> None:
    """PING every ``interval_s``; on each change, set the server's health."""
    up = True
    while True:
        try:
            await client.ping()
            ok = True
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            ok = False
            guard.failed("health", e)
        if ok:
            guard.ok()
        metrics.REDIS_UP.set(1 if ok else 0)
        if ok != up:
            up = ok
            await set_serving(ok)
            if ok:
                log.warning("redis reachable again: SERVING")
            else:
                log.warning("redis unreachable: NOT_SERVING until it answers (API keys live there)")
        await asyncio.sleep(interval_s)
