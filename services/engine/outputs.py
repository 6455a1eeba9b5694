"""Typed results the engine hands to its callers (the LLM API, the async engine, gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmesh.engine.request import FinishReason


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one generated token and the top alternatives at its step."""

    token_id: int
    logprob: float
    rank: int
    """1 for the most likely token."""
    top: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) of the ``logprobs`` most likely tokens, best first."""


@dataclass
class RequestOutput:
    """What a request produced: cumulative for ``LLM.generate``, a delta when streamed.

    In a streamed delta, ``token_ids`` / ``text`` / ``logprobs`` hold only what is new
    since the previous delta; ``finished`` is set on the last one.
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    """Set when finish_reason is ERROR: why the engine failed the request."""
    index: int = 0
    """The choice (0 .. n-1) this output belongs to; ``finished`` is per choice."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """With ``prompt_logprobs`` asked: prompt tokens 1 .. P-1's logprobs (the first token has
    none), in the first delta."""
    embedding: Any = None
    """An embedding request's vector (float32 numpy array), on its finished output."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class EmbeddingOutput:
    """The vector of one embedding request (``LLM.embed``, ``AsyncLLM.embed``)."""

    request_id: str
    prompt_token_ids: list[int]
    embedding: list[float]
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V came from the prefix cache (last pooling only)."""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
