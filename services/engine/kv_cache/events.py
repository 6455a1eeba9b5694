"""KV cache events: what an engine tells the prefix-cache index about its blocks.

The block pool records ``BlockStored`` when a full block gets a prefix hash (it can be
reused from now on), ``BlockRemoved`` when such a block is evicted for new data, and
``AllCleared`` when the whole prefix cache is dropped. Events are grouped per engine
step into a ``KVEventBatch`` carrying a per-instance sequence number (0, 1, 2, ...), so
a consumer that sees a gap knows it missed something and can resynchronise (the index
is advisory: a missed event costs cache misses, never wrong output).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, Union


@dataclass(frozen=True)
class BlockStored:
    """Consecutive full blocks of one chain became reusable.

    ``parent_hash`` is the hash of the block before ``block_hashes[0]``, or None when
    the first block is the first of its sequence (its parent is the namespace root).
    ``token_ids`` holds ``len(block_hashes) * block_size`` tokens, block after block.
    """

    block_hashes: tuple[int, ...]
    parent_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    namespace: str


@dataclass(frozen=True)
class BlockRemoved:
    """These cached blocks were evicted; a request can no longer hit them here."""

    block_hashes: tuple[int, ...]
    namespace: str


@dataclass(frozen=True)
class AllCleared:
    """Every cached block of this engine was dropped (``reset_prefix_cache``)."""


KVCacheEvent = Union[BlockStored, BlockRemoved, AllCleared]


@dataclass(frozen=True)
class KVEventBatch:
    """The events of one engine step, in the order they happened."""

    seq: int
    """Per-instance sequence number: 0 for the first published batch, then +1 each."""
    timestamp: float
    """Wall-clock time (``time.time()``) when the batch was published."""
    events: tuple[KVCacheEvent, ...]


def coalesce_events(events: Iterable[KVCacheEvent]) -> list[KVCacheEvent]:
    """Merge runs of events that say the same thing in fewer messages.

    A ``BlockStored`` that continues the previous one's chain (its parent is the
    previous event's last hash, same namespace and block size) joins it, and
    consecutive ``BlockRemoved`` of one namespace join. Order is kept, so the meaning
    of the stream does not change.
    """
    out: list[KVCacheEvent] = []
    for ev in events:
        prev = out[-1] if out else None
        if (
            isinstance(ev, BlockStored)
            and isinstance(prev, BlockStored)
            and ev.parent_hash == prev.block_hashes[-1]
            and ev.namespace == prev.namespace
            and ev.block_size == prev.block_size
        ):
            out[-1] = BlockStored(
                block_hashes=prev.block_hashes + ev.block_hashes,
                parent_hash=prev.parent_hash,
                token_ids=prev.token_ids + ev.token_ids,
                block_size=prev.block_size,
                namespace=prev.namespace,
            )
        elif (
            isinstance(ev, BlockRemoved)
            and isinstance(prev, BlockRemoved)
            and ev.namespace == prev.namespace
        ):
            out[-1] = BlockRemoved(prev.block_hashes + ev.block_hashes, prev.namespace)
        else:
            out.append(ev)
    return out


class KVEventPublisher(Protocol):
    """Where the KV cache manager sends its event batches (called on the engine thread)."""

    def publish(self, batch: KVEventBatch) -> None: ...


class NullPublisher:
    """Drops every batch: the default when no index listens."""

    def publish(self, batch: KVEventBatch) -> None:
        return None


class QueuePublisher:
    """Keeps batches for a consumer on another thread (the gRPC event stream, tests).

    ``maxsize`` bounds memory when the consumer stalls: the oldest batch is dropped and
    counted in ``num_dropped``; the consumer sees the gap in ``seq``.
    """

    def __init__(self, maxsize: int | None = None) -> None:
        if maxsize is not None and maxsize < 1:
            raise ValueError(f"maxsize must be ≥ 1 or None, got {maxsize!r}")
        self._batches: deque[KVEventBatch] = deque(maxlen=maxsize)
        self._cond = threading.Condition()
        self.num_dropped = 0

    def publish(self, batch: KVEventBatch) -> None:
        with self._cond:
            if self._batches.maxlen is not None and len(self._batches) == self._batches.maxlen:
                self.num_dropped += 1
            self._batches.append(batch)
            self._cond.notify_all()

    def get(self, timeout: float | None = None) -> KVEventBatch | None:
        """The oldest batch, waiting up to ``timeout`` seconds (None: forever); None on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self._batches), timeout=timeout):
                return None
            return self._batches.popleft()

    def drain(self) -> list[KVEventBatch]:
        """Every batch kept so far, oldest first, without waiting."""
        with self._cond:
            out = list(self._batches)
            self._batches.clear()
            return out

    def __len__(self) -> int:
        with self._cond:
            return len(self._batches)
