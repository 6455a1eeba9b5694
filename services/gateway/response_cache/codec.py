"""A stream's messages as one Redis value, kept message by message so that a hit is
replayed with the chunking (and n > 1 interleaving) of the answer that was stored.

Layout: ``MAGIC`` then, per message, its length (4 bytes, little-endian) and its
serialized ``GenerateResponse``. ``decode`` checks the whole layout at once (a damaged
entry is a miss) but parses each message only when the replay reaches it: parsing 128
messages up front would cost a hit's first token about half a millisecond.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator

from google.protobuf.message import DecodeError

from llmesh.v1 import common_pb2

MAGIC = b"LRC1"


class CorruptEntry(ValueError):
    """A stored value that is not a well-formed sequence of messages."""


def encode(messages: Iterable[bytes]) -> bytes:
    out = bytearray(MAGIC)
    for data in messages:
        out += struct.pack("<I", len(data))
        out += data
    return bytes(out)


class Entry:
    """A checked entry: its messages, parsed one by one as they are iterated."""

    def __init__(self, value: bytes) -> None:
        if not value.startswith(MAGIC):
            raise CorruptEntry("the entry does not start with the response cache's marker")
        spans, pos = [], len(MAGIC)
        while pos < len(value):
            if pos + 4 > len(value):
                raise CorruptEntry("the entry ends inside a length")
            (size,) = struct.unpack_from("<I", value, pos)
            pos += 4
            if pos + size > len(value):
                raise CorruptEntry("the entry ends inside a message")
            spans.append((pos, pos + size))
            pos += size
        if not spans:
            raise CorruptEntry("the entry holds no message")
        self._value = memoryview(value)
        self._spans = spans
        self.first = self._parse(0)
        """Parsed at once: a first message that does not parse makes the entry a miss."""

    def __len__(self) -> int:
        return len(self._spans)

    def _parse(self, i: int) -> common_pb2.GenerateResponse:
        start, end = self._spans[i]
        resp = common_pb2.GenerateResponse()
        try:
            resp.ParseFromString(self._value[start:end])
        except DecodeError as e:
            raise CorruptEntry(f"message {i} does not parse ({e})") from None
        return resp

    def __iter__(self) -> Iterator[common_pb2.GenerateResponse]:
        """Every message; CorruptEntry from one that does not parse (bytes this gateway
        wrote and Redis kept cannot do that: the layout was checked when it was read)."""
        yield self.first
        for i in range(1, len(self._spans)):
            yield self._parse(i)


def decode(value: bytes) -> list[common_pb2.GenerateResponse]:
    """Every message at once (tests, tools)."""
    return list(Entry(value))
