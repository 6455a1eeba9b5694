"""Load shedding shared by every service: the overload status, its retry hint, and the
estimate behind the hint.

A service that is full refuses at once with RESOURCE_EXHAUSTED rather than queueing
without bound: the caller learns in milliseconds, not after a timeout, and can retry
elsewhere or later. The hint travels as gRPC trailing metadata ``retry-after-ms``
(milliseconds, as OpenAI's clients read the HTTP header of that name) and ``retry-after``
(whole seconds, HTTP's ``Retry-After``); the message says it too, for people.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable

import grpc

from llmesh.errors import ServiceError

RETRY_AFTER_MS = "retry-after-ms"
RETRY_AFTER = "retry-after"
MIN_RETRY_S = 0.05
MAX_RETRY_S = 30.0
DEFAULT_RETRY_S = 1.0
"""The hint before anything has finished (no rate to estimate from yet)."""


def retry_trailers(retry_after_s: float) -> tuple[tuple[str, str], ...]:
    ms = max(1, round(retry_after_s * 1000))
    return (RETRY_AFTER_MS, str(ms)), (RETRY_AFTER, str(max(1, math.ceil(ms / 1000))))


def overloaded(message: str, retry_after_s: float) -> ServiceError:
    """RESOURCE_EXHAUSTED with the retry hint in the trailers and in the message."""
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"{message}; retry after {max(1, round(retry_after_s * 1000))} ms",
                        trailers=retry_trailers(retry_after_s))


def retry_after_s(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """The retry hint in gRPC metadata (``retry-after-ms`` first), or None."""
    found = {k: v for k, v in metadata or () if isinstance(v, str)}
    for key, scale in ((RETRY_AFTER_MS, 1000.0), (RETRY_AFTER, 1.0)):
        try:
            value = float(found[key]) / scale
        except (KeyError, ValueError):
            continue
        if math.isfinite(value) and value >= 0:
            return value
    return None


def passed_on(e: grpc.aio.AioRpcError) -> tuple[tuple[str, str], ...]:
    """The retry trailers of a downstream refusal, to send on unchanged (empty when none)."""
    hint = retry_after_s(e.trailing_metadata())
    return () if hint is None else retry_trailers(hint)


class RetryEstimator:
    """When a slot is likely to free: the mean interval between finished requests.

    An exponentially weighted mean of the gaps between completions, so it follows load
    changes within a few dozen requests; ``hint(n)`` is how long until ``n`` more have
    finished, clamped to [MIN_RETRY_S, MAX_RETRY_S]. Thread-safe (the engine records
    completions on its reader thread).
    """

    def __init__(self, weight: float = 0.1) -> None:
        self._weight = weight
        self._lock = threading.Lock()
        self._last: float | None = None
        self._interval: float | None = None

    def finished(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._last is not None:
                gap = min(now - self._last, MAX_RETRY_S)  # an idle spell says nothing about throughput
                self._interval = gap if self._interval is None else (
                    (1 - self._weight) * self._interval + self._weight * gap)
            self._last = now

    def hint(self, slots: int = 1) -> float:
        with self._lock:
            interval = self._interval
        if interval is None:
            return DEFAULT_RETRY_S
        return min(MAX_RETRY_S, max(MIN_RETRY_S, interval * max(1, slots)))
