"""The router's health monitor against a real gRPC health server whose answers can be slowed.

A refused connection or NOT_SERVING takes a replica out of its pool at the first check; a
check that passes its deadline does so only after ``health_check_misses`` in a row, and a
timely answer in between starts the count again."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.models_file import ModelsFile, ModelSpec
from llmesh.router.replicas import EngineInfo, Fleet

MODEL = "tiny"
TIMEOUT_S = 0.2


class SlowHealth(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.delay_s = 0.0
        self.status = health_pb2.HealthCheckResponse.SERVING

    async def Check(self, request, context):
        await asyncio.sleep(self.delay_s)
        return health_pb2.HealthCheckResponse(status=self.status)


async def _with_fleet(scenario, misses: int) -> None:
    server = grpc.aio.server()
    health = SlowHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    fleet = Fleet(ModelsFile(models=[ModelSpec(MODEL, "x", addresses=[address])], default_model=MODEL),
                  health_check_interval_s=10, health_check_timeout_s=TIMEOUT_S, load_poll_interval_s=10,
                  health_check_misses=misses)
    replica = fleet.pools[MODEL].replicas[0]
    replica.healthy = True  # as after its first check (Info comes from an engine, not this server)
    replica.info = EngineInfo(MODEL, f"{MODEL}@{address}", block_size=16, max_model_len=512,
                              kv_blocks_total=10, epoch=1)
    try:
        await asyncio.wait_for(scenario(fleet, replica, health, server), 30)
    finally:
        await server.stop(0)
        await replica.close()


def test_slow_checks_take_a_replica_out_only_after_the_allowed_misses():
    async def scenario(fleet, replica, health, _server):
        health.delay_s = TIMEOUT_S * 3
        await fleet._refresh(replica)
        assert replica.healthy, "one late answer must not empty the pool"
        health.delay_s = 0.0
        await fleet._refresh(replica)  # a timely answer: the count starts again
        health.delay_s = TIMEOUT_S * 3
        await fleet._refresh(replica)
        assert replica.healthy and replica.misses == 1
        await fleet._refresh(replica)
        assert not replica.healthy and "DEADLINE_EXCEEDED" in replica.last_error
        assert fleet.pools[MODEL].healthy() == []

    asyncio.run(_with_fleet(scenario, misses=2))


def test_not_serving_and_refused_connections_take_a_replica_out_at_once():
    async def scenario(fleet, replica, health, server):
        health.status = health_pb2.HealthCheckResponse.NOT_SERVING
        await fleet._refresh(replica)
        assert not replica.healthy and replica.last_error == "health: NOT_SERVING"

        replica.healthy = True
        await server.stop(0)
        await fleet._refresh(replica)
        assert not replica.healthy and "UNAVAILABLE" in replica.last_error

    asyncio.run(_with_fleet(scenario, misses=3))
