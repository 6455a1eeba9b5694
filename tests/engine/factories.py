"""Small factories for scheduler and KV cache tests: no model, no torch."""

from __future__ import annotations

import itertools
import random
import zlib
from collections import Counter
from collections.abc import Sequence

from llmesh.engine.config import SchedulerConfig
from llmesh.engine.kv_cache.events import KVEventPublisher
from llmesh.engine.kv_cache.manager import KVCacheManager
from llmesh.engine.request import Priority, Request
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.scheduler import Scheduler
from llmesh.engine.scheduler_output import SchedulerOutput

NAMESPACE = "test-model"
VOCAB = 50_000

_arrivals = itertools.count()


def request_tokens(request_id: str, n: int) -> list[int]:
    """Tokens unique to ``request_id`` (so unrelated requests share no prefix)."""
    rng = random.Random(zlib.crc32(request_id.encode()))
    return [rng.randrange(1, VOCAB) for _ in range(n)]


def make_request(
    request_id: str = "r0",
    prompt_len: int | None = None,
    *,
    tokens: Sequence[int] | None = None,
    max_tokens: int = 4,
    priority: int = Priority.INTERACTIVE,
    arrival_time: float | None = None,
    cache_salt: str | None = None,
    eos_token_ids: Sequence[int] = (),
    stop_token_ids: Sequence[int] = (),
    max_model_len: int | None = None,
) -> Request:
    """A request with ``tokens`` or ``prompt_len`` tokens of its own; arrivals in creation order."""
    if tokens is None:
        tokens = request_tokens(request_id, 8 if prompt_len is None else prompt_len)
    return Request(
        request_id=request_id,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(max_tokens=max_tokens, stop_token_ids=list(stop_token_ids)),
        priority=priority,
        arrival_time=float(next(_arrivals)) if arrival_time is None else arrival_time,
        cache_salt=cache_salt,
        eos_token_ids=frozenset(eos_token_ids),
        max_model_len=max_model_len,
    )


def make_kv(
    num_blocks: int = 16,
    block_size: int = 4,
    *,
    caching: bool = True,
    publisher: KVEventPublisher | None = None,
) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, NAMESPACE, enable_prefix_caching=caching, publisher=publisher)


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    budget: int = 64,
    max_seqs: int = 8,
    *,
    max_model_len: int = 256,
    chunked: bool = True,
    caching: bool = True,
    publisher: KVEventPublisher | None = None,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
    )
    return Scheduler(config, make_kv(num_blocks, block_size, caching=caching, publisher=publisher))


def fake_token(request: Request, vocab: int = VOCAB) -> int:
    """A deterministic 'model': the next token depends only on the tokens so far."""
    h = zlib.crc32(",".join(map(str, request.all_token_ids)).encode())
    return h % vocab


def fake_sample(output: SchedulerOutput, vocab: int = VOCAB) -> dict[str, int]:
    """One token for every chunk that samples, a pure function of the request's tokens."""
    return {c.request_id: fake_token(c.request, vocab) for c in output.chunks if c.samples}


def step(scheduler: Scheduler, vocab: int = VOCAB) -> tuple[SchedulerOutput, list[Request]]:
    """schedule → fake model → update, as the engine does."""
    out = scheduler.schedule()
    return out, scheduler.update_from_output(out, fake_sample(out, vocab))


def drain(scheduler: Scheduler, max_steps: int = 10_000, vocab: int = VOCAB) -> int:
    """Step until no request is left; returns the number of steps (fails past ``max_steps``)."""
    for n in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return n
        step(scheduler, vocab)
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def check_invariants(scheduler: Scheduler) -> None:
    """Every block is free or held by exactly the running requests whose tables name it."""
    kv, pool = scheduler.kv, scheduler.kv.pool
    held = Counter(bid for r in scheduler.running for bid in r.block_ids)
    for block in pool.blocks:
        assert block.ref_cnt >= 0, block
        assert block.ref_cnt == held.get(block.block_id, 0), (block, held.get(block.block_id, 0))
        assert pool.is_free(block) == (block.ref_cnt == 0), block
        if block.block_hash is not None:
            assert pool.get_cached_block(block.block_hash) is block
    assert sum(b.ref_cnt for b in pool.blocks) == sum(len(r.block_ids) for r in scheduler.running)
    assert kv.num_free_blocks + kv.num_used_blocks == kv.num_total_blocks
    assert kv.num_used_blocks == len(held)
    waiting = scheduler.waiting_requests()
    live = waiting + scheduler.running
    assert len({id(r) for r in live}) == len(live), "a request is queued twice"
    for r in live:
        assert scheduler.get_request(r.request_id) is r and not r.is_finished
    for r in waiting:
        assert not r.block_ids and r.num_computed_tokens == 0
    for r in scheduler.running:
        assert len(r.block_ids) * kv.block_size >= r.num_computed_tokens
        assert r.num_computed_tokens < r.num_tokens
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
