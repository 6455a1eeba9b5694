"""Direct routing: ask the router where a request goes, then stream from the engine here.

The router's ``Route`` answers once per request with the model, the replicas to try in
order, the engine request and the escalation plan (or the gateway reuses an answer the router
said holds for a while, ``route_reuse``); the token stream then flows engine → gateway with no
hop through the router. Failover (before the first token) and escalation
follow the same rules as the router's own stream (``llmesh.router.escalation``), so the
caller sees the same messages and statuses in either mode. Nothing is reported back per
message: the router's load view comes from its Load polls.

One channel per engine address, created on first use and kept (with the tracing
interceptors, so the engine's span is a child of the gateway's, and the TLS settings the
router uses for engines). A client that goes away or whose deadline passes closes the
stream, which cancels the engine call and so aborts the request on the engine. An engine
that stops answering health checks (frozen) ends its streams with UNAVAILABLE, or is
failed over before the first token, like the router's own streams (``llmesh.router.liveness``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from grpc_health.v1 import health_pb2_grpc
from opentelemetry import trace

from llmesh.errors import ServiceError, unavailable
from llmesh.gateway import metrics
from llmesh.gateway.route_reuse import ReusableRoutes
from llmesh.router.escalation import (
    FAILOVER_CODES,
    OVERLOAD_CODES,
    EscalationRule,
    Overloads,
    Verdict,
    escalating,
    exhausted_error,
    midstream_error,
    refused_error,
)
from llmesh.router.channels import CHANNEL_OPTIONS
from llmesh.router.liveness import LivenessProbe, ReplicaFrozen, until_frozen
from llmesh.telemetry import client_interceptors
from llmesh.tls import TLSConfig, aio_channel
from llmesh.v1 import common_pb2, engine_pb2_grpc, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


class EngineChannels:
    """One channel and Engine stub per engine address, reused by every request, and a
    liveness probe per address while streams read from it (on a channel of its own, without
    the tracing interceptors, so that probes do not flood the traces)."""

    def __init__(self, tls: TLSConfig | None, stall_timeout_s: float = 2.0) -> None:
        self._tls = tls
        self._stall_timeout_s = stall_timeout_s
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: dict[str, engine_pb2_grpc.EngineStub] = {}
        self._probes: dict[str, LivenessProbe] = {}

    def stub(self, address: str) -> engine_pb2_grpc.EngineStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self._tls, options=CHANNEL_OPTIONS, interceptors=client_interceptors())
            self._channels.append(channel)
            stub = self._stubs[address] = engine_pb2_grpc.EngineStub(channel)
        return stub

    def probe(self, address: str) -> LivenessProbe:
        probe = self._probes.get(address)
        if probe is None:
            channel = aio_channel(address, self._tls, options=CHANNEL_OPTIONS)
            self._channels.append(channel)
            probe = self._probes[address] = LivenessProbe(health_pb2_grpc.HealthStub(channel), self._stall_timeout_s)
        return probe

    async def close(self) -> None:
        for probe in self._probes.values():
            probe.close()
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._stubs.clear()
        self._probes.clear()


class DirectStreamer:
    """Route once through the router, stream from the engines directly."""

    def __init__(self, router: router_pb2_grpc.RouterStub, engines: EngineChannels,
                 reusable: ReusableRoutes | None = None) -> None:
        self._router = router
        self._engines = engines
        self._reusable = ReusableRoutes() if reusable is None else reusable

    async def stream(self, route: router_pb2.RouteRequest, timeout: Callable[[], float | None]
                     ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """``timeout()`` is the caller's remaining deadline (None: none), asked before each call."""
        decision = self._reusable.decision(route)
        reused = decision is not None
        if decision is None:
            decision = await self._route(route, timeout)
        sent_any = False
        try:
            # One generator between the engine's messages and the caller (each layer costs
            # every streamed message a resumption on the gateway's busy loop).
            async with contextlib.aclosing(self._messages(decision, reused, timeout)) as messages:
                async for msg in messages:
                    sent_any = True
                    yield msg
        except ServiceError as e:
            # A reused replica that failed before the first token: the router may know better
            # (it left the pool, another joined), so forget the grant and ask once. An answer
            # naming only the replica that just failed (its health check has not run yet) is
            # this request's error, and is not kept as a grant either.
            if not reused or sent_any or e.code != grpc.StatusCode.UNAVAILABLE:
                raise
            self._reusable.forget(route.model)
            trace.get_current_span().add_event("reused_route_failed", {"llmesh.error": str(e)})
            failed = [c.address for c in decision.target.candidates]
            decision = await self._router.Route(route, timeout=timeout())
            if [c.address for c in decision.target.candidates] == failed:
                raise
            self._reusable.remember(route, decision)
            async with contextlib.aclosing(self._messages(decision, False, timeout)) as messages:
                async for msg in messages:
                    yield msg

    async def _route(self, route: router_pb2.RouteRequest, timeout: Callable[[], float | None]
                     ) -> router_pb2.RouteDecision:
        decision = await self._router.Route(route, timeout=timeout())
        self._reusable.remember(route, decision)
        return decision

    def _messages(self, decision: router_pb2.RouteDecision, reused: bool, timeout: Callable[[], float | None]
                  ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """The caller's messages for ``decision``: its engine stream, or the escalating pair."""
        span = trace.get_current_span()
        target = decision.target
        metrics.ROUTE_DECISIONS.labels(target.model, "reused" if reused else "router").inc()
        span.set_attributes({"llmesh.routing": "direct", "llmesh.model_reason": target.reason,
                             "llmesh.pick_reason": target.pick_reason, "llmesh.route_reused": reused,
                             "llmesh.matched_blocks": target.matched_blocks})
        if not decision.HasField("escalation"):
            return self._engine_stream(target, decision.max_failovers, timeout)
        plan = decision.escalation
        rule = EscalationRule(plan.tokens, plan.threshold, plan.strip_logprobs)

        def on_verdict(v: Verdict) -> None:
            span.set_attribute("llmesh.escalation_confidence", v.confidence)
            if v.escalate:
                span.add_event("escalated", {
                    "llmesh.from_model": target.model, "llmesh.to_model": plan.large.model,
                    "llmesh.confidence": v.confidence, "llmesh.threshold": rule.threshold,
                    "llmesh.judged_tokens": v.judged})
                log.info("escalated", extra={"request_id": target.request.request_id, "from_model": target.model,
                                             "to_model": plan.large.model, "confidence": round(v.confidence, 4),
                                             "threshold": rule.threshold})

        small = self._engine_stream(target, decision.max_failovers, timeout)
        return escalating(rule, small, lambda: self._engine_stream(plan.large, decision.max_failovers, timeout),
                          on_verdict)

    async def _engine_stream(self, target: router_pb2.RouteTarget, max_failovers: int,
                             timeout: Callable[[], float | None]
                             ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """The engine stream of ``target``, failing over along its candidates before the first message."""
        span = trace.get_current_span()
        candidates = list(target.candidates)[:max_failovers + 1]
        if not candidates:
            raise unavailable(f"no healthy replica of model {target.model!r} (the router named none)")
        overloads = Overloads()
        for attempt, cand in enumerate(candidates):
            span.set_attributes({"llmesh.replica": cand.replica, "llmesh.attempt": attempt})
            call = self._engines.stub(cand.address).Generate(target.request, timeout=timeout())
            sent_any = False
            try:
                with self._engines.probe(cand.address).held() as liveness:
                    async with contextlib.aclosing(until_frozen(call, liveness)) as messages:
                        async for msg in messages:
                            sent_any = True
                            if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED and not msg.replica:
                                msg.replica = cand.replica
                            yield msg
                return
            except (grpc.aio.AioRpcError, ReplicaFrozen) as e:
                code, details = ((grpc.StatusCode.UNAVAILABLE, f"the engine stopped answering: {e}")
                                 if isinstance(e, ReplicaFrozen) else (e.code(), e.details() or e.code().name))
                if sent_any:
                    raise midstream_error(cand.replica, cand.address, code, details) from None
                if code in OVERLOAD_CODES:
                    overloads.add(cand.replica, cand.address, e)
                    if attempt == len(candidates) - 1:
                        raise overloads.error(target.model) from None
                    span.add_event("overloaded", {"llmesh.replica": cand.replica})
                    continue
                if code not in FAILOVER_CODES:
                    raise refused_error(cand.replica, cand.address, code, details) from None
                if attempt == len(candidates) - 1:
                    if overloads.refusals:  # a full replica is a retryable overload, not a failure
                        raise overloads.error(target.model) from None
                    raise exhausted_error(target.model, cand.replica, cand.address, code, details,
                                          attempt) from None
                span.add_event("failover", {"llmesh.replica": cand.replica, "llmesh.error": details})
                log.warning("failover", extra={"model": target.model, "replica": cand.replica,
                                               "address": cand.address, "error": details,
                                               "request_id": target.request.request_id})
            finally:
                call.cancel()
