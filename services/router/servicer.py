"""The Router gRPC servicer: model choice, replica choice, streaming and failover.

A request is routed in three steps: ``ModelPolicy`` names the model, ``Picker`` names
the replica, and the engine's stream is passed through message by message. When the
replica fails with UNAVAILABLE, INTERNAL or UNKNOWN, or freezes (answers no health check
for ``stream_stall_timeout_s``, liveness.py), before its first message, nothing has
reached the caller yet, so the request is retried on another healthy replica (at most
``max_failovers`` times) and the failed one leaves its pool until a health check brings
it back. After the first message a failure cannot be hidden (the caller holds part of
the output): the stream ends with UNAVAILABLE naming the engine. A replica whose waiting queue is full
(RESOURCE_EXHAUSTED) stays in its pool; the next one with room is tried, and when none
has room the caller gets RESOURCE_EXHAUSTED with a retry hint. When the caller goes away or its
deadline passes, the engine call is cancelled, which aborts the request on the engine.

Escalation: when ``auto`` chose a small model and a large one is healthy, the small
model's first tokens are judged and a low-confidence answer is replaced by the large
model's (the rule lives in ``escalation``, shared with the gateway's direct stream).

``Embed`` routes an embedding batch: the named model (never ``auto``), a replica picked
like a prompt's (on the first input's tokens), and the whole batch retried on another
replica after UNAVAILABLE or an overload, since an embedding has no partial output.

``Route`` makes the same decisions without streaming: the model, the replicas to try in
order, the engine request and the escalation plan, for a gateway that streams from the
engine itself (docs/routing.md). Its failovers and escalations are the gateway's to run;
the router's load view then comes from its Load polls alone. When the answer cannot depend
on the request (``reusable``), it says for how long the gateway may reuse it
(``decision_reuse_ms``), which takes the Route round trip off that model's next requests.
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

from llmesh.errors import ServiceError, invalid_argument, status_for
from llmesh.router import metrics
from llmesh.router.escalation import (
    FAILOVER_CODES,
    OVERLOAD_CODES,
    EscalationRule,
    Overloads,
    Verdict,
    escalating,
    exhausted_error,
    judged_sampling,
    midstream_error,
    refused_error,
)
from llmesh.router.liveness import ReplicaFrozen, until_frozen
from llmesh.router.picker import Picker
from llmesh.router.policy import AUTO, Decision, ModelPolicy, engine_request
from llmesh.router.replicas import Fleet, Replica
from llmesh.v1 import common_pb2, engine_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)



def _failure(e: grpc.aio.AioRpcError | ReplicaFrozen) -> tuple[grpc.StatusCode, str]:
    """The status and message of a failed engine stream (a frozen replica counts as UNAVAILABLE)."""
    if isinstance(e, ReplicaFrozen):
        return grpc.StatusCode.UNAVAILABLE, f"the engine stopped answering: {e}"
    return e.code(), e.details() or e.code().name


def reusable(decision: Decision, target: router_pb2.RouteTarget) -> bool:
    """Whether a Route answer holds for any request naming the same model: the model came from
    the name alone (not ``auto``'s reading of the prompt) and one healthy replica was left to
    pick (no prefix match or load comparison, no failover list)."""
    return (decision.reason in ("explicit", "default") and target.pick_reason == "only_replica"
            and len(target.candidates) == 1)


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining deadline in seconds (None when it set none)."""
    left = context.time_remaining()
    if left is None or left > 1e8:
        return None
    return max(left, 0.0)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, fleet: Fleet, policy: ModelPolicy, picker: Picker, *, max_failovers: int,
                 escalation_tokens: int = 0, escalation_threshold: float = -2.5,
                 decision_reuse_ms: int = 0) -> None:
        self.fleet = fleet
        self.policy = policy
        self.picker = picker
        self.max_failovers = max_failovers
        self.decision_reuse_ms = decision_reuse_ms
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

    async def Route(self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
                    ) -> router_pb2.RouteDecision:
        """The route ``Generate`` would take, for a caller that streams from the engine itself."""
        model, code = request.model or "default", "OK"
        request_id = request.request_id or uuid.uuid4().hex
        try:
            decision = self.policy.decide(request)
            model = decision.model
            metrics.DECISIONS.labels(decision.model, decision.reason).inc()
            large = self._escalation_target(request, decision)
            rule = self._rule(request) if large is not None else None
            out = router_pb2.RouteDecision(max_failovers=self.max_failovers)
            out.target.CopyFrom(await self._target(
                request, request_id, decision.model, decision.reason,
                None if rule is None else judged_sampling(rule, request.sampling)))
            if large is None and reusable(decision, out.target):
                out.reuse_ms = self.decision_reuse_ms
            if rule is not None and large is not None:
                out.escalation.large.CopyFrom(await self._target(request, request_id, large, "auto_escalated"))
                out.escalation.tokens = rule.tokens
                out.escalation.threshold = rule.threshold
                out.escalation.strip_logprobs = rule.strip_logprobs
            trace.get_current_span().set_attributes({
                "llmesh.model": decision.model, "llmesh.model_reason": decision.reason,
                "llmesh.request_id": request_id, "llmesh.replica": out.target.candidates[0].replica,
                "llmesh.matched_blocks": out.target.matched_blocks, "llmesh.pick_reason": out.target.pick_reason,
                "llmesh.escalation_planned": large is not None})
            return out
        except Exception as e:
            mapped = status_for(e)
            code = mapped[0].name if mapped else "INTERNAL"
            raise
        finally:
            metrics.ROUTES.labels(model, code).inc()

    async def _target(self, request: router_pb2.RouteRequest, request_id: str, model: str, reason: str,
                      sampling: common_pb2.SamplingParams | None = None) -> router_pb2.RouteTarget:
        pool = self.fleet.pool(model)
        assert pool is not None  # the policy only names models of the models file
        engine_req = engine_request(request, request_id, model, sampling)
        picks = await self.picker.candidates(pool, engine_req.prompt_token_ids, request.cache_salt,
                                             self.max_failovers + 1)
        metrics.PICKS.labels(model, picks[0].reason).inc()
        metrics.MATCHED_BLOCKS.observe(picks[0].matched_blocks)
        return router_pb2.RouteTarget(
            model=model, reason=reason, request=engine_req, matched_blocks=picks[0].matched_blocks,
            pick_reason=picks[0].reason,
            candidates=[router_pb2.RouteCandidate(address=p.replica.address, replica=p.replica.name)
                        for p in picks])

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

    def _rule(self, request: router_pb2.RouteRequest) -> EscalationRule:
        return EscalationRule(self.escalation_tokens, self.escalation_threshold,
                              strip_logprobs=not request.sampling.HasField("logprobs"))

    async def _escalating(self, request: router_pb2.RouteRequest, request_id: str, small: str, large: str,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.GenerateResponse]:
        """Run ``small``, judge its first tokens, and either pass it on or answer from ``large``."""
        t0 = time.perf_counter()
        rule = self._rule(request)
        stream = self._stream(request, request_id, small, context, sampling=judged_sampling(rule, request.sampling),
                              t0=t0, observe_ttft=False)

        def on_verdict(v: Verdict) -> None:
            record_verdict(small, large, rule, v, request_id)
            if not v.escalate:
                metrics.TTFT.labels(small).observe(time.perf_counter() - t0)

        async for msg in escalating(rule, stream, lambda: self._stream(request, request_id, large, context, t0=t0),
                                    on_verdict):
            yield msg

    async def _stream(self, request: router_pb2.RouteRequest, request_id: str, model: str,
                      context: grpc.aio.ServicerContext, *, sampling: common_pb2.SamplingParams | None = None,
                      t0: float | None = None, observe_ttft: bool = True
                      ) -> AsyncIterator[common_pb2.GenerateResponse]:
        pool = self.fleet.pool(model)
        assert pool is not None  # the policy only names models of the models file
        engine_req = engine_request(request, request_id, model, sampling)
        prompt = engine_req.prompt_token_ids
        span = trace.get_current_span()
        t0 = time.perf_counter() if t0 is None else t0
        tried: set[str] = set()
        overloads = Overloads()
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
            call = replica.engine.Generate(engine_req, timeout=_remaining(context))
            try:
                async with contextlib.aclosing(until_frozen(call, replica.liveness)) as messages:
                    async for msg in messages:
                        if not sent_any:
                            sent_any = True
                            if observe_ttft:
                                metrics.TTFT.labels(model).observe(time.perf_counter() - t0)
                        if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED and not msg.replica:
                            msg.replica = replica.name
                        yield msg
                return
            except (grpc.aio.AioRpcError, ReplicaFrozen) as e:
                code, details = _failure(e)
                if sent_any:
                    raise self._midstream_failure(model, replica, code, details) from None
                if code in OVERLOAD_CODES:
                    overloads.add(replica.name, replica.address, e)
                    metrics.OVERLOADED.labels(model).inc()
                    if attempt == self.max_failovers or not any(
                            r.address not in tried for r in pool.healthy()):
                        raise overloads.error(model) from None
                    span.add_event("overloaded", {"llmesh.replica": replica.name})
                    continue
                if code not in FAILOVER_CODES:
                    raise refused_error(replica.name, replica.address, code, details) from None
                self.fleet.mark_unhealthy(replica, f"Generate: {code.name}: {details}")
                others = [r for r in pool.healthy() if r.address not in tried]
                if attempt == self.max_failovers or not others:
                    if overloads.refusals:  # a full replica is a retryable overload, not a failure
                        raise overloads.error(model) from None
                    raise exhausted_error(model, replica.name, replica.address, code, details, attempt) from None
                metrics.FAILOVERS.labels(model).inc()
                span.add_event("failover", {"llmesh.replica": replica.name, "llmesh.error": details})
                log.warning("failover", extra={"model": model, "replica": replica.name,
                                               "address": replica.address, "error": details,
                                               "request_id": engine_req.request_id})
            finally:
                replica.inflight -= 1
                call.cancel()

    def _midstream_failure(self, model: str, replica: Replica, code: grpc.StatusCode, details: str
                           ) -> ServiceError:
        metrics.MIDSTREAM_FAILURES.labels(model).inc()
        if code in FAILOVER_CODES:
            self.fleet.mark_unhealthy(replica, f"Generate: {code.name}: {details}")
        return midstream_error(replica.name, replica.address, code, details)

    async def Embed(self, request: router_pb2.RouterEmbedRequest, context: grpc.aio.ServicerContext
                    ) -> engine_pb2.EmbedResponse:
        model, code = request.model or "default", "OK"
        try:
            if request.model == AUTO:
                raise invalid_argument("Embed needs a model name: embeddings of different models are not comparable, "
                                       f"so {AUTO!r} is not taken")
            model = self.policy.decide(router_pb2.RouteRequest(model=request.model)).model
            return await self._embed(model, request.request, context)
        except Exception as e:
            mapped = status_for(e)
            code = mapped[0].name if mapped else "INTERNAL"
            raise
        finally:
            metrics.REQUESTS.labels(model, code).inc()

    async def _embed(self, model: str, engine_request: engine_pb2.EngineEmbedRequest,
                     context: grpc.aio.ServicerContext) -> engine_pb2.EmbedResponse:
        pool = self.fleet.pool(model)
        assert pool is not None  # the policy only names models of the models file
        if not engine_request.request_id:
            engine_request.request_id = uuid.uuid4().hex
        first = engine_request.inputs[0].token_ids if engine_request.inputs else []
        span = trace.get_current_span()
        span.set_attributes({"llmesh.model": model, "llmesh.request_id": engine_request.request_id})
        tried: set[str] = set()
        overloads = Overloads()
        for attempt in range(self.max_failovers + 1):
            pick = await self.picker.pick(pool, first, engine_request.cache_salt, tried)
            replica = pick.replica
            tried.add(replica.address)
            span.set_attributes({"llmesh.replica": replica.name, "llmesh.matched_blocks": pick.matched_blocks,
                                 "llmesh.pick_reason": pick.reason, "llmesh.attempt": attempt})
            metrics.PICKS.labels(model, pick.reason).inc()
            replica.inflight += 1
            try:
                resp = await replica.engine.Embed(engine_request, timeout=_remaining(context))
                resp.replica = resp.replica or replica.name
                return resp
            except grpc.aio.AioRpcError as e:
                code, details = _failure(e)
                others = [r for r in pool.healthy() if r.address not in tried]
                if code in OVERLOAD_CODES:
                    overloads.add(replica.name, replica.address, e)
                    metrics.OVERLOADED.labels(model).inc()
                    if attempt == self.max_failovers or not others:
                        raise overloads.error(model) from None
                    continue
                if code not in FAILOVER_CODES:
                    raise refused_error(replica.name, replica.address, code, details) from None
                self.fleet.mark_unhealthy(replica, f"Embed: {code.name}: {details}")
                if attempt == self.max_failovers or not others:
                    if overloads.refusals:
                        raise overloads.error(model) from None
                    raise exhausted_error(model, replica.name, replica.address, code, details, attempt) from None
                metrics.FAILOVERS.labels(model).inc()
                span.add_event("failover", {"llmesh.replica": replica.name, "llmesh.error": details})
            finally:
                replica.inflight -= 1
        raise AssertionError("unreachable: the last attempt returns or raises")

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


def record_verdict(small: str, large: str, rule: EscalationRule, verdict: Verdict, request_id: str) -> None:
    """Metrics, span event and log line of one escalation verdict."""
    metrics.CONFIDENCE.labels(small).observe(verdict.confidence)
    if not verdict.escalate:
        metrics.ESCALATION_CHECKS.labels(small, "kept").inc()
        return
    metrics.ESCALATION_CHECKS.labels(small, "escalated").inc()
    metrics.ESCALATIONS.labels(small, large).inc()
    metrics.DECISIONS.labels(large, "auto_escalated").inc()
    span = trace.get_current_span()
    span.add_event("escalated", {
        "llmesh.from_model": small, "llmesh.to_model": large, "llmesh.confidence": verdict.confidence,
        "llmesh.threshold": rule.threshold, "llmesh.judged_tokens": verdict.judged})
    span.set_attribute("llmesh.model", large)
    log.info("escalated", extra={"request_id": request_id, "from_model": small, "to_model": large,
                                 "confidence": round(verdict.confidence, 4), "threshold": rule.threshold})
