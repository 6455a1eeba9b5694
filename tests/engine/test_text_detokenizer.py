"""Incremental detokenization: the streamed deltas add up to the full decode, never carry a
broken character, and each step decodes a bounded window — on byte-level BPE and on
SentencePiece byte fallback (``<0xE2>`` tokens)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmesh.engine.text.detokenizer import IncrementalDetokenizer
from llmesh.engine.text.tokenizer import Tokenizer
from tests.fixtures.tiny_tokenizer import build_tiny_sentencepiece_tokenizer, build_tiny_tokenizer

FFFD = "\ufffd"
MULTIBYTE = "a€😀你b"  # 1 + 3 + 4 + 3 + 1 bytes


class RecordingTokenizer(Tokenizer):
    """Remembers the longest id list it was asked to decode (the detokenizer's window)."""

    longest = 0

    def decode(self, ids, skip_special_tokens=True):
        self.longest = max(self.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def _gpt2_byte_spelling() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> RecordingTokenizer:
    path = str(tmp_path_factory.mktemp("tiny-tok"))
    build_tiny_tokenizer(path)
    return RecordingTokenizer.from_hf_folder(path)


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> RecordingTokenizer:
    path = str(tmp_path_factory.mktemp("sp-tok"))
    build_tiny_sentencepiece_tokenizer(path)
    return RecordingTokenizer.from_hf_folder(path)


def byte_tokens(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte: GPT-2 byte spelling, or SentencePiece <0xNN> tokens."""
    vocab = tok.backend.get_vocab()
    if "<0x41>" in vocab:
        return [vocab[f"<0x{b:02X}>"] for b in data]
    spelling = _gpt2_byte_spelling()
    return [vocab[spelling[b]] for b in data]


def stream(tok, ids, chunks=None, skip=True, prompt=()):
    """Feed ``ids`` in chunks of the given sizes (default 1); return the deltas, flush last."""
    det = IncrementalDetokenizer(tok, list(prompt), skip_special_tokens=skip)
    sizes = chunks or [1] * len(ids)
    deltas, i = [], 0
    for n in sizes:
        deltas.append(det.add(ids[i:i + n]))
        i += n
    assert i == len(ids)
    deltas.append(det.flush())
    return deltas


def all_splits(n: int):
    """Every way to cut a sequence of n items into consecutive non-empty chunks."""
    for cuts in itertools.product((False, True), repeat=max(n - 1, 0)):
        sizes, size = [], 1
        for cut in cuts:
            if cut:
                sizes.append(size)
                size = 1
            else:
                size += 1
        yield sizes + [size]


# ---- multi-byte characters split every possible way -----------------------------------
@pytest.mark.parametrize("which", ["tiny", "sp"])
def test_every_split_of_byte_tokens(which, request):
    tok = request.getfixturevalue(which)
    ids = byte_tokens(tok, MULTIBYTE.encode())
    assert tok.decode(ids) == MULTIBYTE
    for sizes in all_splits(len(ids)):
        deltas = stream(tok, ids, sizes)
        assert "".join(deltas) == MULTIBYTE
        assert not any(FFFD in d for d in deltas), sizes


@pytest.mark.parametrize("which", ["tiny", "sp"])
def test_every_split_of_real_encodings(which, request):
    tok = request.getfixturevalue(which)
    for text in ["héllo 你好 🙂!", " 👨‍👩‍👧 ok", "€😀 x"]:
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids)
        splits = list(all_splits(len(ids)))
        for sizes in random.Random(0).sample(splits, min(len(splits), 400)):
            deltas = stream(tok, ids, sizes)
            assert "".join(deltas) == full
            assert not any(FFFD in d for d in deltas)


def test_incomplete_character_is_held_then_released(tiny):
    euro = byte_tokens(tiny, "€".encode())
    det = IncrementalDetokenizer(tiny, [])
    assert det.add(tiny.encode("ab")) == "ab"
    assert det.add(euro[:1]) == "" and det.add(euro[1:2]) == ""
    assert det.add(euro[2:]) == "€"
    assert det.flush() == ""


def test_text_before_an_incomplete_character_is_not_held(sp):
    det = IncrementalDetokenizer(sp, [])
    ids = sp.encode("hello world", add_special_tokens=False)
    assert det.add(ids + byte_tokens(sp, b"\xe2")) == "hello world"
    assert det.add(byte_tokens(sp, b"\x82\xac")) == "€"


def test_flush_turns_a_truncated_character_into_replacement(tiny, sp):
    for tok in (tiny, sp):
        ids = tok.encode("ok", add_special_tokens=False) + byte_tokens(tok, b"\xf0\x9f\x98")
        deltas = stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)
        assert deltas[-1].startswith(FFFD) and FFFD not in "".join(deltas[:-1])


# ---- SentencePiece spaces and special tokens --------------------------------------------
def test_sentencepiece_leading_space_matches_full_decode(sp):
    ids = sp.encode("Hello big world", add_special_tokens=False)
    assert sp.convert_ids_to_tokens(ids)[0].startswith("▁")
    deltas = stream(sp, ids, prompt=sp.encode("prompt"))
    assert "".join(deltas) == sp.decode(ids) == "Hello big world"
    assert any(d.startswith(" ") for d in deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_between_words(sp, skip):
    hello, world = sp.encode("Hello", False), sp.encode(" world", False)
    for middle in ([2], [2, 1, 2]):
        ids = hello + middle + world + middle
        assert "".join(stream(sp, ids, skip=skip)) == sp.decode(ids, skip_special_tokens=skip)


def test_prompt_is_not_part_of_the_output(tiny):
    ids = tiny.encode(" and more")
    assert "".join(stream(tiny, ids, prompt=tiny.encode("A prompt"))) == " and more"


# ---- properties ---------------------------------------------------------------------------
chunking = st.lists(st.integers(1, 4), min_size=1, max_size=80)


def _sizes(n: int, chunks: list[int]) -> list[int]:
    sizes, i = [], 0
    for c in itertools.cycle(chunks):
        if i >= n:
            break
        sizes.append(min(c, n - i))
        i += sizes[-1]
    return sizes


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text(max_size=40), chunks=chunking, skip=st.booleans())
def test_streamed_text_equals_decode_of_encoded_text(tiny, sp, text, chunks, skip):
    for tok in (tiny, sp):
        ids = tok.encode(text)
        deltas = stream(tok, ids, _sizes(len(ids), chunks), skip=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
        assert not any(FFFD in d for d in deltas)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data(), chunks=chunking, skip=st.booleans())
def test_streamed_text_equals_decode_of_random_ids(tiny, sp, data, chunks, skip):
    for tok in (tiny, sp):
        ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=60))
        full = tok.decode(ids, skip_special_tokens=skip)
        joined = "".join(stream(tok, ids, _sizes(len(ids), chunks), skip=skip))
        # Byte-level decoding is local, so even invalid bytes stream exactly; with byte
        # fallback a later byte can invalidate text already sent, so only valid text must.
        if tok is tiny or FFFD not in full:
            assert joined == full


@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.data())
def test_high_bytes_stream_exactly(tiny, data):
    """Runs of lead/continuation bytes (the hardest case) still add up to the decode."""
    raw = data.draw(st.binary(max_size=40).map(lambda b: bytes(x | 0x80 for x in b)))
    ids = byte_tokens(tiny, raw)
    assert "".join(stream(tiny, ids)) == tiny.decode(ids)


# ---- cost ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["text", "random", "high-bytes"])
def test_each_step_decodes_a_bounded_window(tiny, kind):
    rng = random.Random(7)
    if kind == "text":
        ids = tiny.encode("Streaming 你好 😀 text, word by word. " * 200)
    elif kind == "random":
        ids = [rng.randrange(tiny.vocab_size) for _ in range(3000)]
    else:
        ids = byte_tokens(tiny, bytes(rng.randrange(0x80, 0x100) for _ in range(3000)))
    tiny.longest = 0
    assert "".join(stream(tiny, ids)) == tiny.decode(ids)
    # flush() decodes only the window too; the full decode above is the one long call.
    tiny.longest = 0
    stream(tiny, ids)
    # Invalid bytes are held a little longer before the window may slide past them.
    assert tiny.longest <= (40 if kind == "high-bytes" else 16)
