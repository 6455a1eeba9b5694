"""The prefix-cache index as a real process over a real redis-server."""

from __future__ import annotations

import random
import time
import uuid

import grpc
import pytest
import redis

from llmesh.prefix_hash import hash_prefix_blocks
from llmesh.v1 import prefix_index_pb2 as pb
from llmesh.v1 import prefix_index_pb2_grpc
from tests.mesh_helpers import RedisServer, start_prefix_index

NS = "tiny-llama"
TIMEOUT = 10


def chain(n: int, seed: int = 0, ns: str = NS) -> list[int]:
    """A realistic chain of n block hashes (the engine's own hash function)."""
    rng = random.Random(seed)
    return hash_prefix_blocks([rng.randrange(512) for _ in range(16 * n)], 16, ns)


def new_id() -> str:
    return f"engine-{uuid.uuid4().hex[:8]}"


def stored(hashes: list[int]) -> pb.KVEvent:
    return pb.KVEvent(stored=pb.BlockStored(block_hashes=hashes, block_size=16))


def removed(hashes: list[int]) -> pb.KVEvent:
    return pb.KVEvent(removed=pb.BlockRemoved(block_hashes=hashes))


def cleared() -> pb.KVEvent:
    return pb.KVEvent(cleared=pb.AllCleared())


def batch(inst: str, seq: int, *events: pb.KVEvent, epoch: int = 1, ns: str = NS, snapshot: bool = False,
          address: str = "") -> pb.KVEventBatch:
    return pb.KVEventBatch(instance_id=inst, epoch=epoch, seq=seq, namespace=ns, events=events,
                           snapshot=snapshot, address=address or f"127.0.0.1:{abs(hash(inst)) % 50000 + 10000}")


def publish(stub, *batches: pb.KVEventBatch) -> list[pb.PublishAck]:
    return list(stub.Publish(iter(batches), timeout=TIMEOUT))


def match(stub, hashes: list[int], ns: str = NS) -> dict[str, int]:
    resp = stub.Match(pb.MatchRequest(namespace=ns, block_hashes=hashes), timeout=TIMEOUT)
    return {r.instance_id: r.matched_blocks for r in resp.replicas}


def test_match_counts_leading_blocks_per_replica(index_stub):
    a, b, c = new_id(), new_id(), new_id()
    h = chain(6, seed=1)
    other = chain(3, seed=2)
    acks = publish(index_stub, batch(a, 0, stored(h[:4]), address="127.0.0.1:7001"),
                   batch(a, 1, stored(h[4:]), address="127.0.0.1:7001"))
    assert [(x.seq, x.resync_required) for x in acks] == [(0, False), (1, False)]
    publish(index_stub, batch(b, 0, stored(h[:2]), address="127.0.0.1:7002"))
    # c holds blocks 0, 1 and 3 but not 2: only its two leading blocks count.
    publish(index_stub, batch(c, 0, stored(h[:2] + h[3:4] + other)))
    resp = index_stub.Match(pb.MatchRequest(namespace=NS, block_hashes=h), timeout=TIMEOUT)
    got = [(r.instance_id, r.matched_blocks, r.address) for r in resp.replicas]
    assert got[0] == (a, 6, "127.0.0.1:7001")
    assert sorted(got[1:]) == sorted([(b, 2, "127.0.0.1:7002"), (c, 2, batch(c, 0).address)])
    assert match(index_stub, h[1:]) == {a: 5, b: 1, c: 1}  # a chain that does not start at block 0
    assert match(index_stub, other) == {c: 3}
    assert match(index_stub, chain(4, seed=99)) == {}
    assert match(index_stub, h, ns="another-model") == {}


def test_removed_blocks_cut_the_match(index_stub):
    a = new_id()
    h = chain(5, seed=3)
    publish(index_stub, batch(a, 0, stored(h)), batch(a, 1, removed([h[2]])))
    assert match(index_stub, h) == {a: 2}
    publish(index_stub, batch(a, 2, removed([h[0]])))
    assert match(index_stub, h) == {}
    assert match(index_stub, h[3:]) == {a: 2}


def test_all_cleared_drops_everything_before_it(index_stub):
    a = new_id()
    h = chain(4, seed=4)
    acks = publish(index_stub, batch(a, 0, stored(h)), batch(a, 1, stored(h[:1]), cleared(), stored(h[:2])))
    assert not any(x.resync_required for x in acks)
    assert match(index_stub, h) == {a: 2}
    publish(index_stub, batch(a, 2, cleared()))
    assert match(index_stub, h) == {}


def test_new_epoch_purges_the_old_state(index_stub):
    a = new_id()
    h1, h2 = chain(3, seed=5), chain(3, seed=6)
    publish(index_stub, batch(a, 0, stored(h1)), batch(a, 1, stored(h2[:1])))
    acks = publish(index_stub, batch(a, 0, stored(h2), epoch=2))
    assert not acks[0].resync_required
    assert match(index_stub, h1) == {}
    assert match(index_stub, h2) == {a: 3}
    # A late batch from the old process (epoch 1) is acknowledged and ignored.
    acks = publish(index_stub, batch(a, 2, stored(h1), epoch=1))
    assert not acks[0].resync_required
    assert match(index_stub, h1) == {}


def test_new_epoch_that_does_not_start_at_zero_asks_for_a_snapshot(index_stub):
    a = new_id()
    h = chain(2, seed=7)
    publish(index_stub, batch(a, 0, stored(h)))
    acks = publish(index_stub, batch(a, 5, stored(h[:1]), epoch=3))
    assert acks[0].resync_required
    assert match(index_stub, h) == {}  # the old epoch's blocks are gone at once


def test_seq_gap_requires_resync_until_a_snapshot(index_stub):
    a = new_id()
    h = chain(4, seed=8)
    acks = publish(index_stub, batch(a, 0, stored(h[:1])), batch(a, 1, stored(h[1:2])),
                   batch(a, 3, stored(h[2:3])), batch(a, 4, stored(h[3:4])))
    assert [(x.seq, x.resync_required) for x in acks] == [(0, False), (1, False), (3, True), (4, True)]
    assert match(index_stub, h) == {a: 2}  # nothing after the gap was applied
    acks = publish(index_stub, batch(a, 5, cleared(), stored(h), snapshot=True), batch(a, 6, removed([h[3]])))
    assert [(x.seq, x.resync_required) for x in acks] == [(5, False), (6, False)]
    assert match(index_stub, h) == {a: 3}


def test_duplicate_batches_are_acknowledged_and_ignored(index_stub):
    a = new_id()
    h = chain(3, seed=9)
    publish(index_stub, batch(a, 0, stored(h)), batch(a, 1, removed([h[2]])))
    acks = publish(index_stub, batch(a, 0, stored(h)))
    assert not acks[0].resync_required
    assert match(index_stub, h) == {a: 2}


def test_unknown_instance_mid_sequence_requires_resync(index_stub):
    acks = publish(index_stub, batch(new_id(), 7, stored(chain(1, seed=10))))
    assert acks[0].resync_required


def test_heartbeat_asks_for_a_snapshot_when_the_index_has_no_state(index_stub):
    a = new_id()
    hb = pb.HeartbeatRequest(instance_id=a, epoch=1, namespace=NS, ttl_seconds=5, address="127.0.0.1:7100")
    assert index_stub.Heartbeat(hb, timeout=TIMEOUT).resync_required
    publish(index_stub, batch(a, 0, cleared(), snapshot=True), batch(a, 1, stored(chain(2, seed=11))))
    assert not index_stub.Heartbeat(hb, timeout=TIMEOUT).resync_required
    resp = index_stub.Match(pb.MatchRequest(namespace=NS, block_hashes=chain(2, seed=11)), timeout=TIMEOUT)
    assert [(r.instance_id, r.matched_blocks) for r in resp.replicas] == [(a, 2)]
    # A restarted process (epoch 2) heartbeats: the old blocks go and a snapshot is asked for.
    hb2 = pb.HeartbeatRequest(instance_id=a, epoch=2, namespace=NS, ttl_seconds=5, address="127.0.0.1:7101")
    assert index_stub.Heartbeat(hb2, timeout=TIMEOUT).resync_required
    assert match(index_stub, chain(2, seed=11)) == {}


def test_replica_that_stops_heartbeating_is_forgotten(index_stub):
    a, b = new_id(), new_id()
    h = chain(3, seed=12)
    for inst, ttl in ((a, 0.4), (b, 30)):
        index_stub.Heartbeat(pb.HeartbeatRequest(instance_id=inst, epoch=1, namespace=NS, ttl_seconds=ttl),
                             timeout=TIMEOUT)
        publish(index_stub, batch(inst, 0, stored(h)))
    assert match(index_stub, h) == {a: 3, b: 3}
    time.sleep(0.6)
    assert match(index_stub, h) == {b: 3}
    # Purged (lazily by Match and by the sweep): the index has no state for it any more.
    deadline = time.monotonic() + 5
    while index_stub.Forget(pb.ForgetRequest(instance_id=a), timeout=TIMEOUT).removed_blocks:
        assert time.monotonic() < deadline, "the expired replica was never purged"
        time.sleep(0.1)
    assert index_stub.Heartbeat(pb.HeartbeatRequest(instance_id=a, epoch=1, ttl_seconds=5),
                                timeout=TIMEOUT).resync_required


def test_forget_drops_a_replica(index_stub):
    a, b = new_id(), new_id()
    h = chain(4, seed=13)
    publish(index_stub, batch(a, 0, stored(h)))
    publish(index_stub, batch(b, 0, stored(h[:2])))
    assert index_stub.Forget(pb.ForgetRequest(instance_id=a), timeout=TIMEOUT).removed_blocks == 4
    assert match(index_stub, h) == {b: 2}
    assert index_stub.Forget(pb.ForgetRequest(instance_id=a), timeout=TIMEOUT).removed_blocks == 0


def test_match_with_a_thousand_blocks(index_stub):
    a, b = new_id(), new_id()
    h = chain(1000, seed=14)
    publish(index_stub, batch(a, 0, stored(h[:500])), batch(a, 1, stored(h[500:])))
    publish(index_stub, batch(b, 0, stored(h[:700])))
    t0 = time.perf_counter()
    assert match(index_stub, h) == {a: 1000, b: 700}
    assert time.perf_counter() - t0 < 2.0


def test_match_is_not_fooled_by_a_later_block_held_elsewhere(index_stub):
    """Leading blocks only: a replica holding blocks 0-1 and 3-4 matches 2, and one that
    holds only later blocks matches nothing from the start."""
    a, b = new_id(), new_id()
    h = chain(5, seed=15)
    publish(index_stub, batch(a, 0, stored(h[:2] + h[3:])))
    publish(index_stub, batch(b, 0, stored(h[1:])))
    assert match(index_stub, h) == {a: 2}
    assert match(index_stub, h[1:]) == {b: 4, a: 1}


def test_index_memory_per_stored_block_is_bounded(redis_server, index_stub):
    """Redis memory grows by well under 1 KiB per stored block (one member in the block's
    set and one in the replica's owned set; bench/routing.py reports the figure)."""
    r = redis.Redis(port=redis_server.port)
    n = 5000
    before = r.info("memory")["used_memory"]
    h, inst = chain(n, seed=16), new_id()
    publish(index_stub, *[batch(inst, i, stored(h[k:k + 1000])) for i, k in enumerate(range(0, n, 1000))])
    per_block = (r.info("memory")["used_memory"] - before) / n
    assert 0 < per_block < 1024, per_block


def test_invalid_requests_are_refused(index_stub):
    with pytest.raises(grpc.RpcError) as e:
        publish(index_stub, pb.KVEventBatch(namespace=NS, seq=0))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "instance_id" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        index_stub.Match(pb.MatchRequest(block_hashes=[1]), timeout=TIMEOUT)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match(index_stub, []) == {}


def test_redis_down_is_unavailable_and_the_index_recovers():
    with RedisServer() as redis_server, start_prefix_index(redis_server.url) as proc, \
            grpc.insecure_channel(proc.address) as channel:
        stub = prefix_index_pb2_grpc.PrefixIndexStub(channel)
        a = new_id()
        h = chain(2, seed=15)
        publish(stub, batch(a, 0, stored(h)))
        redis_server.stop()
        with pytest.raises(grpc.RpcError) as e:
            match(stub, h)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            publish(stub, batch(a, 1, stored(h[:1])))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.alive()
        redis_server.start()  # an empty Redis: the index lost its state
        deadline = time.monotonic() + 10
        while True:
            try:
                assert match(stub, h) == {}
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the index did not reconnect to Redis"
                time.sleep(0.1)
        assert publish(stub, batch(a, 2, stored(h)))[0].resync_required
        assert not publish(stub, batch(a, 3, cleared(), stored(h), snapshot=True))[0].resync_required
        assert match(stub, h) == {a: 2}
