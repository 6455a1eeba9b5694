"""The Router gRPC servicer: model choice, replica choice, streaming and failover.

A request is routed in three steps: ``ModelPolicy`` names the model, ``Picker`` names
the replica, and the engine's stream is passed through message by message. When the
replica fails with UNAVAILABLE before its first message, nothing has reached the caller
yet, so the request is retried on another healthy replica (at most ``max_failovers``
times) and the failed one leaves its pool until a health check brings it back. After
the first message a failure cannot be hidden (the caller holds part of the output): the
stream ends with UNAVAILABLE naming the replica. When the caller goes away or its
deadline passes, the engine call is cancelled, which aborts the request on the engine.

Escalation: when ``auto`` chose a small model and a large one is healthy, the small
model runs with per-token log-probabilities on, and its first ``escalation_tokens``
tokens are held back. Their mean log-probability is its confidence: under
``escalation_threshold`` the small request is cancelled (the engine aborts it) and the
large model answers from scratch, so the caller only ever sees the large model's
stream; otherwise the held messages are sent and the stream goes on. Log-probabilities
the caller did not ask for are stripped. A small stream that ends before that many
tokens is judged on the tokens it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from llmesh.errors import ServiceError, status_for, unavailable
from llmesh.router import metrics
from llmesh.router.picker import Picker
from llmesh.router.policy import AUTO, Decision, ModelPolicy, prompt_tokens
from llmesh.router.replicas import Fleet, Replica
from llmesh.v1 import common_pb2, engine_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})
"""Codes that mean "this replica could not take the request" (dead, shutting down)."""
REPLICA_FAULT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN,
                                 grpc.StatusCode.INTERNAL})
"""Codes that, after the first token, are reported as the replica's failure."""


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining deadline in seconds (None when it set none)."""
    left = context.time_remaining()
    if left is None or left > 1e8:
        return None
    return max(left, 0.0)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, fleet: Fleet, policy: ModelPolicy, picker: Picker, *, max_failovers: int,
                 escalation_tokens: int = 0, escalation_threshold: float = -2.5) -> None:
        self.fleet = fleet
        self.policy = policy
        self.picker = picker
        self.max_failovers = max_failovers
        self.escalation_tokens = escalation_tokens
        self.escalation_threshold = escalation_threshold

    async def Generate(self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[common_pb2.GenerateResponse]:
        model, code = request.model or "default", "OK"
        request_id = request.request_id or uuid.uuid4().hex
        try:
            decision = self.policy.decide(request)
            model = decision.model
            metrics.DECISIONS.labels(decision.model, decision.reason).inc()
            trace.get_current_span().set_attributes({
                "llmesh.model": decision.model, "llmesh.model_reason": decision.reason,
                "llmesh.request_id": request_id})
            large = self._escalation_target(request, decision)
            stream = (self._stream(request, request_id, decision.model, context) if large is None else
                      self._escalating(request, request_id, decision.model, large, context))
            async with contextlib.aclosing(stream):
                async for msg in stream:
                    model = msg.model or model
                    yield msg
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as e:
            mapped = status_for(e)
            code = mapped[0].name if mapped else "INTERNAL"
            raise
        finally:
            metrics.REQUESTS.labels(model, code).inc()

    def _escalation_target(self, request: router_pb2.RouteRequest, decision: Decision) -> str | None:
        """The large model an ``auto`` request may escalate to, or None (no escalation)."""
        if (request.model != AUTO or self.escalation_tokens <= 0 or decision.reason.endswith("_fallback")
                or decision.model not in self.policy.by_class["small"]):
            return None
        for name in self.policy.by_class["large"]:
            pool = self.fleet.pool(name)
            if pool is not None and pool.healthy():
                return name
        return None

    async def _escalating(self, request: router_pb2.RouteRequest, request_id: str, small: str, large: str,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Run ``small``, judge its first tokens, and either pass it on or answer from ``large``."""
        t0 = time.perf_counter()
        caller_logprobs = request.sampling.HasField("logprobs")
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if not caller_logprobs:
            sampling.logprobs = 0
        held: list[common_pb2.GenerateResponse] = []
        logprobs: list[float] = []
        confidence: float | None = None
        stream = self._stream(request, request_id, small, context, sampling=sampling, t0=t0, observe_ttft=False)
        async with contextlib.aclosing(stream):
            async for msg in stream:
                if confidence is None:
                    logprobs.extend(lp.logprob for lp in msg.logprobs)
                if not caller_logprobs:
                    del msg.logprobs[:]
                if confidence is not None:
                    yield msg
                    continue
                held.append(msg)
                done = msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                if len(logprobs) < self.escalation_tokens and not done:
                    continue
                judged = logprobs[:self.escalation_tokens]
                confidence = sum(judged) / len(judged) if judged else 0.0
                metrics.CONFIDENCE.labels(small).observe(confidence)
                if confidence < self.escalation_threshold:
                    break
                metrics.ESCALATION_CHECKS.labels(small, "kept").inc()
                metrics.TTFT.labels(small).observe(time.perf_counter() - t0)
                for m in held:
                    yield m
                held = []
        if confidence is None:  # the stream ended without a last message: pass on what came
            for m in held:
                yield m
            return
        if confidence >= self.escalation_threshold:
            return
        metrics.ESCALATION_CHECKS.labels(small, "escalated").inc()
        metrics.ESCALATIONS.labels(small, large).inc()
        metrics.DECISIONS.labels(large, "auto_escalated").inc()
        trace.get_current_span().add_event("escalated", {
            "llmesh.from_model": small, "llmesh.to_model": large, "llmesh.confidence": confidence,
            "llmesh.threshold": self.escalation_threshold, "llmesh.judged_tokens": len(judged)})
        trace.get_current_span().set_attribute("llmesh.model", large)
        log.info("escalated", extra={"request_id": request_id, "from_model": small, "to_model": large,
                                     "confidence": round(confidence, 4), "threshold": self.escalation_threshold})
        async for msg in self._stream(request, request_id, large, context, t0=t0):
            yield msg

    async def _stream(self, request: router_pb2.RouteRequest, request_id: str, model: str,
                      context: grpc.aio.ServicerContext, *, sampling: common_pb2.SamplingParams | None = None,
                      t0: float | None = None, observe_ttft: bool = True
                      ) -> AsyncIterator[common_pb2.GenerateResponse]:
        pool = self.fleet.pool(model)
        assert pool is not None  # the policy only names models of the models file
        prompt = prompt_tokens(request, model)
        engine_request = engine_pb2.EngineGenerateRequest(
            request_id=request_id, prompt_token_ids=prompt,
            sampling=request.sampling if sampling is None else sampling,
            priority=request.priority, cache_salt=request.cache_salt)
        span = trace.get_current_span()
        t0 = time.perf_counter() if t0 is None else t0
        tried: set[str] = set()
        for attempt in range(self.max_failovers + 1):
            pick = await self.picker.pick(pool, prompt, request.cache_salt, tried)
            replica = pick.replica
            tried.add(replica.address)
            span.set_attributes({"llmesh.replica": replica.name, "llmesh.matched_blocks": pick.matched_blocks,
                                 "llmesh.pick_reason": pick.reason, "llmesh.attempt": attempt})
            metrics.PICKS.labels(model, pick.reason).inc()
            metrics.MATCHED_BLOCKS.observe(pick.matched_blocks)
            sent_any = False
            replica.inflight += 1
            call = replica.engine.Generate(engine_request, timeout=_remaining(context))
            try:
                async for msg in call:
                    if not sent_any:
                        sent_any = True
                        if observe_ttft:
                            metrics.TTFT.labels(model).observe(time.perf_counter() - t0)
                    if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED and not msg.replica:
                        msg.replica = replica.name
                    yield msg
                return
            except grpc.aio.AioRpcError as e:
                if sent_any:
                    raise self._midstream_failure(model, replica, e) from None
                if e.code() not in FAILOVER_CODES:
                    raise ServiceError(e.code(), f"replica {replica.name} ({replica.address}): "
                                                 f"{e.details() or e.code().name}") from None
                self.fleet.mark_unhealthy(replica, f"Generate: {e.code().name}: {e.details()}")
                if attempt == self.max_failovers:
                    raise unavailable(f"model {model!r}: replica {replica.name} ({replica.address}) failed "
                                      f"before the first token ({e.details() or e.code().name}) and "
                                      f"{attempt} failover(s) failed too") from None
                metrics.FAILOVERS.labels(model).inc()
                span.add_event("failover", {"llmesh.replica": replica.name, "llmesh.error": e.details() or ""})
                log.warning("failover", extra={"model": model, "replica": replica.name,
                                               "address": replica.address, "error": e.details(),
                                               "request_id": engine_request.request_id})
            finally:
                replica.inflight -= 1
                call.cancel()

    def _midstream_failure(self, model: str, replica: Replica, e: grpc.aio.AioRpcError) -> ServiceError:
        metrics.MIDSTREAM_FAILURES.labels(model).inc()
        where = f"replica {replica.name} ({replica.address})"
        if e.code() not in REPLICA_FAULT_CODES:
            return ServiceError(e.code(), f"{where}: {e.details() or e.code().name}")
        if e.code() is grpc.StatusCode.UNAVAILABLE:
            self.fleet.mark_unhealthy(replica, f"Generate: {e.code().name}: {e.details()}")
        return unavailable(f"{where} failed after the first token ({e.code().name}: {e.details()}); "
                           f"the partial output cannot be resumed on another replica, retry the request")

    async def ListModels(self, request: router_pb2.RouterListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> router_pb2.RouterListModelsResponse:
        cards = []
        for spec in self.fleet.models.models:
            pool = self.fleet.pool(spec.name)
            assert pool is not None
            cards.append(router_pb2.ModelCard(
                name=spec.name, size_class=spec.size_class, max_model_len=pool.max_model_len(),
                healthy_replicas=len(pool.healthy()), replicas=spec.replicas))
        return router_pb2.RouterListModelsResponse(models=cards)
