"""What crosses the boundary between the front end (tokenizer, detokenizer, stop strings,
gRPC) and the engine core (scheduler, runner, KV cache).

Plain dataclasses, pickled over a pipe (docs/engine-core.md says why). Each step sends only
what changed: the tokens a request received this step, not its whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmesh.engine.kv_cache.events import KVEventBatch
from llmesh.engine.outputs import TokenLogprob
from llmesh.engine.pooling_params import PoolingParams
from llmesh.engine.request import FinishReason, Priority
from llmesh.engine.sampling_params import SamplingParams
from llmesh.engine.spec_decode.stats import SpecDecodeStats


# ---- front end → core ---------------------------------------------------------------------
@dataclass
class EngineCoreRequest:
    """A tokenized, validated request (the front end did the text work)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    priority: int = Priority.INTERACTIVE
    cache_salt: str | None = None
    fork_of: str | None = None
    """Parallel sampling: another choice of the same request, whose prompt blocks this one shares."""
    pooling: PoolingParams | None = None
    """Set for an embedding request (its sampling params are then unused)."""


@dataclass
class AbortRequests:
    """Abort these requests; no reply (a closed stream, a finished-by-stop-string request)."""

    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT


@dataclass
class UtilityCall:
    """Run ``fn(core, *args)`` between steps and send back its result.

    ``payload`` is ``pickle.dumps((fn, args))``, made by the front end (where an
    unpicklable ``fn`` fails at once) and opened by the core inside the call, so a
    function the core cannot import fails this call, not the core."""

    call_id: int
    payload: bytes


@dataclass
class Shutdown:
    """Finish the current step, then exit."""


# ---- core → front end ---------------------------------------------------------------------
@dataclass
class EngineCoreOutput:
    """What one request got in one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    """Set on the request's last output."""
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    """Set when finish_reason is ERROR: why the core failed the request."""
    queued_time: float = 0.0
    scheduled_time: float = 0.0
    """On a request's first output only (0.0 on later ones): time.monotonic() when the core
    queued it and when it was first scheduled (the front end's queue and prefill times)."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On the first output of a request that asked for them: prompt tokens 1 .. P-1's logprobs."""
    embedding: Any = None
    """An embedding request's vector (a float32 numpy array), on its one, finishing output."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __reduce__(self):
        # Pickled as a constructor call on a tuple: about 2.5x faster both ways than the
        # default __dict__ state (bench/ipc_transport.py; one of these per request per step).
        return (EngineCoreOutput, (self.request_id, self.new_token_ids, self.new_logprobs, self.finish_reason,
                                   self.stop_reason, self.num_cached_tokens, self.error, self.queued_time,
                                   self.scheduled_time, self.prompt_logprobs, self.embedding))


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the core's load (the gRPC ``Load`` RPC reports it) and its counters
    since start (the front end turns their growth into Prometheus counters)."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    steps: int
    last_step_time: float
    """time.monotonic() at the end of the last step (health: a stuck loop stops moving it).
    CLOCK_MONOTONIC is system-wide on Linux, so the front end can compare it with its own."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache, at each request's first admission."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached."""
    num_preemptions: int = 0
    spec: SpecDecodeStats | None = None
    """Speculative decoding counters (None when the core does not speculate)."""
    expert_tokens: dict[str, int] | None = None
    """Tokens routed to each expert since start, by "layer.expert" (a mixture of experts);
    read from the device at most once per EXPERT_TOKENS_INTERVAL_S, None between reads."""

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by requests, 0–1 (cached free blocks count as free)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class RejectedRequest:
    """The core refused a request at admission: nothing was admitted."""

    request_id: str
    message: str
    field: str | None = None
    invalid: bool = True
    """An InvalidRequestError (the request's fault); False: the core failed to admit it."""


@dataclass
class UtilityResult:
    call_id: int
    result: Any = None
    error: BaseException | None = None


@dataclass
class EngineCoreOutputs:
    """One message from the core: a step's outputs and whatever else happened since the last."""

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    rejected: list[RejectedRequest] = field(default_factory=list)
    utility_results: list[UtilityResult] = field(default_factory=list)
    kv_events: list[KVEventBatch] = field(default_factory=list)
    stats: EngineStats | None = None
    progress_time: float = 0.0
    """time.monotonic() when the core last finished a step or found nothing to do (the
    timestamp of this message's tokens, for the latency metrics)."""
    step_tokens: int = 0
    """Tokens the step run for this message computed (0: no step ran)."""


@dataclass(frozen=True)
class CoreReady:
    """First message of a core process: the model is loaded, these are its facts."""

    num_kv_blocks: int
    max_model_len: int
    device: str
    dtype: str
    quantization: str
    pid: int


@dataclass(frozen=True)
class CoreFailed:
    """Last message of a core process that cannot go on (load failed, a step raised)."""

    message: str
    traceback: str = ""
