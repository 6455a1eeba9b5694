"""One token's own text and exact bytes, for logprobs (OpenAI's ``token`` and ``bytes``).

Decoding a single id gives readable text but loses bytes: a token holding half of a
UTF-8 character decodes to U+FFFD. The exact bytes come from the vocabulary string: in
byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM) each character stands for one byte
through GPT-2's printable byte map; SentencePiece vocabularies spell raw bytes as
``<0xNN>`` and spaces as ``▁``. Anything else falls back to the UTF-8 of the text.
"""

from __future__ import annotations

import functools

from llmesh.engine.text.tokenizer import Tokenizer


@functools.cache
def _byte_level_map() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode``, inverted: printable character → the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes(piece: str | None, text: str) -> bytes:
    """The bytes a vocabulary string ``piece`` stands for (``text`` is its decoded form)."""
    if piece is None:
        return text.encode("utf-8")
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass  # "<0xZZ>" is not a byte token: an ordinary piece, read below
    byte_map = _byte_level_map()
    if piece and all(c in byte_map for c in piece) and "▁" not in piece:
        raw = bytes(byte_map[c] for c in piece)
        # A special token ("<|im_end|>") is printable ASCII too: its bytes are its text.
        if raw.decode("utf-8", errors="replace") == text or "\ufffd" in text:
            return raw
    return text.encode("utf-8")


class TokenTexts:
    """Token id → (text, bytes), cached: a vocabulary is small and its entries never change."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def of(self, token_id: int) -> tuple[str, bytes]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            piece = self._tokenizer.convert_ids_to_tokens([token_id])[0]
            hit = self._cache[token_id] = (text, token_bytes(piece, text))
        return hit
