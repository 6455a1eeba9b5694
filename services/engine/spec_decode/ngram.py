"""N-gram (prompt lookup) proposer: continue the sequence the way it went last time.

The last n tokens (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) are looked
up in the prompt and the output so far; the tokens that followed their most recent
earlier occurrence are the drafts. Answers that copy their input (rewrites, edits,
summaries, code changes) repeat long spans of it, which is where this wins. One numpy
comparison over all windows per n: no Python loop over positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from llmesh.engine.request import Request
from llmesh.engine.spec_decode.proposer import Proposal, Proposer


def ngram_lookup(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest
    suffix of ``tokens`` of length in [min_n, max_n]; empty when no such suffix recurs."""
    # tokens: [L] int64
    length = len(tokens)
    if k <= 0:
        return tokens[:0]
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n:]
        # windows of the history that end before the last token, so each has a successor
        windows = sliding_window_view(tokens[: length - 1], n)  # [L - n, n]
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start: start + k]
    return tokens[:0]


class NgramProposer(Proposer):
    method = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram proposer: need 1 ≤ prompt_lookup_min ≤ prompt_lookup_max, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n

    def propose(self, requests: Sequence[Request], max_tokens: Sequence[int],
                hidden_states=None) -> list[Proposal]:
        out = []
        for req, k in zip(requests, max_tokens):
            tokens = np.asarray(req.all_token_ids, dtype=np.int64)
            out.append(Proposal(ngram_lookup(tokens, self.min_n, self.max_n, k).tolist()))
        return out
