"""Usage accounting: one structured log line and the metrics of each finished stream.

The log line is the billing and debugging record of a request: it carries the trace id
(so the Jaeger trace can be found from it), the model, the final status and, when it
failed, why (the message the caller got), the token
counts the engine reported and the latencies the client saw.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from llmesh.gateway import metrics
from llmesh.telemetry import current_trace_id
from llmesh.v1 import common_pb2

log = logging.getLogger("llmesh.gateway.usage")


@dataclasses.dataclass
class UsageRecord:
    """What one Generate/Chat stream cost and how it went."""

    rpc: str
    request_id: str
    requested_model: str = ""
    """The model name as the client sent it (free text: logged, never a metric label)."""
    model: str = ""
    """The model that served it (the router's choice for ``auto``); empty when the
    request failed before its model was resolved."""
    started: float = dataclasses.field(default_factory=time.perf_counter)
    status: str = "OK"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    finish_reason: str = ""
    replica: str = ""
    tenant: str = ""
    key_id: str = ""
    """The API key's id (never the key); empty without auth."""
    error: str = ""
    """Why the call failed (the message the caller got); empty when it succeeded."""
    trace_id: str = ""
    """The request's trace (set once its span starts; else the current span's is logged)."""
    engine_request_id: str = ""
    """The id router and engines know the request by (``request_ids``): what an operator
    passes to an engine's Abort; ``request_id`` is the client's own."""
    cached_response: bool = False
    """Answered from the response cache: the token counts are the stored answer's, and
    no engine token was spent (the token metrics leave them out)."""

    def observe(self, resp: common_pb2.GenerateResponse) -> None:
        """Account one streamed message."""
        if resp.model:
            self.model = resp.model
        self.cached_response = self.cached_response or resp.cached_response
        if resp.token_ids and self.ttft_s is None:
            self.ttft_s = time.perf_counter() - self.started
        if resp.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = common_pb2.FinishReason.Name(resp.finish_reason).removeprefix("FINISH_REASON_")
            self.replica = resp.replica
        if resp.HasField("usage"):
            self.prompt_tokens = resp.usage.prompt_tokens
            self.cached_tokens = resp.usage.cached_tokens
            self.completion_tokens = resp.usage.completion_tokens
        elif resp.token_ids:
            self.completion_tokens += len(resp.token_ids)

    def finish(self, status: str) -> None:
        """Log the record and update the metrics (call once, at the end of the stream)."""
        self.status = status
        duration = time.perf_counter() - self.started
        label = self.model or "unknown"
        metrics.REQUESTS.labels(self.rpc, label, status).inc()
        metrics.DURATION.labels(self.rpc, label).observe(duration)
        if not self.cached_response:  # engine work only
            metrics.PROMPT_TOKENS.labels(label).inc(self.prompt_tokens)
            metrics.CACHED_TOKENS.labels(label).inc(self.cached_tokens)
            metrics.COMPLETION_TOKENS.labels(label).inc(self.completion_tokens)
        if self.ttft_s is not None:
            metrics.TTFT.labels(label).observe(self.ttft_s)
        level = logging.INFO if status in ("OK", "CANCELLED") else logging.WARNING
        log.log(level, "usage", extra={
            "trace_id": self.trace_id or current_trace_id(), "rpc": self.rpc, "request_id": self.request_id,
            "model": self.model or self.requested_model, "status": status, "error": self.error,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": round(1000 * self.ttft_s, 1) if self.ttft_s is not None else None,
            "duration_ms": round(1000 * duration, 1), "replica": self.replica, "tenant": self.tenant,
            "key_id": self.key_id, "engine_request_id": self.engine_request_id,
            "cached_response": self.cached_response,
        })
