"""Route answers the router allowed the gateway to reuse (direct routing).

A ``Route`` call is a gRPC round trip on every request's path to its first token (about 1 ms
on a fast host, 3 ms on a loaded 2-core one; docs/routing.md). When the router's answer cannot
depend on the request (a named or default model with one healthy replica and no escalation)
it says for how long it holds (``RouteDecision.reuse_ms``), and the gateway routes that model's
next requests the same way for that long, building each engine request with the router's own
builder (``llmesh.router.policy.engine_request``), so the engine sees the same request either
way. A replica that joins or recovers gets traffic within ``reuse_ms``; a reused route whose
replica fails before the first token is forgotten and the request asks the router again
(``DirectStreamer``).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable

from llmesh.router.policy import AUTO, engine_request
from llmesh.v1 import router_pb2


@dataclasses.dataclass(frozen=True)
class _Grant:
    target: router_pb2.RouteTarget  # without its request: each request builds its own
    max_failovers: int
    expires: float


class ReusableRoutes:
    """The latest reusable answer per requested model name (``RouteRequest.model``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._grants: dict[str, _Grant] = {}

    def remember(self, route: router_pb2.RouteRequest, decision: router_pb2.RouteDecision) -> None:
        """Keep ``decision`` for ``route.model`` when the router allowed it; the router's latest
        answer replaces an older grant either way."""
        if decision.reuse_ms and route.model != AUTO and not decision.HasField("escalation"):
            target = router_pb2.RouteTarget()
            target.CopyFrom(decision.target)
            target.ClearField("request")
            self._grants[route.model] = _Grant(target, decision.max_failovers,
                                               self._clock() + decision.reuse_ms / 1000)
        else:
            self._grants.pop(route.model, None)

    def decision(self, route: router_pb2.RouteRequest) -> router_pb2.RouteDecision | None:
        """The reused answer for ``route`` (its own engine request inside), or None: ask the router."""
        grant = self._grants.get(route.model)  # never one for "auto": remember keeps none
        if grant is None:
            return None
        if self._clock() >= grant.expires:
            del self._grants[route.model]
            return None
        out = router_pb2.RouteDecision(max_failovers=grant.max_failovers)
        out.target.CopyFrom(grant.target)
        # The router's builder, so a bad prompt gets the router's INVALID_ARGUMENT here too.
        out.target.request.CopyFrom(engine_request(route, route.request_id or uuid.uuid4().hex, grant.target.model))
        return out

    def forget(self, model: str) -> None:
        self._grants.pop(model, None)
