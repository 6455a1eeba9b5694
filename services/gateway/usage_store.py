"""Usage per key and model, kept in Redis for ``llmesh usage``.

One hash per (key id, model) with running totals: requests, prompt, cached and completion
tokens, and the requests answered from the response cache (``cached_responses``: counted as
requests, their tokens not, as no engine spent them). Written after each stream ends; a Redis outage loses those increments (counted in
the Redis error metric) rather than failing requests that already ran.
"""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError

from llmesh.gateway.ratelimit import RedisGuard

USAGE_PREFIX = "llmesh:usage:"
FIELDS = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cached_responses")


class UsageStore:
    def __init__(self, client, guard: RedisGuard) -> None:
        self._redis = client
        self._guard = guard

    async def add(self, key_id: str, tenant: str, model: str, prompt: int, cached: int, completion: int,
                  cached_response: bool = False) -> None:
        name = f"{USAGE_PREFIX}{key_id or '-'}:{model or 'unknown'}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(name, "requests", 1)
                if cached_response:
                    pipe.hincrby(name, "cached_responses", 1)
                else:
                    pipe.hincrby(name, "prompt_tokens", prompt)
                    pipe.hincrby(name, "cached_tokens", cached)
                    pipe.hincrby(name, "completion_tokens", completion)
                pipe.hset(name, "tenant", tenant)
                await pipe.execute()
        except (RedisError, OSError, asyncio.TimeoutError) as e:
            self._guard.failed("usage", e)


def read_usage(client) -> list[dict]:
    """Every usage row (synchronous client): key_id, model, tenant and the totals."""
    rows = []
    for name in client.scan_iter(USAGE_PREFIX + "*"):
        name = name.decode() if isinstance(name, bytes) else name
        key_id, _, model = name[len(USAGE_PREFIX):].partition(":")
        data = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                for k, v in client.hgetall(name).items()}
        rows.append({"key_id": key_id, "model": model, "tenant": data.get("tenant", ""),
                     **{f: int(data.get(f, 0)) for f in FIELDS}})
    return sorted(rows, key=lambda r: (r["tenant"], r["key_id"], r["model"]))
