"""The engine's link to the prefix-cache index: KV events out, heartbeats, resyncs.

The KV cache manager publishes one batch per step on the engine thread; ``QueueBridge``
hands them to the event loop. ``IndexLink`` streams them to ``PrefixIndex.Publish`` and
heartbeats. When the index lost track (it asks for a resync: sequence gap, new epoch,
restart) or the link was down, the engine publishes a snapshot — AllCleared, then every
cached block — and batches queued before it are dropped as superseded. The index is
advisory, so a broken link never affects generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from llmesh.engine.async_llm import AsyncLLM
from llmesh.engine.core.engine_core import publish_kv_snapshot
from llmesh.engine.errors import EngineDeadError
from llmesh.engine.kv_cache.events import AllCleared, BlockRemoved, BlockStored, KVEventBatch
from llmesh.telemetry import client_interceptors
from llmesh.tls import aio_channel
from llmesh.v1 import prefix_index_pb2 as pb
from llmesh.v1 import prefix_index_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class QueueBridge:
    """A KVEventPublisher (called on the engine thread) feeding an asyncio queue, bounded:
    when full the oldest batch is dropped, which the index sees as a gap and resyncs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int = 10_000) -> None:
        self.loop, self.maxsize = loop, maxsize
        self.queue: asyncio.Queue[KVEventBatch] = asyncio.Queue()

    def publish(self, batch: KVEventBatch) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, batch)
        except RuntimeError:  # loop closed at shutdown
            pass

    def _put(self, batch: KVEventBatch) -> None:
        if self.queue.qsize() >= self.maxsize:
            self.queue.get_nowait()
        self.queue.put_nowait(batch)


def batch_to_proto(batch: KVEventBatch, *, instance_id: str, epoch: int, namespace: str,
                   address: str) -> pb.KVEventBatch:
    events = []
    for ev in batch.events:
        if isinstance(ev, BlockStored):
            stored = pb.BlockStored(block_hashes=ev.block_hashes, block_size=ev.block_size)
            if ev.parent_hash is not None:
                stored.parent_hash = ev.parent_hash
            events.append(pb.KVEvent(stored=stored))
        elif isinstance(ev, BlockRemoved):
            events.append(pb.KVEvent(removed=pb.BlockRemoved(block_hashes=ev.block_hashes)))
        elif isinstance(ev, AllCleared):
            events.append(pb.KVEvent(cleared=pb.AllCleared()))
    snapshot = bool(batch.events) and isinstance(batch.events[0], AllCleared)
    return pb.KVEventBatch(instance_id=instance_id, epoch=epoch, seq=batch.seq, namespace=namespace,
                           events=events, snapshot=snapshot, address=address)


class IndexLink:
    def __init__(self, index_address: str, engine: AsyncLLM, bridge: QueueBridge, *, instance_id: str,
                 epoch: int, namespace: str, address: str, heartbeat_interval_s: float,
                 heartbeat_ttl_s: float, tls=None) -> None:
        self.engine, self.bridge = engine, bridge
        self.instance_id, self.epoch, self.namespace, self.address = instance_id, epoch, namespace, address
        self.heartbeat_interval_s, self.heartbeat_ttl_s = heartbeat_interval_s, heartbeat_ttl_s
        self.channel = aio_channel(index_address, tls, interceptors=client_interceptors())
        self.stub = pb_grpc.PrefixIndexStub(self.channel)
        self._resync_pending = False
        self._last_snapshot_seq = -1
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._publish_forever(), name="kv-publish"),
                       asyncio.create_task(self._heartbeat_forever(), name="kv-heartbeat")]

    async def close(self) -> None:
        """Stop publishing and tell the index to forget this replica (graceful shutdown)."""
        for t in self._tasks:
            t.cancel()
        try:
            await self.stub.Forget(pb.ForgetRequest(instance_id=self.instance_id), timeout=2)
        except grpc.aio.AioRpcError as e:
            log.warning("could not deregister from the prefix index: %s", e.details())
        await self.channel.close()

    async def core_restarted(self, epoch: int) -> None:
        """A fresh core holds nothing: publish under a new epoch, starting with a snapshot."""
        self.epoch = epoch
        self._resync_pending = False
        try:
            await self.request_snapshot()
        except EngineDeadError:
            self._resync_pending = False  # the fresh core failed too; the next one resyncs again

    async def request_snapshot(self) -> None:
        if self._resync_pending:
            return
        self._resync_pending = True
        await self.engine.call(publish_kv_snapshot)

    async def _outgoing(self) -> AsyncIterator[pb.KVEventBatch]:
        while True:
            batch = await self.bridge.queue.get()
            is_snapshot = bool(batch.events) and isinstance(batch.events[0], AllCleared)
            if self._resync_pending and not is_snapshot:
                continue  # superseded by the snapshot on its way
            if is_snapshot:
                self._resync_pending = False
                self._last_snapshot_seq = batch.seq
            yield batch_to_proto(batch, instance_id=self.instance_id, epoch=self.epoch,
                                 namespace=self.namespace, address=self.address)

    async def _publish_forever(self) -> None:
        backoff = 0.2
        while True:
            try:
                call = self.stub.Publish(self._outgoing())
                await self.request_snapshot()  # the index may have missed anything before this stream
                async for ack in call:
                    backoff = 0.2
                    # Acks for batches sent before the last snapshot are already answered by it.
                    if ack.resync_required and ack.seq > self._last_snapshot_seq:
                        await self.request_snapshot()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.warning("prefix index stream broken (%s): %s; retrying", e.code().name, e.details())
            self._resync_pending = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _heartbeat_forever(self) -> None:
        while True:
            req = pb.HeartbeatRequest(instance_id=self.instance_id, epoch=self.epoch, namespace=self.namespace,
                                      ttl_seconds=self.heartbeat_ttl_s, address=self.address)
            try:
                resp = await self.stub.Heartbeat(req, timeout=self.heartbeat_interval_s)
                if resp.resync_required:
                    await self.request_snapshot()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.warning("prefix index heartbeat failed (%s): %s", e.code().name, e.details())
            await asyncio.sleep(self.heartbeat_interval_s)
