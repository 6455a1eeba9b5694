"""The PrefixIndex gRPC servicer: Publish, Heartbeat, Match, Forget over ``PrefixIndex``.

Besides the RPCs it runs two background loops: a sweep that purges replicas whose
liveness expired (so Redis does not keep dead replicas' blocks forever), and a Redis
probe that reports the service NOT_SERVING while Redis is down and SERVING once it is
back (the client reconnects by itself).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable

import grpc

from llmesh.prefix_cache import metrics
from llmesh.prefix_cache.index import Action, IndexUnavailable, PrefixIndex
from llmesh.v1 import prefix_index_pb2 as pb
from llmesh.v1 import prefix_index_pb2_grpc

log = logging.getLogger(__name__)


class PrefixIndexServicer(prefix_index_pb2_grpc.PrefixIndexServicer):
    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self._tasks: set[asyncio.Task] = set()

    async def Publish(self, request_iterator: AsyncIterator[pb.KVEventBatch],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PublishAck]:
        async for batch in request_iterator:
            try:
                res = await self.index.apply_batch(batch)
            except IndexUnavailable:
                metrics.REDIS_ERRORS.labels("Publish").inc()
                raise
            d = res.decision
            metrics.BATCHES.labels(d.reason).inc()
            if res.resync_required:
                metrics.RESYNCS.labels(d.reason).inc()
                log.info("resync required", extra={"instance_id": batch.instance_id, "epoch": batch.epoch,
                                                   "seq": batch.seq, "reason": d.reason})
            elif d.action is not Action.IGNORE:
                metrics.EVENTS.labels("stored").inc(res.stored)
                metrics.EVENTS.labels("removed").inc(res.removed)
                metrics.EVENTS.labels("cleared").inc(res.cleared)
            yield pb.PublishAck(seq=res.seq, resync_required=res.resync_required)

    async def Heartbeat(self, request: pb.HeartbeatRequest,
                        context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        try:
            res = await self.index.heartbeat(request)
        except IndexUnavailable:
            metrics.REDIS_ERRORS.labels("Heartbeat").inc()
            raise
        outcome = "stale" if res.stale else ("resync" if res.resync_required else "ok")
        metrics.HEARTBEATS.labels(outcome).inc()
        if res.resync_required:
            metrics.RESYNCS.labels("heartbeat").inc()
        return pb.HeartbeatResponse(resync_required=res.resync_required)

    async def Match(self, request: pb.MatchRequest, context: grpc.aio.ServicerContext) -> pb.MatchResponse:
        t0 = time.perf_counter()
        try:
            res = await self.index.match(request.namespace, list(request.block_hashes))
        except IndexUnavailable:
            metrics.REDIS_ERRORS.labels("Match").inc()
            raise
        if res.expired:
            self._spawn(self._purge(res.expired, "expired"))
        metrics.MATCH_SECONDS.observe(time.perf_counter() - t0)
        metrics.MATCH_BEST_BLOCKS.observe(res.hits[0].matched_blocks if res.hits else 0)
        metrics.MATCH_REQUESTS.labels("true" if res.hits else "false").inc()
        return pb.MatchResponse(replicas=[
            pb.ReplicaMatch(instance_id=h.instance_id, matched_blocks=h.matched_blocks, address=h.address)
            for h in res.hits])

    async def Forget(self, request: pb.ForgetRequest, context: grpc.aio.ServicerContext) -> pb.ForgetResponse:
        try:
            removed = await self.index.forget(request.instance_id)
        except IndexUnavailable:
            metrics.REDIS_ERRORS.labels("Forget").inc()
            raise
        metrics.PURGES.labels("forget").inc()
        log.info("forgot replica", extra={"instance_id": request.instance_id, "removed_blocks": removed})
        return pb.ForgetResponse(removed_blocks=removed)

    # background work -------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _purge(self, instances: list[str], reason: str) -> None:
        for inst in instances:
            try:
                removed = await self.index.forget(inst)
            except IndexUnavailable as e:
                log.warning("purge failed", extra={"instance_id": inst, "error": e.message})
                return
            metrics.PURGES.labels(reason).inc()
            log.info("purged replica", extra={"instance_id": inst, "reason": reason, "removed_blocks": removed})

    async def sweep_loop(self, interval_s: float) -> None:
        """Purge replicas whose liveness expired, every ``interval_s`` seconds."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                expired = await self.index.expired_instances()
            except IndexUnavailable:
                continue
            if expired:
                await self._purge(expired, "expired")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.index.close()
