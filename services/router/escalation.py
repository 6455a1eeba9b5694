"""Escalation and failover rules shared by the router's proxy stream and the gateway's
direct stream, so that both paths give the caller the same messages and statuses.

Escalation: an ``auto`` request that went to the small model runs with per-token
log-probabilities on, and its first ``tokens`` tokens are held back. Their mean
log-probability is its confidence: under ``threshold`` the small stream is closed (the
engine aborts it) and the large model answers from scratch, so the caller only ever sees
the large model's stream; otherwise the held messages are released and the stream goes
on. Log-probabilities the caller did not ask for are stripped. A small stream that ends
before that many tokens is judged on the tokens it has.

Failover: a replica failing with a code in ``FAILOVER_CODES`` (or frozen, see
``liveness``) before its first message is skipped for the next candidate; after the first
message the failure is reported with ``midstream_error`` (the caller holds part of the
output, so a retry elsewhere would repeat tokens). Every error names the engine as
"engine <instance id> at <address>".
A replica refusing with RESOURCE_EXHAUSTED (its waiting queue is full) is healthy, just
busy: the next candidate with room is tried without marking it down, and when none is left
the caller gets RESOURCE_EXHAUSTED with the shortest retry hint any replica gave
(``Overloads``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

import grpc

from llmesh.errors import ServiceError, unavailable
from llmesh.overload import retry_after_s, retry_trailers
from llmesh.v1 import common_pb2

FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
"""Codes that are the replica's fault, not the request's (dead, restarting its core, shutting
down, failing): before the first token the request moves to another replica and this one
leaves its pool until a health check passes; after it they are reported as the replica's
failure. DEADLINE_EXCEEDED is not one: the engine call carries the caller's own deadline,
so it says nothing about the replica (a frozen one is caught by liveness.py instead)."""
OVERLOAD_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
"""Codes that mean "this replica is full right now": try another, but it stays healthy."""


@dataclasses.dataclass(frozen=True)
class EscalationRule:
    """How a small model's first tokens are judged."""

    tokens: int
    threshold: float
    strip_logprobs: bool
    """The caller asked for no log-probabilities: the ones the judge needs are removed."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome of one judgement: the confidence (nats) and how many tokens it saw."""

    confidence: float
    judged: int
    escalate: bool


def judge(rule: EscalationRule, logprobs: list[float]) -> Verdict:
    """Mean log-probability of the first ``rule.tokens`` tokens against the threshold."""
    judged = logprobs[:rule.tokens]
    confidence = sum(judged) / len(judged) if judged else 0.0
    return Verdict(confidence, len(judged), confidence < rule.threshold)


def judged_sampling(rule: EscalationRule, sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
    """The small model's sampling: the caller's, with log-probabilities on for the judge."""
    out = common_pb2.SamplingParams()
    out.CopyFrom(sampling)
    if rule.strip_logprobs:
        out.logprobs = 0
    return out


async def escalating(rule: EscalationRule, small: AsyncIterator[common_pb2.GenerateResponse],
                     open_large: Callable[[], AsyncIterator[common_pb2.GenerateResponse]],
                     on_verdict: Callable[[Verdict], None]) -> AsyncIterator[common_pb2.GenerateResponse]:
    """Stream ``small`` past the judge; on a low-confidence verdict, close it and stream
    ``open_large()`` instead. ``on_verdict`` is called once, when the verdict is known."""
    held: list[common_pb2.GenerateResponse] = []
    logprobs: list[float] = []
    verdict: Verdict | None = None
    async with contextlib.aclosing(small):
        async for msg in small:
            if verdict is None:
                logprobs.extend(lp.logprob for lp in msg.logprobs)
            if rule.strip_logprobs:
                del msg.logprobs[:]
            if verdict is not None:
                yield msg
                continue
            held.append(msg)
            done = msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
            if len(logprobs) < rule.tokens and not done:
                continue
            verdict = judge(rule, logprobs)
            on_verdict(verdict)
            if verdict.escalate:
                break
            for m in held:
                yield m
            held = []
    if verdict is None:  # the stream ended without a last message: pass on what came
        for m in held:
            yield m
        return
    if not verdict.escalate:
        return
    large = open_large()
    async with contextlib.aclosing(large):
        async for msg in large:
            yield msg


def engine_where(replica: str, address: str) -> str:
    """A replica as errors name it: "engine <instance id> at <address>" (the address once)."""
    return f"engine {replica}" if address in replica else f"engine {replica} at {address}"


def _detail(where: str, code: grpc.StatusCode, details: str) -> str:
    """The engine's own message, without the prefix that repeats who it is."""
    details = (details or code.name).removeprefix(f"{where} is unavailable: ").removeprefix(f"{where}: ")
    return f"{code.name}: {details}"


def midstream_error(replica: str, address: str, code: grpc.StatusCode, details: str) -> ServiceError:
    """The caller's error when a replica fails after its first message."""
    where = engine_where(replica, address)
    if code not in FAILOVER_CODES:
        return ServiceError(code, f"{where}: {details or code.name}")
    return unavailable(f"{where} failed after the first token ({_detail(where, code, details)}); "
                       f"the partial output cannot be resumed on another replica, retry the request")


def refused_error(replica: str, address: str, code: grpc.StatusCode, details: str) -> ServiceError:
    """The caller's error when a replica refuses a request with a non-failover code."""
    return ServiceError(code, f"{engine_where(replica, address)}: {details or code.name}")


def exhausted_error(model: str, replica: str, address: str, code: grpc.StatusCode, details: str,
                    failovers: int) -> ServiceError:
    """The caller's error when the last replica tried failed before the first token."""
    where = engine_where(replica, address)
    tail = (f"{failovers} other replica(s) of model {model!r} failed too" if failovers
            else f"no other replica of model {model!r} is healthy")
    return unavailable(f"{where} is unavailable ({_detail(where, code, details)}); {tail}")


def _refusal(replica: str, address: str, e: grpc.aio.AioRpcError) -> str:
    where = engine_where(replica, address)
    return f"{where}: {(e.details() or e.code().name).removeprefix(f'{where}: ')}"


class Overloads:
    """The RESOURCE_EXHAUSTED refusals of one request's candidates, for the caller's error."""

    def __init__(self) -> None:
        self.refusals: list[tuple[str, str, grpc.aio.AioRpcError]] = []

    def add(self, replica: str, address: str, e: grpc.aio.AioRpcError) -> None:
        self.refusals.append((replica, address, e))

    def error(self, model: str) -> ServiceError:
        """RESOURCE_EXHAUSTED naming every refusing replica, with the shortest retry hint."""
        hints = [h for _, _, e in self.refusals if (h := retry_after_s(e.trailing_metadata())) is not None]
        where = "; ".join(_refusal(r, a, e) for r, a, e in self.refusals)
        trailers = retry_trailers(min(hints)) if hints else ()
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"model {model!r} is overloaded: {len(self.refusals)} replica(s) refused the request "
                            f"({where})", trailers=trailers)
