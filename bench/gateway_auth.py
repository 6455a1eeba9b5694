"""What an API key check costs a request on the gateway, with and without its record cache.

``KeyAuthenticator.authenticate`` against a real ``redis-server`` on loopback (the tests'
throwaway one, no persistence), in-process, one call at a time: with ``key_cache_s`` 0 every call reads the
key's record from Redis; with the gateway's default (0.5 s) the record read by the first call
is reused. The two settings alternate (A B A B) so drift hits both. Metrics:
``auth_uncached_p50_us``, ``auth_cached_p50_us`` (median of each setting's calls, both
rounds pooled) and ``auth_cached_speedup_x``. Writes bench/results/gateway_auth_<device>.json.

    python bench/gateway_auth.py [--calls 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: tests.* helpers

from llmesh.bench_results import write_result  # noqa: E402
from llmesh.gateway.auth import KeyAuthenticator  # noqa: E402
from llmesh.gateway.config import GatewayConfig  # noqa: E402
from llmesh.gateway.keys import REDIS_PREFIX, new_key  # noqa: E402
from llmesh.gateway.ratelimit import RedisGuard  # noqa: E402
from tests.mesh_helpers import RedisServer  # noqa: E402


class _Metadata:
    """The one piece of a gRPC context the authenticator reads."""

    def __init__(self, key: str) -> None:
        self._md = (("authorization", f"Bearer {key}"),)

    def invocation_metadata(self):
        return self._md


async def _measure(url: str, calls: int, rounds: int, cached_s: float) -> dict[str, list[float]]:
    client = aioredis.Redis.from_url(url)
    key, record = new_key("bench")
    await client.hset(REDIS_PREFIX + record.key_id, mapping=record.to_redis())
    times: dict[str, list[float]] = {"uncached": [], "cached": []}
    try:
        for _ in range(rounds):
            for name, cache_s in (("uncached", 0.0), ("cached", cached_s)):
                auth = KeyAuthenticator(client, None, RedisGuard("closed"), salt_key=b"bench", cache_s=cache_s)
                context = _Metadata(key)
                for _ in range(min(50, calls)):  # warm: connection pool, first read
                    await auth.authenticate(context)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    await auth.authenticate(context)
                    times[name].append(time.perf_counter() - t0)
    finally:
        await client.aclose()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=500, help="timed calls per setting and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args()
    cached_s = GatewayConfig.__dataclass_fields__["key_cache_s"].default
    with RedisServer() as redis_server:
        times = asyncio.run(_measure(redis_server.url, args.calls, args.rounds, cached_s))
    uncached = 1e6 * statistics.median(times["uncached"])
    cached = 1e6 * statistics.median(times["cached"])
    metrics = {"auth_uncached_p50_us": uncached, "auth_cached_p50_us": cached,
               "auth_cached_speedup_x": uncached / cached}
    for k, v in metrics.items():
        print(f"{k:>24}: {v:10.2f}")
    workload = {"calls_per_round": args.calls, "rounds": args.rounds, "key_cache_s": [0.0, cached_s],
                "redis": "redis-server on loopback, no persistence", "order": "uncached, cached per round"}
    results_dir = None if args.results_dir is None else Path(args.results_dir)
    print("wrote", write_result("gateway_auth_cpu", workload, metrics, results_dir=results_dir))


if __name__ == "__main__":
    main()
