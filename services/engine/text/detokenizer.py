"""Streaming detokenization: turn generated token ids into text deltas as they arrive.

A token is not a unit of text: byte-level BPE tokens (GPT-2, Llama 3, SmolLM) and
SentencePiece byte-fallback tokens (``<0xE2>``) can each hold part of one UTF-8
character, and SentencePiece decoders drop the leading space of whatever comes first.
So, like vLLM and TGI, this decodes a short *window* of recent tokens with the
tokenizer's own decoder and emits the part of the window's text that is new:

* ``prefix_offset``..``read_offset`` is context whose text was already emitted; it is
  decoded too, so the new tokens are decoded as they would be inside the full text;
* text that ends in U+FFFD (an incomplete character) is held until a later token
  completes it; what lies before the trailing U+FFFD run is final and is sent at once;
* when the window is complete it slides forward to the tokens just emitted, so each
  step decodes a handful of tokens, not the whole output.

The emitted text is the decode of the *output* tokens alone: concatenating every delta
and ``flush()`` gives ``tokenizer.decode(output_ids)`` for any output that decodes to
valid text (e.g. a SentencePiece model's first word has no leading space, as in
transformers). Only a genuinely invalid byte sequence can make a stream differ from the
full decode, as it must: a stream cannot take back text it already sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmesh.engine.text.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
_MAX_HELD_TOKENS = 6
"""Held tokens beyond which the window looks for a boundary it can slide to anyway
(invalid bytes would otherwise keep the window growing: a real character needs ≤ 4)."""
_MIN_TAIL_TOKENS = 3
"""Content tokens that must follow such a boundary: a UTF-8 character cut by the boundary
has at most 3 bytes after it, so with 3 tokens (≥ 1 byte each) after the boundary the
character is either whole in the window or will never be valid."""
_MAX_BOUNDARY_PROBES = 4
"""Boundaries tried per step (the newest ones; older ones were tried in earlier steps)."""
_FORCE_SLIDE_TOKENS = 16
"""Held tokens past which the stream is treated as invalid bytes (see _slide_to_boundary)."""


class IncrementalDetokenizer:
    """Text deltas for one request's output tokens; never splits a UTF-8 character.

    ``prompt_token_ids`` keeps vLLM's constructor shape but is deliberately not used as
    decoding context: the text is the output's own, as ``tokenizer.decode(output_ids)``
    gives it (vLLM's prompt context would add a leading space to a SentencePiece
    model's first word).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        """Every output token id added so far."""
        self._prefix_offset = 0
        """Start of the decode window (context whose text was sent)."""
        self._read_offset = 0
        """Tokens before this index have all their text sent."""
        self._prefix_len = 0
        """len(decode(token_ids[prefix_offset:read_offset]))."""
        self._sent = 0
        """Characters of the window's text past ``_prefix_len`` already sent while holding."""

    def add(self, token_ids: Sequence[int]) -> str:
        """Append new output tokens; return the text that became final (may be "")."""
        if not token_ids:
            return ""
        self.token_ids.extend(int(t) for t in token_ids)
        text = self._decode(self._prefix_offset)
        sent = self._prefix_len + self._sent
        if not text.endswith(_REPLACEMENT):
            self._slide(len(self.token_ids))
            return text[sent:]
        # Incomplete character at the end: everything before the trailing U+FFFD run is final.
        stable = len(text.rstrip(_REPLACEMENT))
        delta = ""
        if stable > sent:
            delta, self._sent = text[sent:stable], stable - self._prefix_len
        if len(self.token_ids) - self._read_offset > _MAX_HELD_TOKENS:
            delta += self._slide_to_boundary(text)
        return delta

    def flush(self) -> str:
        """The request ended: return whatever is still held (an incomplete tail → U+FFFD)."""
        text = self._decode(self._prefix_offset)
        delta = text[self._prefix_len + self._sent:]
        self._slide(len(self.token_ids))
        return delta

    # ---- window bookkeeping ---------------------------------------------------------
    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], self.skip_special_tokens)

    def _slide(self, end: int, sent_past_end: int = 0) -> None:
        """Make token_ids[read_offset:end] the new context; its text has been sent."""
        start = self._read_offset
        context = self._decode(start, end)
        if not context and start < end:
            # Only skipped special tokens: keep the older context, or a SentencePiece
            # decoder would treat the next word as the first and drop its space.
            start = self._prefix_offset
            context = self._decode(start, end)
        self._prefix_offset, self._read_offset = start, end
        self._prefix_len, self._sent = len(context), sent_past_end

    def _slide_to_boundary(self, text: str) -> str:
        """Slide past held tokens whose text can no longer change; returns text to send.

        Tried when many tokens are held. A boundary j (with enough tokens after it that a
        character cut at j would already be whole) qualifies when the text up to j is
        complete, or when decoding the window in two parts at j gives the whole text and
        the part before j is final (inside ``stable``: a later token cannot change it).
        Past ``_FORCE_SLIDE_TOKENS`` held tokens the stream is garbage (valid text has a
        complete boundary every few bytes), and the split-equality alone is enough.
        """
        special = self.tokenizer.special_token_ids if self.skip_special_tokens else frozenset()
        stable = len(text.rstrip(_REPLACEMENT))
        force = len(self.token_ids) - self._read_offset > _FORCE_SLIDE_TOKENS
        sent = self._prefix_len + self._sent
        content_after, probes = 0, 0
        for j in range(len(self.token_ids) - 1, self._read_offset, -1):
            content_after += self.token_ids[j] not in special
            if content_after < _MIN_TAIL_TOKENS:
                continue
            head = self._decode(self._prefix_offset, j)
            whole = head + self._decode(j) == text
            complete = not head.endswith(_REPLACEMENT) and (whole or sent <= len(head))
            if complete or (whole and (len(head) <= stable or force)):
                self._slide(j, sent_past_end=max(sent, len(head)) - len(head) if whole else 0)
                return head[sent:]
            probes += 1
            if probes == _MAX_BOUNDARY_PROBES and not force:
                break
        return ""
