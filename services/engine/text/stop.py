"""Stop strings over a stream of text deltas.

A stop string can arrive split over several tokens ("<|", "end", "|>"), so text is only
released once it can no longer be the start of a stop string: the matcher holds back the
longest tail of the text seen that is a proper prefix of some stop string (at most
``max(len(stop)) - 1`` characters) and releases it when the next delta rules it out.

Which stop wins is decided by position alone, so the result does not depend on how the
text was cut into deltas: the occurrence that *completes* first (smallest end), and of
those the one that starts first (the longest). That is the first stop a streaming
client could have seen. The output is the text before it; the stop string is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmesh.engine.errors import InvalidRequestError

__all__ = ["StopResult", "StopStringMatcher"]


@dataclass(frozen=True)
class StopResult:
    """What one ``feed`` released."""

    text: str
    """Text that is safe to emit now (never part of a stop string)."""
    stopped: bool = False
    """A stop string matched: the request is done; ``text`` ends just before it."""
    stop_string: str | None = None
    """The stop string that matched, when ``stopped``."""


class StopStringMatcher:
    """Finds the first stop string in a stream of deltas, holding back possible prefixes."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        for s in stops:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError(f"stop strings must be non-empty strings, got {s!r}",
                                          field="stop")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._prefixes = frozenset(s[:k] for s in self.stops for k in range(1, len(s)))
        self._held = ""
        self._result: StopResult | None = None

    @property
    def stopped(self) -> bool:
        return self._result is not None

    def feed(self, delta: str) -> StopResult:
        """Add the next text delta; return the text now safe to emit, or the stop."""
        if self._result is not None:
            return StopResult("", True, self._result.stop_string)
        if not self.stops:
            return StopResult(delta)
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._held = ""
            self._result = StopResult(text[:start], True, stop)
            return self._result
        hold = self._held_tail(text)
        self._held = text[len(text) - hold:] if hold else ""
        return StopResult(text[: len(text) - hold])

    def flush(self) -> str:
        """The request ended for another reason: release the held-back text."""
        held, self._held = self._held, ""
        return "" if self._result is not None else held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        # Each stop's first occurrence is also its earliest-ending one (fixed length).
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            i = text.find(stop)
            if i >= 0:
                key = (i + len(stop), i, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_tail(self, text: str) -> int:
        """Length of the longest tail of ``text`` that a stop string starts with."""
        for k in range(min(self._max_hold, len(text)), 0, -1):
            if text[-k:] in self._prefixes:
                return k
        return 0
