"""Counters of speculative decoding: what was proposed, accepted and emitted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecDecodeStats:
    """Totals since the core started, one ``record`` per verify chunk.

    ``accepted`` counts drafts the target kept; ``emitted`` the tokens appended, which is
    accepted + 1 per verify step (the target's own token) unless a stop (EOS, a stop token,
    max_tokens) fell among them and cut the rest: emitted ≤ accepted + verify_steps.
    """

    verify_steps: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0

    def record(self, num_proposed: int, num_accepted: int, num_emitted: int) -> None:
        self.verify_steps += 1
        self.proposed += num_proposed
        self.accepted += num_accepted
        self.emitted += num_emitted

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed drafts."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step: accepted drafts + the target's own token."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.verify_steps, self.proposed, self.accepted, self.emitted)
