"""``python -m llmesh.prefix_cache.main``: the prefix-cache index service."""

from __future__ import annotations

import asyncio

from llmesh.config import load_config
from llmesh.grpc_server import GrpcServer, run_async
from llmesh.logs import setup_logging
from llmesh.redis_health import redis_health_loop
from llmesh.prefix_cache import metrics
from llmesh.prefix_cache.config import PrefixCacheConfig
from llmesh.prefix_cache.index import PrefixIndex
from llmesh.prefix_cache.servicer import PrefixIndexServicer
from llmesh.v1 import prefix_index_pb2, prefix_index_pb2_grpc


async def serve(config: PrefixCacheConfig) -> None:
    index = PrefixIndex.connect(config.redis_url, config.key_prefix, config.heartbeat_ttl_s, config.redis_timeout_s)
    servicer = PrefixIndexServicer(index)
    loops: list[asyncio.Task] = []

    def register(server) -> list[str]:
        prefix_index_pb2_grpc.add_PrefixIndexServicer_to_server(servicer, server)
        return [prefix_index_pb2.DESCRIPTOR.services_by_name["PrefixIndex"].full_name]

    async def on_shutdown() -> None:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await servicer.close()

    server = GrpcServer("prefix-cache", config, register, on_shutdown)
    if config.sweep_interval_s > 0:
        loops.append(asyncio.ensure_future(servicer.sweep_loop(config.sweep_interval_s)))
    loops.append(asyncio.ensure_future(redis_health_loop(
        index.ping, config.redis_check_interval_s, server.set_serving, metrics.REDIS_UP,
        "the index keeps its blocks there", {"redis_url": index.redis_url})))
    await server.run()


def main(argv: list[str] | None = None) -> None:
    config = load_config(PrefixCacheConfig, argv, service="prefix-cache")
    setup_logging("prefix-cache", config.log_level)
    run_async(lambda: serve(config))


if __name__ == "__main__":
    main()
