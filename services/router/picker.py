"""Replica choice: prefix-cache hits against load.

For each healthy candidate the picker hashes the prompt's full blocks exactly as that
engine will (``llmesh.prefix_hash``, the engine's block size and model namespace, the
request's cache salt), asks the prefix-cache index how many leading blocks each replica
holds, and scores

    score = matched_blocks × cache_weight − load_weight × (waiting + running + kv_used / kv_total)

(``waiting + running`` is at least the router's own in-flight count, because Load is
polled and lags a burst). The best score wins; ties go to the least loaded replica,
then round-robin. The index is advisory: without one, when it fails or is slower than
``index_timeout_s``, replicas are chosen by load alone. With one candidate there is no
choice to make, so the index is not asked.

With ``policy="round_robin"`` the picker ignores the index and the load and takes the
healthy candidates in turn (reason ``round_robin``): the baseline that
``bench/routing.py`` compares cache-aware routing against.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import grpc

from llmesh.errors import unavailable
from llmesh.prefix_hash import hash_prefix_blocks
from llmesh.router import metrics
from llmesh.router.escalation import engine_where
from llmesh.router.replicas import CHANNEL_OPTIONS, Replica, ReplicaPool
from llmesh.telemetry import client_interceptors
from llmesh.tls import TLSConfig, aio_channel
from llmesh.v1 import prefix_index_pb2, prefix_index_pb2_grpc

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pick:
    """The chosen replica, how many prompt blocks it already holds, and why it won."""

    replica: Replica
    matched_blocks: int
    reason: str
    """``prefix_cache`` (it holds part of the prompt), ``least_loaded``, ``only_replica`` or ``round_robin``."""
    score: float


class Picker:
    def __init__(self, index_address: str | None, *, cache_weight: float, load_weight: float,
                 index_timeout_s: float, policy: str = "cache_aware", tls: TLSConfig | None = None) -> None:
        self.policy = policy
        self.cache_weight = cache_weight
        self.load_weight = load_weight
        self.index_timeout_s = index_timeout_s
        self._channel = None
        self._index = None
        if index_address:
            self._channel = aio_channel(index_address, tls, options=CHANNEL_OPTIONS,
                                        interceptors=client_interceptors())
            self._index = prefix_index_pb2_grpc.PrefixIndexStub(self._channel)
        self._turn = 0

    async def pick(self, pool: ReplicaPool, prompt_ids: Sequence[int], cache_salt: str,
                   exclude: set[str] = frozenset()) -> Pick:
        """The best healthy replica of ``pool`` not in ``exclude`` (addresses); UNAVAILABLE when none."""
        candidates = [r for r in pool.healthy() if r.address not in exclude]
        if not candidates:
            raise unavailable(_none_left(pool, exclude))
        if len(candidates) == 1:
            r = candidates[0]
            return Pick(r, 0, "only_replica", -self.load_weight * r.load_value())
        if self.policy == "round_robin":
            self._turn += 1
            return Pick(candidates[self._turn % len(candidates)], 0, "round_robin", 0.0)
        matched = await self._matched_blocks(candidates, prompt_ids, cache_salt)
        # A replica that left discovery while the index answered is draining: its channels
        # close once its last stream ends, so it takes nothing new.
        candidates = [r for r in candidates if not r.retired]
        if not candidates:
            return await self.pick(pool, prompt_ids, cache_salt, exclude)
        scored = [(matched.get(r.address, 0) * self.cache_weight - self.load_weight * r.load_value(),
                   -r.load_value(), r) for r in candidates]
        best = max((s, load) for s, load, _ in scored)
        ties = [r for s, load, r in scored if (s, load) == best]
        self._turn += 1
        chosen = ties[self._turn % len(ties)]
        blocks = matched.get(chosen.address, 0)
        return Pick(chosen, blocks, "prefix_cache" if blocks else "least_loaded", best[0])

    async def candidates(self, pool: ReplicaPool, prompt_ids: Sequence[int], cache_salt: str,
                         limit: int) -> list[Pick]:
        """At most ``limit`` replicas to try in order: ``pick``'s choice, then the other
        healthy replicas of the pool, least loaded first (failovers, reason ``failover``)."""
        first = await self.pick(pool, prompt_ids, cache_salt)
        rest = sorted((r for r in pool.healthy() if r is not first.replica), key=lambda r: r.load_value())
        return [first, *(Pick(r, 0, "failover", -self.load_weight * r.load_value()) for r in rest[:limit - 1])]

    async def _matched_blocks(self, candidates: list[Replica], prompt_ids: Sequence[int],
                              cache_salt: str) -> dict[str, int]:
        """Leading blocks each candidate holds, by address ({} without an answer)."""
        if self._index is None:
            return {}
        groups: dict[tuple[int, str], list[Replica]] = {}
        for r in candidates:
            assert r.info is not None  # pool.healthy() only lists replicas with Info
            groups.setdefault((r.info.block_size, r.info.model), []).append(r)
        out: dict[str, int] = {}
        for (block_size, namespace), members in groups.items():
            hashes = hash_prefix_blocks(list(prompt_ids), block_size, namespace, salt=cache_salt or None)
            if not hashes:
                continue
            try:
                resp = await self._index.Match(
                    prefix_index_pb2.MatchRequest(namespace=namespace, block_hashes=hashes),
                    timeout=self.index_timeout_s)
            except grpc.aio.AioRpcError as e:
                metrics.INDEX_ERRORS.labels(e.code().name).inc()
                log.debug("prefix index Match failed: %s %s", e.code().name, e.details())
                return {}
            by_id = {r.info.instance_id: r for r in members if r.info}
            by_addr = {r.address: r for r in members}
            for m in resp.replicas:
                r = by_id.get(m.instance_id) or by_addr.get(m.address)
                if r is not None:
                    out[r.address] = max(out.get(r.address, 0), m.matched_blocks)
        return out

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _none_left(pool: ReplicaPool, exclude: set[str]) -> str:
    if not pool.replicas:
        return (f"model {pool.model!r} has no replica addresses in the models file "
                f"(is its engine started, e.g. by `llmesh up`?)")
    states = "; ".join(
        f"{engine_where(r.name, r.address)}: "
        f"{'failed for this request' if r.address in exclude else (r.last_error or 'starting')}"
        for r in pool.replicas if not (r.healthy and r.address not in exclude))
    return f"no healthy replica of model {pool.model!r} ({len(pool.replicas)} configured; {states})"
