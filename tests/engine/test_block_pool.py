"""BlockPool: LRU eviction order, reference counts, hash reuse, events, reset; publishers."""

from __future__ import annotations

import threading

import pytest

from llmesh.engine.kv_cache.block_pool import BlockPool, KVCacheStateError
from llmesh.engine.kv_cache.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
    QueuePublisher,
    coalesce_events,
)

NS = "m"


def cache(pool: BlockPool, block, h: int, parent: int | None = None) -> bool:
    return pool.cache_full_block(block, h, parent, [h, h + 1])


def test_new_pool_hands_out_blocks_in_id_order_with_one_reference():
    pool = BlockPool(4, enable_caching=True, namespace=NS)
    assert pool.num_free_blocks == 4
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    with pytest.raises(KVCacheStateError):
        pool.get_new_blocks(2)


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, enable_caching=True)


def test_lru_evicts_least_recently_freed_cached_block_and_empty_blocks_first():
    pool = BlockPool(4, enable_caching=True, namespace=NS)
    a, b, c, d = pool.get_new_blocks(4)
    for blk, h in ((a, 10), (b, 20), (c, 30)):
        cache(pool, blk, h)
    pool.take_events()
    # freed in eviction order: c first, then a, then b; d holds no hash
    pool.free_blocks([c, a, b, d])
    assert pool.num_free_blocks == 4
    first = pool.get_new_blocks(1)[0]
    assert first is d, "an unhashed block is reused before any cached one"
    assert pool.take_events() == []
    assert [blk.block_id for blk in pool.get_new_blocks(2)] == [c.block_id, a.block_id]
    assert pool.get_cached_block(30) is None and pool.get_cached_block(10) is None
    assert pool.get_cached_block(20) is b
    assert pool.take_events() == [BlockRemoved((30, 10), NS)]


def test_touch_takes_a_cached_free_block_out_of_the_free_queue():
    pool = BlockPool(3, enable_caching=True, namespace=NS)
    (a,) = pool.get_new_blocks(1)
    cache(pool, a, 7)
    pool.free_blocks([a])
    assert pool.num_free_blocks == 3 and pool.is_free(a)
    hit = pool.get_cached_block(7)
    pool.touch([hit])
    assert hit.ref_cnt == 1 and not pool.is_free(hit)
    assert pool.num_free_blocks == 2
    pool.touch([hit])  # a second request shares it
    assert hit.ref_cnt == 2
    # the two other blocks can go, the shared one cannot be evicted
    others = pool.get_new_blocks(2)
    assert hit not in others and pool.get_cached_block(7) is hit
    pool.free_blocks([hit])
    assert hit.ref_cnt == 1 and not pool.is_free(hit)
    pool.free_blocks([hit])
    assert hit.ref_cnt == 0 and pool.is_free(hit) and pool.get_cached_block(7) is hit


def test_reference_counts_never_go_negative():
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(KVCacheStateError, match="ref_cnt 0"):
        pool.free_blocks([a])
    assert a.ref_cnt == 0 and pool.num_free_blocks == 2


def test_a_hash_already_cached_keeps_its_block_and_is_not_announced_twice():
    pool = BlockPool(3, enable_caching=True, namespace=NS)
    a, b = pool.get_new_blocks(2)
    assert cache(pool, a, 5) is True
    assert cache(pool, b, 5) is False
    assert pool.get_cached_block(5) is a and b.block_hash is None
    assert cache(pool, a, 5) is False  # registering the same block again is a no-op
    assert pool.take_events() == [BlockStored((5,), None, (5, 6), 2, NS)]
    # freeing the duplicate neither evicts nor announces anything
    pool.free_blocks([b])
    assert pool.get_new_blocks(1)[0] is b
    assert pool.take_events() == [] and pool.get_cached_block(5) is a


def test_cache_full_block_rejects_a_block_nobody_holds_or_a_second_hash():
    pool = BlockPool(2, enable_caching=True)
    (a,) = pool.get_new_blocks(1)
    cache(pool, a, 1)
    with pytest.raises(KVCacheStateError, match="another hash"):
        cache(pool, a, 2)
    pool.free_blocks([a])
    with pytest.raises(KVCacheStateError, match="no request holds"):
        cache(pool, pool.blocks[1], 3)


def test_caching_disabled_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert cache(pool, a, 1) is False
    assert pool.get_cached_block(1) is None and pool.take_events() == []


def test_chained_stored_events_merge_into_one():
    pool = BlockPool(4, enable_caching=True, namespace=NS)
    a, b, c = pool.get_new_blocks(3)
    cache(pool, a, 1, None)
    cache(pool, b, 2, 1)
    cache(pool, c, 9, 42)  # another chain: starts a new event
    assert pool.take_events() == [
        BlockStored((1, 2), None, (1, 2, 2, 3), 2, NS),
        BlockStored((9,), 42, (9, 10), 2, NS),
    ]
    assert pool.take_events() == []


def test_coalesce_keeps_order_across_kinds():
    events = [
        BlockRemoved((1,), NS), BlockRemoved((2,), NS), AllCleared(),
        BlockStored((3,), None, (0,), 1, NS), BlockRemoved((4,), NS), BlockRemoved((5,), "other"),
    ]
    assert coalesce_events(events) == [
        BlockRemoved((1, 2), NS), AllCleared(), BlockStored((3,), None, (0,), 1, NS),
        BlockRemoved((4,), NS), BlockRemoved((5,), "other"),
    ]


def test_reset_prefix_cache_only_when_nothing_is_referenced():
    pool = BlockPool(3, enable_caching=True, namespace=NS)
    a, b = pool.get_new_blocks(2)
    cache(pool, a, 1)
    pool.free_blocks([a])
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    assert pool.get_cached_block(1) is a and pool.take_events() == []
    pool.free_blocks([b])
    assert pool.reset_prefix_cache() is True
    assert pool.get_cached_block(1) is None and a.block_hash is None
    assert pool.num_cached_blocks == 0 and pool.num_free_blocks == 3
    assert pool.take_events() == [AllCleared()]
    # evicting a cleared block announces nothing
    pool.get_new_blocks(3)
    assert pool.take_events() == []


def test_queue_publisher_hands_batches_to_another_thread_in_order():
    pub = QueuePublisher()
    got: list[KVEventBatch] = []

    def consume() -> None:
        for _ in range(3):
            batch = pub.get(timeout=5)
            assert batch is not None
            got.append(batch)

    t = threading.Thread(target=consume)
    t.start()
    for seq in range(3):
        pub.publish(KVEventBatch(seq, 0.0, (AllCleared(),)))
    t.join(timeout=5)
    assert [b.seq for b in got] == [0, 1, 2]
    assert pub.get(timeout=0.01) is None


def test_queue_publisher_bounded_drops_oldest_and_counts():
    pub = QueuePublisher(maxsize=2)
    for seq in range(5):
        pub.publish(KVEventBatch(seq, 0.0, ()))
    assert pub.num_dropped == 3 and len(pub) == 2
    assert [b.seq for b in pub.drain()] == [3, 4]
    assert pub.drain() == []
    with pytest.raises(ValueError):
        QueuePublisher(maxsize=0)
