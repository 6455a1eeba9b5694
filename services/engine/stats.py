"""What the engine's metrics are computed from, after vLLM V1's split: the core reports
its state and counters (``EngineStats``) and per-request timestamps with each step's
outputs; the front end keeps each request's timeline (``RequestStats``) and gathers what
one core message brought (``IterationStats``), which ``EngineMetrics`` then records.

Times are ``time.monotonic()`` seconds. CLOCK_MONOTONIC is system-wide on Linux, so the
core's timestamps (queued, scheduled, each step's end) and the front end's (arrival, the
moment a token reached it) are on one clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.engine.core.messages import EngineCoreOutput


@dataclass
class RequestStats:
    """One live request's timeline, kept by the front end across its deltas."""

    arrival_time: float
    """When the front end received the request."""
    num_prompt_tokens: int
    num_generation_tokens: int = 0
    queued_time: float = 0.0
    """When the core queued it."""
    scheduled_time: float = 0.0
    """When the core first scheduled it (a preempted request keeps its first)."""
    first_token_time: float = 0.0
    """The end of the step that sampled its first token (core clock)."""
    last_token_time: float = 0.0


@dataclass(frozen=True)
class FinishedRequest:
    """A request's totals when it ends."""

    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    e2e_latency: float
    queued_time: float
    """Waiting before its first admission."""
    prefill_time: float
    """From its first admission to its first token."""
    decode_time: float
    """From its first token to its last."""

    @property
    def started(self) -> bool:
        """It produced a token, so its prefill and decode times mean something."""
        return self.num_generation_tokens > 0

    @property
    def time_per_output_token(self) -> float | None:
        """Mean time between its output tokens (None with fewer than two)."""
        if self.num_generation_tokens < 2:
            return None
        return self.decode_time / (self.num_generation_tokens - 1)


@dataclass
class IterationStats:
    """What one message of the core brought (normally one step)."""

    step_tokens: int = 0
    """Tokens the step computed, prefill chunks and decodes together."""
    num_prompt_tokens: int = 0
    """Prompt tokens of the requests that got their first token in this message."""
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)

    def update_from_output(self, out: EngineCoreOutput, req: RequestStats, step_time: float,
                           now: float, num_tokens: int | None = None) -> None:
        """Account one request's output. ``step_time``: when the core's step ended;
        ``now``: when the front end got it (TTFT is what a caller of the engine sees);
        ``num_tokens``: how many of its tokens count (those before a stop string)."""
        if out.queued_time:
            req.queued_time, req.scheduled_time = out.queued_time, out.scheduled_time
        n = len(out.new_token_ids) if num_tokens is None else num_tokens
        if out.embedding is not None:  # an embedding's one output: its prompt was all its work
            self.num_prompt_tokens += req.num_prompt_tokens
        if n == 0:
            return
        if req.num_generation_tokens == 0:
            self.num_prompt_tokens += req.num_prompt_tokens
            self.time_to_first_tokens.append(now - req.arrival_time)
            req.first_token_time = step_time
        else:
            self.inter_token_latencies.append((step_time - req.last_token_time) / n)
        req.last_token_time = step_time
        req.num_generation_tokens += n
        self.num_generation_tokens += n

    def finish(self, req: RequestStats, reason: str, now: float) -> None:
        started = req.num_generation_tokens > 0
        scheduled = req.scheduled_time > 0.0
        self.finished.append(FinishedRequest(
            finish_reason=reason,
            num_prompt_tokens=req.num_prompt_tokens,
            num_generation_tokens=req.num_generation_tokens,
            e2e_latency=now - req.arrival_time,
            queued_time=max(req.scheduled_time - req.queued_time, 0.0) if scheduled else 0.0,
            prefill_time=max(req.first_token_time - req.scheduled_time, 0.0) if started and scheduled else 0.0,
            decode_time=max(req.last_token_time - req.first_token_time, 0.0) if started else 0.0,
        ))

    @property
    def is_empty(self) -> bool:
        return not (self.step_tokens or self.num_generation_tokens or self.finished)
