"""One request's grammar matcher: which tokens it may take next, advanced token by token."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import xgrammar as xgr


class GrammarState:
    """The matcher of one request, kept on the request in the core (``Request.grammar``).

    The request's stop tokens (its EOS ids and stop_token_ids) are the grammar's: once the
    grammar is complete only they are allowed, so a constrained request ends with STOP.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: Iterable[int]) -> None:
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=sorted(set(stop_token_ids)) or None)

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        return self._matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, 1 bit per token)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past ``token_id``; False when the grammar does not allow it."""
        return self._matcher.accept_token(token_id)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many leading ``token_ids`` the grammar accepts in turn, the state left as it was
        (drafts are cut at the first token it refuses). A draft that would end the grammar
        (its stop token) is cut too: a verify row after it would ask a finished matcher for
        a mask, and the target emits the stop token itself at that row anyway."""
        n = 0
        for t in token_ids:
            if not self._matcher.accept_token(t):
                break
            if self._matcher.is_terminated():
                self._matcher.rollback(1)
                break
            n += 1
        if n:
            self._matcher.rollback(n)
        return n

    def fill_rows(self, bitmask: torch.Tensor, first_row: int, drafts: tuple[int, ...]) -> None:
        """Rows ``first_row + j`` (j = 0..len(drafts)): the tokens allowed after ``drafts[:j]``;
        the state is left as it was. Drafts are grammar-valid (see ``valid_prefix``)."""
        self.fill(bitmask, first_row)
        for j, t in enumerate(drafts):
            if not self._matcher.accept_token(t) or self._matcher.is_terminated():
                raise RuntimeError(f"grammar: draft token {t} was not checked before verification")
            self.fill(bitmask, first_row + j + 1)
        if drafts:
            self._matcher.rollback(len(drafts))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self._matcher.is_terminated()


_BATCH: xgr.BatchGrammarMatcher | None = None


def _batch_matcher() -> xgr.BatchGrammarMatcher:
    global _BATCH
    if _BATCH is None:
        _BATCH = xgr.BatchGrammarMatcher()  # threads: half the host's cores
    return _BATCH


def apply_bitmask(logits: torch.Tensor, states: list[tuple[int, GrammarState, tuple[int, ...]]]) -> None:
    """Set to -inf, in place, every token the grammar of row ``i`` does not allow next.

    ``states`` holds (first row, the request's matcher, drafts): rows ``i .. i + len(drafts)``
    get the mask after each prefix of the drafts (a verify chunk; no drafts: row i alone).
    The bitmask is filled on the host (the matchers are host objects) and applied on the
    logits' device. On a GPU it goes over in pinned memory: a copy from pageable memory
    would wait for the queued forward pass, which the fill is meant to overlap.
    """
    # logits: [N, V] float32
    if not states:
        return
    # One bitmask row per logits row, as xgrammar indexes it; only the rows in ``states``
    # are filled and applied, so unconstrained rows of a mixed batch are left alone.
    on_gpu = logits.device.type != "cpu"
    words = (logits.shape[1] + 31) // 32
    bitmask = torch.full((logits.shape[0], words), -1, dtype=torch.int32, pin_memory=on_gpu)  # [N, W], host
    indices, plain, plain_rows = [], [], []
    for i, state, drafts in states:
        if drafts:  # each row after a draft needs the matcher advanced: one request at a time
            state.fill_rows(bitmask, i, drafts)
        else:
            plain.append(state.matcher)
            plain_rows.append(i)
        indices.extend(range(i, i + len(drafts) + 1))
    if len(plain) > 1:
        # A JSON-schema row costs ~0.1 ms to fill at a 128k vocabulary: a batch of them fills
        # on xgrammar's threads, outside the GIL, instead of one after another.
        _batch_matcher().batch_fill_next_token_bitmask(plain, bitmask, plain_rows)
    elif plain:
        plain[0].fill_next_token_bitmask(bitmask, plain_rows[0])
    if on_gpu:
        bitmask = bitmask.to(logits.device, non_blocking=True)
        indices = torch.tensor(indices, dtype=torch.int32, pin_memory=True).to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=indices)
