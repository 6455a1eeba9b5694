"""The gateway's cap on streams served at once (``max_streams``), gRPC and HTTP together.

It is the first check of every Generate/Chat call: a plain counter on the event loop, so
a full gateway refuses in microseconds with RESOURCE_EXHAUSTED and a retry hint (HTTP
429 with ``Retry-After``) instead of accepting work it can only queue. The hint is how
soon streams have been ending lately (``llmesh.overload.RetryEstimator``).
"""

from __future__ import annotations

from llmesh.errors import ServiceError
from llmesh.gateway import metrics
from llmesh.overload import RetryEstimator, overloaded


class StreamCap:
    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        """0: no cap."""
        self.open = 0
        self._retry = RetryEstimator()

    def acquire(self) -> None:
        """Take a slot, or raise RESOURCE_EXHAUSTED; every successful call needs one ``release``."""
        if self.max_streams and self.open >= self.max_streams:
            metrics.OVERLOADED.inc()
            raise self.refusal()
        self.open += 1

    def release(self) -> None:
        self.open -= 1
        self._retry.finished()

    def refusal(self) -> ServiceError:
        return overloaded(f"the gateway is overloaded: {self.open} streams open, its limit is "
                          f"{self.max_streams} (max_streams)", self._retry.hint(self.open - self.max_streams + 1))
