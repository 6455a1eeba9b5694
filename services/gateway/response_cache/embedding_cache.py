"""The embedding cache: each input's vector kept in Redis, so a repeated input is embedded once.

An Embed call is cached input by input, not as a batch: clients re-send documents in
ever different batches (a re-index, a retry of a larger batch), and what repeats is the
document. ``plan`` keys every input (``key.embedding_key``: tenant, model and revision,
token ids, ``dimensions``) and applies the same switches as generation (the API key's
policy, the request's mode); ``lookup`` fetches every key in one round trip within the
store's bound; ``store_later`` writes the vectors the engine computed in one pipelined
round trip, off the request's path. Values are the vector's packed little-endian float32
bytes, nothing else (4 bytes a dimension: a 1024-dimension vector is 4 KiB).

Nothing here raises on a Redis that fails or holds a damaged value: that input is a miss.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

from llmesh.gateway import metrics
from llmesh.gateway.caller import Caller
from llmesh.gateway.response_cache.config import ResponseCacheConfig
from llmesh.gateway.response_cache.key import embedding_key
from llmesh.gateway.response_cache.policy import Decision, decide
from llmesh.gateway.response_cache.revision import ModelRevisions
from llmesh.gateway.response_cache.store import TenantStore
from llmesh.telemetry import tracer

_tracer = tracer("llmesh.gateway")


@dataclasses.dataclass(frozen=True)
class EmbedPlan:
    tenant: str
    model: str
    digests: tuple[str, ...]
    """One per input, in input order."""
    decision: Decision
    width: int
    """Bytes of each vector when the request fixes them (``dimensions``); 0 when only the
    model knows (its full vectors)."""


class EmbeddingCache:
    def __init__(self, store: TenantStore, revisions: ModelRevisions, secret: bytes,
                 config: ResponseCacheConfig) -> None:
        """The response cache's store, revisions and secret: one Redis, one key scheme."""
        self._store = store
        self._revisions = revisions
        self._secret = secret
        self._config = config
        self._background: set[asyncio.Task] = set()

    def plan(self, model: str, inputs: Sequence[Sequence[int]], dimensions: int | None, caller: Caller,
             mode: int) -> EmbedPlan | None:
        """The cache's part in one Embed call (a checked mode); None leaves it alone."""
        decision = decide(self._config.response_cache_ttl_s, caller.response_cache, mode)
        if decision is None:
            return _skipped(model, "off")
        revision = self._revisions.of(model)
        if revision is None:
            return _skipped(model, "unknown_model")
        digests = tuple(embedding_key(self._secret, tenant=caller.tenant, model=model, revision=revision,
                                      token_ids=ids, dimensions=dimensions).digest for ids in inputs)
        return EmbedPlan(caller.tenant, model, digests, decision, 4 * (dimensions or 0))

    async def lookup(self, plan: EmbedPlan) -> dict[int, bytes]:
        """The stored vectors by input position (empty when Redis failed: every input misses)."""
        model = plan.model
        with _tracer.start_as_current_span("gateway.embedding_cache.lookup",
                                           attributes={"llmesh.model": model,
                                                       "llmesh.inputs": len(plan.digests)}) as span:
            got = await self._store.get_many(plan.tenant, plan.digests)
            if got.error:
                metrics.EMBEDDING_CACHE_ERRORS.labels(model, "lookup").inc()
                span.set_attributes({"llmesh.embedding_cache.error": got.error})
                return {}
            found = {i: v for i, v in enumerate(got.values) if v is not None}
            damaged = [i for i, v in found.items() if not _well_formed(v, plan.width)]
            widths = {len(v) for i, v in found.items() if i not in damaged}
            if len(widths) > 1:  # vectors of one model and request disagree: none can be trusted
                damaged = list(found)
            for i in damaged:
                del found[i]
            if damaged:
                metrics.EMBEDDING_CACHE_ERRORS.labels(model, "decode").inc(len(damaged))
            metrics.EMBEDDING_CACHE_HITS.labels(model).inc(len(found))
            metrics.EMBEDDING_CACHE_MISSES.labels(model).inc(len(plan.digests) - len(found))
            span.set_attributes({"llmesh.embedding_cache.hits": len(found)})
            return found

    def distrust(self, plan: EmbedPlan, count: int) -> None:
        """``count`` stored vectors disagreed with the engine's width (the caller embeds them
        afresh, and stores them again)."""
        metrics.EMBEDDING_CACHE_ERRORS.labels(plan.model, "decode").inc(count)

    def store_later(self, plan: EmbedPlan, vectors: dict[int, bytes]) -> None:
        """Store the engine's vectors (by input position), in the background."""
        if not vectors or not plan.decision.store:
            return
        # Inputs repeated within one batch share a digest: one SET each.
        items = list({plan.digests[i]: v for i, v in vectors.items()}.items())
        task = asyncio.ensure_future(self._put(plan, items))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put(self, plan: EmbedPlan, items: list[tuple[str, bytes]]) -> None:
        error = await self._store.put_many(plan.tenant, items, plan.decision.ttl_s)
        if error:
            metrics.EMBEDDING_CACHE_ERRORS.labels(plan.model, "store").inc()
            return
        metrics.EMBEDDING_CACHE_STORES.labels(plan.model).inc(len(items))
        metrics.EMBEDDING_CACHE_STORED_BYTES.labels(plan.model).inc(sum(len(v) for _, v in items))


def _well_formed(value: bytes, width: int) -> bool:
    return bool(value) and len(value) % 4 == 0 and (not width or len(value) == width)


def _skipped(model: str, reason: str) -> None:
    metrics.EMBEDDING_CACHE_SKIPPED.labels(model, reason).inc()
    return None
