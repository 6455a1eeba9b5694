"""Replica choice against a real prefix-cache index (real Redis, real index process).

The replicas' health, Info and Load are set directly: the picker only reads them, and
the full mesh test covers where they come from."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmesh.errors import ServiceError
from llmesh.models_file import ModelSpec
from llmesh.prefix_hash import hash_prefix_blocks
from llmesh.router.picker import Picker
from llmesh.router.replicas import EngineInfo, EngineLoad, Replica, ReplicaPool
from llmesh.v1 import prefix_index_pb2 as pb
from llmesh.v1 import prefix_index_pb2_grpc
from tests.mesh_helpers import RedisServer, free_port, start_prefix_index

MODEL = "tiny"
PROMPT = list(range(3, 3 + 16 * 6 + 5))  # 6 full blocks and a partial one


@pytest.fixture(scope="module")
def index_address():
    with RedisServer() as redis_server, start_prefix_index(redis_server.url) as proc:
        yield proc.address


def make_pool(n: int) -> ReplicaPool:
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(n)]
    replicas = [Replica(MODEL, a) for a in addresses]
    for i, r in enumerate(replicas):
        r.healthy = True
        r.info = EngineInfo(MODEL, f"{MODEL}@{r.address}", block_size=16, max_model_len=512,
                            kv_blocks_total=100, epoch=1)
        r.load = EngineLoad(kv_total=100)
    return ReplicaPool(ModelSpec(MODEL, "x", replicas=n, addresses=addresses), replicas)


def publish(index_address: str, instance_id: str, hashes: list[int]) -> None:
    with grpc.insecure_channel(index_address) as ch:
        stub = prefix_index_pb2_grpc.PrefixIndexStub(ch)
        batch = pb.KVEventBatch(instance_id=instance_id, epoch=1, seq=0, namespace=MODEL, snapshot=True,
                                events=[pb.KVEvent(cleared=pb.AllCleared()),
                                        pb.KVEvent(stored=pb.BlockStored(block_hashes=hashes, block_size=16))])
        assert not list(stub.Publish(iter([batch]), timeout=10))[0].resync_required


def run(coro):
    return asyncio.run(coro)


def test_prefix_holder_wins_until_load_outweighs_it(index_address):
    async def scenario():
        pool = make_pool(3)
        a, b, c = pool.replicas
        hashes = hash_prefix_blocks(PROMPT, 16, MODEL, salt="tenant-1")
        publish(index_address, a.info.instance_id, hashes[:2])
        publish(index_address, b.info.instance_id, hashes[:5])
        picker = Picker(index_address, cache_weight=1.0, load_weight=2.0, index_timeout_s=2.0)
        try:
            pick = await picker.pick(pool, PROMPT, "tenant-1")
            assert (pick.replica, pick.matched_blocks, pick.reason) == (b, 5, "prefix_cache")
            # Another salt is another namespace: no replica holds it.
            pick = await picker.pick(pool, PROMPT, "tenant-2")
            assert (pick.matched_blocks, pick.reason) == (0, "least_loaded")
            # Busy b scores 5 - 2 * (2 + 0.5) = 0, below idle a's 2 blocks.
            b.load = EngineLoad(waiting=1, running=1, kv_used=50, kv_total=100)
            pick = await picker.pick(pool, PROMPT, "tenant-1")
            assert (pick.replica, pick.matched_blocks) == (a, 2)
            # The router's own in-flight count counts as load before Load catches up.
            b.load = EngineLoad(kv_total=100)
            b.inflight = 3
            assert (await picker.pick(pool, PROMPT, "tenant-1")).replica is a
            # A failed replica is excluded for the rest of the request.
            b.inflight = 0
            assert (await picker.pick(pool, PROMPT, "tenant-1", exclude={b.address})).replica is a
        finally:
            await picker.close()
            await asyncio.gather(*(r.close() for r in pool.replicas))

    run(scenario())


def test_without_index_least_loaded_then_round_robin():
    async def scenario():
        pool = make_pool(3)
        a, b, c = pool.replicas
        picker = Picker(None, cache_weight=1.0, load_weight=1.0, index_timeout_s=0.1)
        try:
            a.load = EngineLoad(running=2, kv_total=100)
            chosen = [(await picker.pick(pool, PROMPT, "")).replica for _ in range(4)]
            assert set(chosen) == {b, c} and chosen[0] is not chosen[1]
            assert all(p.reason == "least_loaded" for p in [await picker.pick(pool, PROMPT, "")])
            c.healthy = False
            b.healthy = False
            pick = await picker.pick(pool, PROMPT, "")
            assert (pick.replica, pick.reason) == (a, "only_replica")
            with pytest.raises(ServiceError) as e:
                await picker.pick(pool, PROMPT, "", exclude={a.address})
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            assert "no healthy replica of model 'tiny'" in e.value.message and b.address in e.value.message
        finally:
            await picker.close()
            await asyncio.gather(*(r.close() for r in pool.replicas))

    run(scenario())


def test_unreachable_index_is_advisory():
    async def scenario():
        pool = make_pool(2)
        picker = Picker(f"127.0.0.1:{free_port()}", cache_weight=1.0, load_weight=1.0, index_timeout_s=0.2)
        try:
            pick = await picker.pick(pool, PROMPT, "")
            assert pick.reason == "least_loaded" and pick.matched_blocks == 0
        finally:
            await picker.close()
            await asyncio.gather(*(r.close() for r in pool.replicas))

    run(scenario())


def test_round_robin_policy_ignores_cache_and_load(index_address):
    async def scenario():
        pool = make_pool(2)
        a, b = pool.replicas
        publish(index_address, a.info.instance_id, hash_prefix_blocks(PROMPT, 16, MODEL))
        b.load = EngineLoad(running=5, kv_total=100)
        picker = Picker(index_address, cache_weight=1.0, load_weight=1.0, index_timeout_s=1.0,
                        policy="round_robin")
        try:
            picks = [await picker.pick(pool, PROMPT, "") for _ in range(4)]
            assert [p.replica for p in picks] in ([b, a, b, a], [a, b, a, b])
            assert all((p.reason, p.matched_blocks) == ("round_robin", 0) for p in picks)
            pick = await picker.pick(pool, PROMPT, "", exclude={a.address})
            assert pick.replica is b
        finally:
            await picker.close()
            await asyncio.gather(*(r.close() for r in pool.replicas))

    run(scenario())
