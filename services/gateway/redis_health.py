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

log = logging.getLogger("llmesh.gateway.redis_health")


async def redis_health_loop(client, interval_s: float,
                            set_serving: Callable[[bool], Awaitable[None]]) -> None:
    """PING every ``interval_s``; on each change, set the server's health."""
    up = True
    while True:
        try:
            await client.ping()
            ok = True
        except (RedisError, OSError, asyncio.TimeoutError):
            ok = False
        metrics.REDIS_UP.set(1 if ok else 0)
        if not ok:
            # Every time, not only on the change: the server's own start may set SERVING
            # after this loop's first probe.
            await set_serving(False)
        elif not up:
            await set_serving(True)
        if ok != up:
            up = ok
            if ok:
                log.warning("redis reachable again: SERVING")
            else:
                log.warning("redis unreachable: NOT_SERVING until it answers (API keys live there)")
        await asyncio.sleep(interval_s)
