"""Stop strings over streamed deltas: the text before the first stop is emitted, the stop
string never is (not even in part), whatever the cut into deltas."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmesh.engine.errors import InvalidRequestError
from llmesh.engine.text.stop import StopResult, StopStringMatcher


def run(stops, deltas):
    """Feed all deltas; return (emitted text, stop string or None, per-feed texts)."""
    m = StopStringMatcher(stops)
    pieces = []
    for d in deltas:
        res = m.feed(d)
        pieces.append(res.text)
        if res.stopped:
            return "".join(pieces), res.stop_string, pieces
    pieces.append(m.flush())
    return "".join(pieces), None, pieces


def reference(stops, text):
    """The first stop to complete (smallest end, then earliest start) cuts the text."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0] + len(best[1]), best[0])):
            best = (i, s)
    return (text, None) if best is None else (text[: best[0]], best[1])


def test_stop_inside_one_delta():
    assert run(["STOP"], ["hello STOP world"])[:2] == ("hello ", "STOP")


def test_stop_spanning_deltas_is_never_partially_emitted():
    text, stop, pieces = run(["<|end|>"], ["Hi <", "|e", "nd", "|> more"])
    assert (text, stop) == ("Hi ", "<|end|>")
    assert pieces == ["Hi ", "", "", ""]


def test_false_start_is_released():
    text, stop, pieces = run(["<|end|>"], ["a <|e", "x", "!"])
    assert (text, stop) == ("a <|ex!", None)
    assert pieces == ["a ", "<|ex", "!", ""]


def test_stop_at_the_very_start():
    assert run(["##"], ["#", "#rest"])[:2] == ("", "##")
    assert run(["##"], ["##"])[:2] == ("", "##")


def test_multiple_stops_first_to_complete_wins():
    assert run(["world", "lo"], ["hello world"])[:2] == ("hel", "lo")
    # "bc" completes before "abcd" could: streaming cannot wait for the longer one.
    assert run(["abcd", "bc"], ["a", "b", "c", "d"])[:2] == ("a", "bc")
    # Same end: the longer (earlier-starting) stop is reported.
    assert run(["bc", "abc"], ["xab", "c"])[:2] == ("x", "abc")


def test_overlapping_stops_and_self_overlap():
    assert run(["aab"], ["a", "a", "a", "b"])[:2] == ("a", "aab")
    assert run(["abab", "bac"], ["ab", "a", "c"])[:2] == ("a", "bac")


def test_holds_back_at_most_longest_stop_minus_one():
    m = StopStringMatcher(["xyz", "longstop"])
    res = m.feed("text ending in longsto")
    assert res.text == "text ending in " and not res.stopped
    assert m.flush() == "longsto"


def test_after_a_stop_nothing_more_is_emitted():
    m = StopStringMatcher(["."])
    assert m.feed("one. two") == StopResult("one", True, ".")
    assert m.feed("more") == StopResult("", True, ".")
    assert m.flush() == "" and m.stopped


def test_no_stops_pass_through():
    m = StopStringMatcher([])
    assert m.feed("anything") == StopResult("anything") and m.flush() == ""


def test_unicode_stops():
    assert run(["。"], ["你好", "。再见"])[:2] == ("你好", "。")
    assert run(["🛑"], ["go ", "🛑"])[:2] == ("go ", "🛑")


@pytest.mark.parametrize("bad", [[""], [None], [3]])
def test_invalid_stops_are_rejected(bad):
    with pytest.raises(InvalidRequestError) as err:
        StopStringMatcher(bad)
    assert err.value.field == "stop"


def _cut(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:])] or [""]


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    text=st.text(alphabet="abc.", max_size=30),
    stops=st.lists(st.text(alphabet="abc.", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=12),
)
def test_any_cut_gives_the_text_before_the_first_stop(text, stops, cuts):
    expected_text, expected_stop = reference(stops, text)
    got_text, got_stop, pieces = run(stops, _cut(text, cuts))
    assert got_text == expected_text
    assert got_stop == expected_stop
    # Emitted so far is always a prefix of the final answer: nothing was taken back, so a
    # stop string that later matched was never sent even in part.
    sent = ""
    for p in pieces:
        sent += p
        assert expected_text.startswith(sent)
