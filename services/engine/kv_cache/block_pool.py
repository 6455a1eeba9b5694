"""The pool of fixed-size KV blocks: reference counts, LRU eviction, prefix-hash lookup.

A block is in one of three states:

* referenced (``ref_cnt > 0``): in some running request's block table;
* free and cached (``ref_cnt == 0``, ``block_hash`` set): holds a full prefix block that
  a later request may still hit; it sits in the free queue and is evicted (its hash
  dropped) only when a new block is needed;
* free and empty (``ref_cnt == 0``, no hash).

The free queue is an ``OrderedDict`` keyed by block id: O(1) pop from the front, append
at the tail and removal from the middle (a prefix hit takes a cached block back out).
The front is evicted first. Empty blocks are queued at the front since reusing them
destroys nothing; cached blocks go to the tail, so the least recently freed cached
block is the first to go.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from llmesh.engine.kv_cache.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    coalesce_events,
)


class KVCacheStateError(RuntimeError):
    """The pool's bookkeeping would become inconsistent: a bug in the engine, not the request."""


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None
    """Prefix hash while this block is registered as a cached full block, else None."""


class BlockPool:
    """Owns every KV block; hands them out, takes them back and indexes cached ones."""

    def __init__(self, num_blocks: int, enable_caching: bool, *, namespace: str = "") -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer ≥ 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.namespace = namespace
        """Stamped on the events (model name), so the index keeps models apart."""
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, Block] = {}
        self._events: list[KVCacheEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take, cached-but-unreferenced ones included."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def is_free(self, block: Block) -> bool:
        return block.block_id in self._free

    def get_cached_block(self, block_hash: int) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def cached_block_hashes(self) -> list[int]:
        """Hashes of every block currently registered in the prefix cache."""
        return list(self._cached)

    def get_new_blocks(self, n: int) -> list[Block]:
        """Take ``n`` blocks from the front of the free queue (evicting their hashes), ref 1 each."""
        if n > len(self._free):
            raise KVCacheStateError(f"asked for {n} blocks but only {len(self._free)} are free")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take one more reference on each block (a prefix hit); free ones leave the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                if self._free.pop(block.block_id, None) is None:
                    raise KVCacheStateError(f"block {block.block_id} has ref 0 but is not free")
            block.ref_cnt += 1

    def free_blocks(self, blocks_in_eviction_order: Iterable[Block]) -> None:
        """Drop one reference from each; a block reaching 0 joins the free queue.

        Pass the blocks that should be evicted first first (a request's tail before its
        prefix, which other requests are more likely to share).
        """
        for block in blocks_in_eviction_order:
            if block.ref_cnt <= 0:
                raise KVCacheStateError(f"block {block.block_id} freed with ref_cnt {block.ref_cnt}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_full_block(
        self,
        block: Block,
        block_hash: int,
        parent_hash: int | None,
        token_ids: Sequence[int],
    ) -> bool:
        """Register a full, computed block under its prefix hash; True if newly registered.

        When another block already holds this hash (two requests computed the same
        prefix at the same time) the existing mapping stays: ``block`` remains an
        unhashed block of its request and no event is recorded.
        """
        if not self.enable_caching:
            return False
        if block.ref_cnt <= 0:
            raise KVCacheStateError(f"caching block {block.block_id}, which no request holds")
        if block.block_hash is not None:
            if block.block_hash == block_hash:
                return False
            raise KVCacheStateError(f"block {block.block_id} already cached under another hash")
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._events.append(
            BlockStored(
                block_hashes=(block_hash,),
                parent_hash=parent_hash,
                token_ids=tuple(token_ids),
                block_size=len(token_ids),
                namespace=self.namespace,
            )
        )
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is referenced."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self._events.append(AllCleared())
        return True

    def take_events(self) -> list[KVCacheEvent]:
        """Events recorded since the last call, oldest first (consecutive ones merged)."""
        events, self._events = self._events, []
        return coalesce_events(events)

    def _evict(self, block: Block) -> None:
        if block.block_hash is None:
            return
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
            self._events.append(BlockRemoved((block.block_hash,), self.namespace))
        block.block_hash = None
