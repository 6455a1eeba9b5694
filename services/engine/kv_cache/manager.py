"""KVCacheManager: the narrow interface between the scheduler and the block pool.

The scheduler speaks in requests and token counts; the manager turns them into block
operations: find a request's cached prefix, grow its block table, register blocks that
became full, give its blocks back. Prefix hashes come from
``llmesh.prefix_hash.hash_prefix_blocks`` — the same function the router uses to ask the
index where a prompt's prefix lives — so a hash the router looks up is the hash an
engine announced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from llmesh.engine.kv_cache.block_pool import BlockPool, KVCacheStateError
from llmesh.engine.kv_cache.events import AllCleared, BlockStored, KVEventBatch, KVEventPublisher, NullPublisher
from llmesh.engine.request import Request
from llmesh.prefix_hash import hash_prefix_blocks


@dataclass(frozen=True)
class ComputedBlocks:
    """A request's cached prefix: block ids in table order and the tokens they cover."""

    block_ids: list[int]
    num_computed_tokens: int


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        namespace: str,
        enable_prefix_caching: bool = True,
        publisher: KVEventPublisher | None = None,
    ) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer ≥ 1, got {block_size!r}")
        self.block_size = block_size
        self.namespace = namespace
        """Model name: the root of every hash chain and the namespace of every event."""
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching, namespace=namespace)
        self.publisher: KVEventPublisher = publisher if publisher is not None else NullPublisher()
        self._next_seq = 0
        self._num_registered: dict[str, int] = {}
        """request_id → how many leading blocks of its table are already registered."""

    # ---- sizes -----------------------------------------------------------------------
    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return self.num_used_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- the scheduler's operations --------------------------------------------------
    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """The longest cached prefix of the request's full blocks, leaving ≥ 1 token to compute.

        The last token must always run through the model to produce logits, so a prompt
        that is cached to its very end gives back its last block.
        """
        if not self.enable_prefix_caching or request.block_ids:
            return ComputedBlocks([], 0)
        self._extend_hashes(request, request.num_tokens)
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            block_ids.append(block.block_id)
        return ComputedBlocks(block_ids, len(block_ids) * self.block_size)

    def fork_blocks(self, parent: Request, child: Request) -> ComputedBlocks:
        """The full blocks of ``parent``'s computed prompt, for ``child`` (same prompt) to share.

        Parallel sampling: the choices of one request fork from the first choice once its
        prompt is computed, holding references to its prompt blocks instead of recomputing
        them — with or without prefix caching. Only blocks wholly inside the prompt are
        shared (a block holding a generated token differs between choices), and at least
        one of the child's tokens is left to compute, for its logits.
        """
        bs = self.block_size
        num_full = min(parent.num_computed_tokens, parent.num_prompt_tokens, child.num_tokens - 1) // bs
        num_full = min(num_full, len(parent.block_ids))
        return ComputedBlocks(list(parent.block_ids[:num_full]), num_full * bs)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks | None = None
    ) -> bool:
        """Grow the block table to cover the computed tokens plus ``num_new_tokens``.

        ``computed`` is passed on admission: its blocks are taken (touched) first and the
        request's computed count is read from it. Returns False, changing nothing, when
        the pool cannot supply the new blocks; cached blocks nobody holds count as free,
        except those the prefix hit itself takes out of the free queue.
        """
        if num_new_tokens < 0:
            raise KVCacheStateError(f"num_new_tokens must be ≥ 0, got {num_new_tokens}")
        hit = [self.pool.blocks[i] for i in computed.block_ids] if computed else []
        if computed is not None and request.block_ids:
            raise KVCacheStateError(
                f"request {request.request_id} already holds blocks; a prefix hit is for admission"
            )
        num_computed = computed.num_computed_tokens if computed else request.num_computed_tokens
        num_held = len(request.block_ids) + len(hit)
        num_new_blocks = max(0, self.blocks_needed(num_computed + num_new_tokens) - num_held)
        taken_from_free = sum(1 for b in hit if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - taken_from_free:
            return False
        if hit:
            self.pool.touch(hit)
            request.block_ids.extend(b.block_id for b in hit)
            self._num_registered[request.request_id] = len(hit)
        new_blocks = self.pool.get_new_blocks(num_new_blocks)
        request.block_ids.extend(b.block_id for b in new_blocks)
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full (all tokens computed and known)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(request.num_computed_tokens, request.num_tokens, len(request.block_ids) * bs) // bs
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        self._extend_hashes(request, num_full * bs)
        tokens = request.all_token_ids
        for i in range(start, num_full):
            self.pool.cache_full_block(
                self.pool.blocks[request.block_ids[i]],
                request.block_hashes[i],
                request.block_hashes[i - 1] if i > 0 else None,
                tokens[i * bs : (i + 1) * bs],
            )
        self._num_registered[request.request_id] = num_full

    def release_tail(self, request: Request) -> int:
        """Free the blocks past the request's computed tokens (rejected drafts' slots); returns
        how many. Those blocks were never registered: a block is cached only once every
        token in it is computed and known, and the computed count was rolled back first."""
        keep = self.blocks_needed(request.num_computed_tokens)
        if len(request.block_ids) <= keep:
            return 0
        if self._num_registered.get(request.request_id, 0) > keep:
            raise KVCacheStateError(f"request {request.request_id}: a block past its computed tokens is cached")
        tail = request.block_ids[keep:]
        self.pool.free_blocks([self.pool.blocks[i] for i in reversed(tail)])
        del request.block_ids[keep:]
        return len(tail)

    def free(self, request: Request) -> int:
        """Release the request's blocks, tail first, and clear its table; returns how many."""
        blocks = [self.pool.blocks[i] for i in reversed(request.block_ids)]
        self.pool.free_blocks(blocks)
        request.block_ids.clear()
        self._num_registered.pop(request.request_id, None)
        return len(blocks)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix (e.g. after a weight update); False while blocks are held."""
        return self.pool.reset_prefix_cache()

    def flush_events(self) -> KVEventBatch | None:
        """Publish the events recorded since the last flush as one batch (none: no batch)."""
        events = self.pool.take_events()
        if not events:
            return None
        batch = KVEventBatch(seq=self._next_seq, timestamp=time.time(), events=tuple(events))
        self._next_seq += 1
        self.publisher.publish(batch)
        return batch

    def publish_snapshot(self) -> KVEventBatch:
        """Publish the whole cached state (AllCleared, then every cached block) as one batch.

        Sent when the prefix-cache index lost track of this engine (restart, sequence gap);
        pending events are flushed first so the snapshot is ordered after them.
        """
        self.flush_events()
        hashes = tuple(self.pool.cached_block_hashes())
        events: list = [AllCleared()]
        if hashes:
            events.append(BlockStored(block_hashes=hashes, parent_hash=None, token_ids=(),
                                      block_size=self.block_size, namespace=self.namespace))
        batch = KVEventBatch(seq=self._next_seq, timestamp=time.time(), events=tuple(events))
        self._next_seq += 1
        self.publisher.publish(batch)
        return batch

    def _extend_hashes(self, request: Request, num_tokens: int) -> None:
        """Make ``request.block_hashes`` cover the full blocks of its first ``num_tokens`` tokens."""
        if len(request.block_hashes) >= num_tokens // self.block_size:
            return
        hashes = hash_prefix_blocks(
            request.all_token_ids[:num_tokens],
            self.block_size,
            model=self.namespace,
            salt=request.cache_salt,
            start_hashes=request.block_hashes,
        )
        request.block_hashes.extend(hashes[len(request.block_hashes) :])
