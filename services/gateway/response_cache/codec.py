"""A stream's messages as one Redis value, kept message by message so that a hit is
replayed with the chunking (and n > 1 interleaving) of the answer that was stored.

Layout: ``MAGIC`` then, per message, its length (4 bytes, little-endian) and its
serialized ``GenerateResponse``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

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


def decode(value: bytes) -> list[common_pb2.GenerateResponse]:
    if not value.startswith(MAGIC):
        raise CorruptEntry("the entry does not start with the response cache's marker")
    out, pos = [], len(MAGIC)
    while pos < len(value):
        if pos + 4 > len(value):
            raise CorruptEntry("the entry ends inside a length")
        (size,) = struct.unpack_from("<I", value, pos)
        pos += 4
        if pos + size > len(value):
            raise CorruptEntry("the entry ends inside a message")
        resp = common_pb2.GenerateResponse()
        try:
            resp.ParseFromString(value[pos:pos + size])
        except DecodeError as e:
            raise CorruptEntry(f"a message does not parse ({e})") from None
        out.append(resp)
        pos += size
    if not out:
        raise CorruptEntry("the entry holds no message")
    return out
