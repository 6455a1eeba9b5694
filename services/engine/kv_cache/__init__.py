"""Paged KV cache bookkeeping: the block pool, the scheduler-facing manager, KV events."""

from llmesh.engine.kv_cache.block_pool import Block, BlockPool, KVCacheStateError
from llmesh.engine.kv_cache.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVEventBatch,
    KVEventPublisher,
    NullPublisher,
    QueuePublisher,
)
from llmesh.engine.kv_cache.manager import ComputedBlocks, KVCacheManager

__all__ = [
    "AllCleared",
    "Block",
    "BlockPool",
    "BlockRemoved",
    "BlockStored",
    "ComputedBlocks",
    "KVCacheEvent",
    "KVCacheManager",
    "KVCacheStateError",
    "KVEventBatch",
    "KVEventPublisher",
    "NullPublisher",
    "QueuePublisher",
]
