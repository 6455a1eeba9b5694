"""A service's health follows its Redis when it cannot work without it.

The gateway with auth on and keys only in Redis refuses every call (fail-closed) or cannot
check any key while Redis is away; the prefix-cache index keeps its blocks there. Either
way load balancers and ``llmesh health`` should send traffic elsewhere, so the service
reports NOT_SERVING (grpc.health.v1) until Redis answers again, then SERVING, without a
restart. redis-py's pool drops a broken connection and dials anew on the next command, so
the same client serves again as soon as Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge
from redis.exceptions import RedisError

log = logging.getLogger("llmesh.redis_health")


def pinger(client) -> Callable[[], Awaitable[bool]]:
    """A redis-py asyncio client's PING as True/False."""
    async def ping() -> bool:
        try:
            await client.ping()
            return True
        except (RedisError, OSError, asyncio.TimeoutError):
            return False
    return ping


async def redis_health_loop(ping: Callable[[], Awaitable[bool]], interval_s: float,
                            set_serving: Callable[[bool], Awaitable[None]], gauge: Gauge,
                            why: str, log_extra: dict | None = None) -> None:
    """PING every ``interval_s``; report NOT_SERVING while it fails, SERVING when it answers.
    ``why`` says what the service needs Redis for (logged)."""
    up = True
    while True:
        ok = await ping()
        gauge.set(1 if ok else 0)
        if not ok:
            # Every time, not only on the change: the server's own start may set SERVING
            # after this loop's first probe.
            await set_serving(False)
        elif not up:
            await set_serving(True)
        if ok != up:
            up = ok
            if ok:
                log.warning("redis reachable again: SERVING", extra=log_extra)
            else:
                log.warning(f"redis unreachable: NOT_SERVING until it answers ({why})", extra=log_extra)
        await asyncio.sleep(interval_s)
