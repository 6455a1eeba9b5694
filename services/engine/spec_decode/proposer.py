"""The proposer interface: given running requests, guess each one's next tokens.

A proposer sees whole requests (their prompt and output so far) and, for proposers that
read the target's state (EAGLE-style heads), the target's last hidden states of those
requests. It returns draft token ids only: the target model verifies them, so a wrong
guess costs verify width, never correctness.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmesh.engine.request import Request


@dataclass
class Proposal:
    """Drafts for one request, and for a proposer that sampled them, the distribution each
    was drawn from (``draft_probs`` [k, V]); None means each draft was chosen
    deterministically (q is one-hot on it), which the verifier handles exactly without q."""

    token_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None


class Proposer(abc.ABC):
    method: str = ""
    kv_bytes_per_block: int = 0
    """Bytes per block of the proposer's own KV pool (a draft model's; 0: none). That pool
    holds as many blocks as the target's and shares its budget (``init_kv_pool``)."""

    def init_kv_pool(self, num_blocks: int) -> None:
        """Allocate the proposer's KV pool once the target's is sized (``num_blocks`` each)."""

    @abc.abstractmethod
    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int],
                hidden_states: torch.Tensor | None = None) -> list[Proposal]:
        """At most ``max_tokens[i]`` drafts for ``requests[i]``, which continue its
        ``all_token_ids``. ``hidden_states`` ([len(requests), H], the target's last layer at
        each request's last token) is for proposers that read it; others ignore it."""

    def retain(self, request_ids: set[str]) -> None:
        """Forget per-request state (a draft model's KV blocks) of every request not in
        ``request_ids`` (the running ones): finished, aborted or preempted."""


def build_proposer(config, target=None) -> Proposer | None:
    """The proposer a SpeculativeConfig asks for (None when speculation is off). ``target``
    is the engine core, before its runner exists: a draft model shares its device, dtype,
    block size, window and step token budget, and its KV pool is sized with the target's."""
    if config is None or config.speculative_method is None:
        return None
    if config.speculative_method == "ngram":
        from llmesh.engine.spec_decode.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative_method == "draft":
        from llmesh.engine.spec_decode.draft import DraftModelProposer

        return DraftModelProposer(config, target)
    raise ValueError(f"speculative decoding: unknown method {config.speculative_method!r}")
