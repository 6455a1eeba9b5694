"""KVCacheManager: prefix hits, salts, the whole-prompt cap, allocation, events, freeing."""

from __future__ import annotations

from llmesh.engine.kv_cache.events import BlockRemoved, BlockStored, QueuePublisher
from llmesh.engine.kv_cache.manager import ComputedBlocks, KVCacheManager
from llmesh.engine.request import Request
from llmesh.prefix_hash import hash_prefix_blocks
from tests.engine.factories import NAMESPACE, make_kv, make_request, request_tokens

BS = 4


def admit_and_compute(kv: KVCacheManager, req: Request) -> ComputedBlocks:
    """What the scheduler and one prefill step do: hit, allocate, compute, register."""
    computed = kv.get_computed_blocks(req)
    num_new = req.num_tokens - computed.num_computed_tokens
    assert kv.allocate_slots(req, num_new, computed)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    return computed


def test_prefix_hit_across_requests_three_full_blocks_and_a_partial():
    pub = QueuePublisher()
    kv = make_kv(16, BS, publisher=pub)
    prompt = request_tokens("shared", 3 * BS + 2)
    a = make_request("a", tokens=prompt)
    assert admit_and_compute(kv, a) == ComputedBlocks([], 0)
    assert len(a.block_ids) == 4
    expected = hash_prefix_blocks(prompt, BS, model=NAMESPACE)
    assert a.block_hashes == expected, "the router's hashes are the engine's"

    batch = kv.flush_events()
    assert batch is not None and batch.seq == 0
    assert batch.events == (BlockStored(tuple(expected), None, tuple(prompt[: 3 * BS]), BS, NAMESPACE),)
    assert pub.drain() == [batch]

    b = make_request("b", tokens=prompt)
    hit = kv.get_computed_blocks(b)
    assert hit == ComputedBlocks(a.block_ids[:3], 3 * BS)
    # a prompt that diverges inside the third block shares only two
    c = make_request("c", tokens=prompt[: 2 * BS + 1] + [7] * 5)
    assert kv.get_computed_blocks(c) == ComputedBlocks(a.block_ids[:2], 2 * BS)

    used = kv.num_used_blocks
    assert kv.allocate_slots(b, b.num_tokens - hit.num_computed_tokens, hit)
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] != a.block_ids[3]
    assert kv.num_used_blocks == used + 1
    assert [kv.pool.blocks[i].ref_cnt for i in b.block_ids] == [2, 2, 2, 1]


def test_salt_keeps_tenants_apart():
    kv = make_kv(16, BS)
    prompt = request_tokens("p", 3 * BS)
    admit_and_compute(kv, make_request("a", tokens=prompt, cache_salt="tenant-1"))
    assert kv.get_computed_blocks(make_request("b", tokens=prompt, cache_salt="tenant-2")).block_ids == []
    assert kv.get_computed_blocks(make_request("c", tokens=prompt)).block_ids == []
    assert len(kv.get_computed_blocks(make_request("d", tokens=prompt, cache_salt="tenant-1")).block_ids) == 2


def test_whole_prompt_cached_leaves_its_last_block_to_compute():
    kv = make_kv(16, BS)
    prompt = request_tokens("p", 3 * BS)
    a = make_request("a", tokens=prompt)
    admit_and_compute(kv, a)
    hit = kv.get_computed_blocks(make_request("b", tokens=prompt))
    assert hit == ComputedBlocks(a.block_ids[:2], 2 * BS)
    # one extra token: all three full blocks are usable
    assert kv.get_computed_blocks(make_request("c", tokens=prompt + [1])).num_computed_tokens == 3 * BS
    # a one-block prompt is never served from the cache
    single = make_request("d", tokens=prompt[:BS])
    assert kv.get_computed_blocks(single) == ComputedBlocks([], 0)


def test_allocation_failure_changes_nothing():
    kv = make_kv(4, BS)
    prompt = request_tokens("p", 2 * BS)
    a = make_request("a", tokens=prompt)
    admit_and_compute(kv, a)
    table = list(a.block_ids)
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.pool.num_cached_blocks == 2
    # hit on 2 cached free blocks + 3 new blocks: 3 ≤ 4 free, but the hit itself takes 2
    b = make_request("b", tokens=prompt + [1] * (3 * BS - 2))
    hit = kv.get_computed_blocks(b)
    assert len(hit.block_ids) == 2
    assert kv.allocate_slots(b, b.num_tokens - hit.num_computed_tokens, hit) is False
    assert b.block_ids == [] and kv.num_free_blocks == 4
    assert all(blk.ref_cnt == 0 for blk in kv.pool.blocks)
    assert kv.get_computed_blocks(b) == hit, "the failed attempt evicted nothing"
    # one block fewer fits exactly: the hit's blocks are reused, not evicted
    c = make_request("c", tokens=prompt + [1] * (2 * BS - 1))
    hit = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, c.num_tokens - hit.num_computed_tokens, hit)
    assert c.block_ids[:2] == table and kv.num_free_blocks == 0


def test_growing_a_running_request_and_failing_when_full():
    kv = make_kv(3, BS, caching=False)
    r = make_request("r", BS + 1)
    assert kv.allocate_slots(r, r.num_tokens)
    assert len(r.block_ids) == 2
    r.num_computed_tokens = r.num_tokens
    assert kv.allocate_slots(r, 1) and len(r.block_ids) == 2, "room left in the last block"
    r.num_computed_tokens = 3 * BS
    assert kv.allocate_slots(r, 1) is False and len(r.block_ids) == 2
    assert kv.blocks_needed(0) == 0 and kv.blocks_needed(BS) == 1 and kv.blocks_needed(BS + 1) == 2


def test_only_computed_and_known_tokens_are_cached():
    kv = make_kv(16, BS)
    r = make_request("r", tokens=request_tokens("r", BS + 2))
    computed = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, 3, computed)  # a first chunk of 3 tokens
    r.num_computed_tokens = 3
    kv.cache_computed_blocks(r)
    assert kv.pool.num_cached_blocks == 0
    assert kv.allocate_slots(r, 3)
    r.num_computed_tokens = 6
    kv.cache_computed_blocks(r)
    assert kv.pool.num_cached_blocks == 1
    # decode: outputs complete the second block only once they are computed
    r.append_output_token(11)
    r.append_output_token(12)
    assert r.num_tokens == 2 * BS and r.num_computed_tokens == 6
    kv.cache_computed_blocks(r)
    assert kv.pool.num_cached_blocks == 1
    assert kv.allocate_slots(r, 2)
    r.num_computed_tokens = 8
    kv.cache_computed_blocks(r)
    assert kv.pool.num_cached_blocks == 2
    assert r.block_hashes == hash_prefix_blocks(r.all_token_ids, BS, model=NAMESPACE)
    events = kv.flush_events().events
    assert events == (BlockStored(tuple(r.block_hashes), None, tuple(r.all_token_ids), BS, NAMESPACE),)


def test_free_releases_tail_first_and_reports_count():
    kv = make_kv(8, BS)
    a = make_request("a", tokens=request_tokens("a", 3 * BS + 1))
    admit_and_compute(kv, a)
    table = list(a.block_ids)
    assert kv.free(a) == 4
    assert a.block_ids == [] and kv.num_used_blocks == 0 and kv.usage == 0.0
    assert kv.free(a) == 0
    # 4 untouched blocks, then the partial tail, then the cached blocks from the end back
    order = [b.block_id for b in kv.pool.get_new_blocks(8)]
    assert order[0] == table[3]
    assert order[-3:] == [table[2], table[1], table[0]]
    stored, removed = kv.flush_events().events
    assert isinstance(stored, BlockStored)
    assert removed == BlockRemoved(tuple(a.block_hashes[::-1]), NAMESPACE)


def test_flush_events_numbers_batches_and_skips_empty_steps():
    pub = QueuePublisher()
    kv = make_kv(2, BS, publisher=pub)
    assert kv.flush_events() is None
    for i in range(3):
        r = make_request(f"r{i}", tokens=request_tokens(f"r{i}", BS + 1))
        admit_and_compute(kv, r)
        kv.free(r)
        kv.flush_events()
        assert kv.flush_events() is None
    batches = pub.drain()
    assert [b.seq for b in batches] == [0, 1, 2]
    assert isinstance(batches[1].events[0], BlockRemoved)
    assert isinstance(batches[1].events[1], BlockStored)


def test_usage_and_reset():
    kv = make_kv(4, BS)
    r = make_request("r", tokens=request_tokens("r", 2 * BS + 1))
    admit_and_compute(kv, r)
    assert kv.num_used_blocks == 3 and kv.usage == 0.75
    assert kv.reset_prefix_cache() is False
    kv.free(r)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("s", tokens=r.prompt_token_ids)).block_ids == []


def test_caching_off_gives_no_hits_and_no_events():
    kv = make_kv(8, BS, caching=False)
    prompt = request_tokens("p", 2 * BS + 1)
    admit_and_compute(kv, make_request("a", tokens=prompt))
    assert kv.get_computed_blocks(make_request("b", tokens=prompt)) == ComputedBlocks([], 0)
    assert kv.flush_events() is None
