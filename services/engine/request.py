"""A request inside the engine: it owns its tokens, its block table and its counts.

The scheduler decides on ``num_computed_tokens`` vs ``num_tokens`` alone — there is no
prefill/decode flag: a request whose computed count trails its token count by more than
one is (still) prefilling, by exactly one it is decoding.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from llmesh.engine.pooling_params import PoolingParams
from llmesh.engine.sampling_params import SamplingParams


class Priority(enum.IntEnum):
    """Lower runs first. The gateway maps a key's tier onto these."""

    INTERACTIVE = 0
    BATCH = 1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # EOS, a stop token id or a stop string
    LENGTH = "length"      # max_tokens or the model window
    ABORT = "abort"        # the caller aborted (cancel, disconnect, deadline)
    ERROR = "error"        # the engine failed this request (the message says why)

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = Priority.INTERACTIVE
    arrival_time: float = field(default_factory=time.monotonic)
    cache_salt: str | None = None
    """Keeps this request's prefix blocks apart from other salts' (per-tenant caches)."""
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int | None = None
    """The model window; generation stops with LENGTH when the sequence reaches it."""
    fork_of: str | None = None
    """Parallel sampling: the id of the choice whose computed prompt blocks this one shares."""
    pooling: PoolingParams | None = None
    """Set for an embedding request: its prompt is computed, pooled into a vector, and the
    request finishes there (it never samples). See pooling.py."""

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache or being written by a step in flight (cached prefix
    blocks included): the scheduler advances it when it schedules a chunk, not when the
    step finishes, so it can schedule step N+1 while step N still runs."""
    num_pending_tokens: int = 0
    """Tokens sampled (or to be sampled) by scheduled steps whose results have not reached the
    host: their ids exist on the device only. The next step can already compute them (their
    K/V position is known); they are appended to ``output_token_ids`` when the step's
    results land. Usually 0 or 1; 2 while step N+1 is scheduled and sampled before step N
    lands (async scheduling with a grammar or penalty row: the sampler's output counts
    already hold step N's token then)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the first admission (a preempted
    request recomputes, so later hits are not counted again)."""
    block_ids: list[int] = field(default_factory=list)
    """The block table: physical block ids, one per ``block_size`` tokens."""
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of the full blocks of ``all_token_ids`` computed so far."""
    num_preemptions: int = 0
    scheduled_time: float = 0.0
    """time.monotonic() at the first admission (0.0 while never scheduled)."""
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if any."""
    sampler_state: Any = None
    """Owned by the sampler (e.g. the seeded torch.Generator); opaque to the scheduler."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed for the next step (speculative decoding): the scheduler turns the
    next decode into a verify chunk of the last token plus these, budget permitting."""
    spec_misses: int = 0
    """Verify steps in a row that accepted no draft; the proposer then skips this request for
    2**spec_misses steps (at most SPEC_MAX_BACKOFF), so drafts that never land stop costing."""
    spec_skip: int = 0
    """Steps left before this request is proposed for again."""
    grammar: Any = None
    """The structured-output matcher (``GrammarState``) of a constrained request, set by the
    core once its grammar is compiled; the sampler masks with it, the core advances it."""
    prompt_logprobs: list[Any] = field(default_factory=list)
    """With ``sampling_params.prompt_logprobs``: the TokenLogprob of prompt tokens 1, 2, ...
    as their chunks are computed (a recomputation after preemption does not add them again);
    sent with the request's first output."""
    pooling_state: Any = None
    """Owned by the pooler: a mean request's running sum of hidden states (device tensor)."""

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)

    # ---- token counts -------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """Tokens known plus tokens sampled on the device and not yet known on the host."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    def will_finish_by_length(self) -> bool:
        """The pending token reaches max_tokens or the window: no further step is needed."""
        n_out = self.num_output_tokens + self.num_pending_tokens
        return n_out >= self.sampling_params.max_tokens or (
            self.max_model_len is not None and self.num_tokens_with_pending >= self.max_model_len)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """After appending a token: set finish_reason if a token-level stop applies.

        Stop strings are checked by the output processor, which sees the text.
        """
        sp = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, None
                return True
            if last in sp.stop_token_ids:
                self.finish_reason, self.stop_reason = FinishReason.STOP, last
                return True
        if self.num_output_tokens >= sp.max_tokens or (
            self.max_model_len is not None and self.num_tokens >= self.max_model_len
        ):
            self.finish_reason = FinishReason.LENGTH
            return True
        return False
