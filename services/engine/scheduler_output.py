"""What one scheduler step decided: typed, immutable, handed to the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmesh.engine.request import Request


@dataclass(frozen=True)
class ScheduledChunk:
    """Run ``num_new_tokens`` tokens of ``request`` starting at position ``start_pos``.

    The runner reads the tokens ``request.all_token_ids[start_pos : start_pos + n]`` and
    writes their K/V into ``request.block_ids``; the tokens before ``start_pos`` are in
    the cache already (or are being written by the step in flight). Under async
    scheduling the chunk's last token may be the previous step's pending sample, known
    only on the device (``start_pos + n > request.num_tokens``).

    A verify chunk (speculative decoding) is a decode followed by ``spec_token_ids``: its
    last ``len(spec_token_ids)`` tokens are drafts, not yet part of the request, and every
    one of its k + 1 positions is sampled.
    """

    request: Request
    start_pos: int
    num_new_tokens: int
    spec_token_ids: tuple[int, ...] = ()
    samples: bool = field(init=False)
    """The chunk reaches the request's last known token, so its logits are sampled (never
    for an embedding request: its last chunk is pooled instead, see pooling.py).
    Fixed at creation: appending the sampled token later does not change it."""

    def __post_init__(self) -> None:
        end = self.start_pos + self.num_new_tokens - len(self.spec_token_ids)
        object.__setattr__(self, "samples",
                           self.request.pooling is None and end == self.request.num_tokens_with_pending)

    @property
    def num_spec_tokens(self) -> int:
        return len(self.spec_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def is_decode(self) -> bool:
        """One new token that samples: a decode (a 1-token prefill chunk is not)."""
        return self.num_new_tokens == 1 and self.samples


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    """Decode chunks (one token each) first, then prefill and verify chunks, each in
    scheduling order."""
    num_batched_tokens: int
    preempted_request_ids: tuple[str, ...] = ()
    """Requests preempted this step: their blocks are gone; they will be recomputed."""
    finished_request_ids: tuple[str, ...] = ()
    """Requests that finished (or were aborted) since the previous step: per-request
    state elsewhere (sampler, detokenizer) can be dropped."""

    @property
    def num_spec_tokens(self) -> int:
        """Draft tokens this step verifies."""
        return sum(c.num_spec_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_scheduled_requests(self) -> int:
        return len(self.chunks)
