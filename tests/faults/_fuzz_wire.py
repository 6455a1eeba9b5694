"""Fuzzed protobuf wire bytes for any message type, generated from its descriptor.

Bytes are written on the wire level (not through the generated classes), so they can hold
what no well-behaved client sends: random bytes, valid messages cut short, varints past a
field's range (negative into uint32, 64-bit into 32-bit), unknown enum numbers, NaN and
infinite floats, invalid UTF-8, strings of hundreds of KB, known field numbers with the
wrong wire type (a oneof's string as a varint, its message as a fixed64), a field
repeated tens of thousands of times, groups nested past the parser's depth limit.
Every case comes from a seeded ``random.Random``, so a failure names a seed that replays it.
"""

from __future__ import annotations

import random
import struct

from google.protobuf.descriptor import Descriptor, FieldDescriptor

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_F = FieldDescriptor
_VARINT_TYPES = {_F.TYPE_INT32, _F.TYPE_INT64, _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_SINT32,
                 _F.TYPE_SINT64, _F.TYPE_BOOL, _F.TYPE_ENUM}
_I32_TYPES = {_F.TYPE_FLOAT, _F.TYPE_FIXED32, _F.TYPE_SFIXED32}
_I64_TYPES = {_F.TYPE_DOUBLE, _F.TYPE_FIXED64, _F.TYPE_SFIXED64}
_EXTREME_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 511, 512, 4096]
_EXTREME_FLOATS = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, -1e38, 3.4e38,
                   1e-45, 2.0, 0.5, 1e308]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "user", "system", "tiny", "auto"]
_STRING_HINTS = {"model": ["tiny", "auto"], "namespace": ["tiny"], "role": ["user", "system", "assistant"],
                 "tier": ["interactive", "batch"]}
"""Field names that get a value the service knows half the time, so that fuzzing reaches
past the first lookup into validation and generation."""


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint((number << 3) | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return tag(number, LEN) + varint(len(payload)) + payload


def _wire_type(field: FieldDescriptor) -> int:
    if field.type in _VARINT_TYPES:
        return VARINT
    if field.type in _I32_TYPES:
        return I32
    if field.type in _I64_TYPES:
        return I64
    return LEN


class WireFuzzer:
    """Fuzz cases for one message type; ``case(rng)`` returns (kind, bytes)."""

    KINDS = ("random", "truncated", "plausible", "extreme", "wrong_wire_type", "long_string", "repetition",
             "deep_nesting", "invalid_utf8")

    def __init__(self, descriptor: Descriptor, max_depth: int = 3) -> None:
        self.descriptor = descriptor
        self.max_depth = max_depth

    def case(self, rng: random.Random) -> tuple[str, bytes]:
        kind = rng.choice(self.KINDS)
        return kind, getattr(self, "_" + kind)(rng)

    # ---- values ---------------------------------------------------------------------------
    def _scalar(self, field: FieldDescriptor, rng: random.Random, extreme: bool) -> bytes:
        t = field.type
        if t in _VARINT_TYPES:
            if t == _F.TYPE_ENUM:
                n = rng.choice([*(v.number for v in field.enum_type.values), -1, 99, 2**31 - 1]) if extreme \
                    else rng.choice([v.number for v in field.enum_type.values])
            elif t == _F.TYPE_BOOL:
                n = rng.choice([0, 1, 2, 2**64 - 1]) if extreme else rng.randint(0, 1)
            else:
                n = rng.choice(_EXTREME_INTS) if extreme else rng.randint(0, 500)
            if t in (_F.TYPE_SINT32, _F.TYPE_SINT64):
                n = (n << 1) ^ (n >> 63)
            return tag(field.number, VARINT) + varint(n)
        if t in _I32_TYPES:
            if t == _F.TYPE_FLOAT:
                x = rng.choice(_EXTREME_FLOATS) if extreme else rng.uniform(0, 2)
                try:
                    packed = struct.pack("<f", x)
                except OverflowError:
                    packed = struct.pack("<f", float("inf"))
            else:
                packed = struct.pack("<I", rng.choice(_EXTREME_INTS) & 0xFFFFFFFF)
            return tag(field.number, I32) + packed
        if t in _I64_TYPES:
            packed = (struct.pack("<d", rng.choice(_EXTREME_FLOATS) if extreme else rng.uniform(0, 2))
                      if t == _F.TYPE_DOUBLE else struct.pack("<Q", rng.choice(_EXTREME_INTS) & (2**64 - 1)))
            return tag(field.number, I64) + packed
        if t == _F.TYPE_STRING:
            hints = _STRING_HINTS.get(field.name)
            if hints and rng.random() < 0.5:
                text = rng.choice(hints)
            elif extreme and rng.random() < 0.3:
                text = rng.choice(["", "\x00", "🦊" * rng.randint(1, 50), "a" * rng.randint(1000, 20000)])
            else:
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
            return length_delimited(field.number, text.encode())
        if t == _F.TYPE_BYTES:
            return length_delimited(field.number, rng.randbytes(rng.randint(0, 64)))
        raise AssertionError(f"unhandled field type {t}")

    def _field(self, field: FieldDescriptor, rng: random.Random, depth: int, extreme: bool) -> bytes:
        if field.type in (_F.TYPE_MESSAGE, _F.TYPE_GROUP):
            if depth >= self.max_depth:
                return b""
            return length_delimited(field.number, self._message(field.message_type, rng, depth + 1, extreme))
        if field.is_repeated and field.type in _VARINT_TYPES and rng.random() < 0.5:
            # Packed encoding, as proto3 clients send repeated scalars.
            values = [rng.choice(_EXTREME_INTS) if extreme else rng.randint(0, 500)
                      for _ in range(rng.randint(0, 40))]
            return length_delimited(field.number, b"".join(varint(v) for v in values))
        return self._scalar(field, rng, extreme)

    def _message(self, descriptor: Descriptor, rng: random.Random, depth: int, extreme: bool) -> bytes:
        out = bytearray()
        for field in descriptor.fields:
            if rng.random() < 0.35:
                continue
            count = rng.randint(1, 6) if field.is_repeated else 1
            for _ in range(count):
                out += self._field(field, rng, depth, extreme)
        return bytes(out)

    # ---- kinds ----------------------------------------------------------------------------
    def _random(self, rng: random.Random) -> bytes:
        return rng.randbytes(rng.randint(0, 300))

    def _plausible(self, rng: random.Random) -> bytes:
        return self._message(self.descriptor, rng, 0, extreme=False)

    def _truncated(self, rng: random.Random) -> bytes:
        data = self._message(self.descriptor, rng, 0, extreme=rng.random() < 0.5)
        return data[:rng.randint(0, max(0, len(data) - 1))]

    def _extreme(self, rng: random.Random) -> bytes:
        return self._message(self.descriptor, rng, 0, extreme=True)

    def _wrong_wire_type(self, rng: random.Random) -> bytes:
        out = bytearray(self._message(self.descriptor, rng, 0, extreme=False))
        for field in rng.sample(list(self.descriptor.fields), k=min(3, len(self.descriptor.fields))):
            wrong = rng.choice([w for w in (VARINT, I64, LEN, I32) if w != _wire_type(field)])
            payload = {VARINT: varint(rng.choice(_EXTREME_INTS)), I64: rng.randbytes(8), I32: rng.randbytes(4),
                       LEN: varint(n := rng.randint(0, 40)) + rng.randbytes(n)}[wrong]
            out += tag(field.number, wrong) + payload
        return bytes(out)

    def _long_string(self, rng: random.Random) -> bytes:
        out = bytearray(self._message(self.descriptor, rng, 0, extreme=False))
        strings = [f for f in self.descriptor.fields if f.type == _F.TYPE_STRING]
        if strings:
            field = rng.choice(strings)
            out += length_delimited(field.number, (rng.choice(WORDS) + " ").encode() * rng.randint(10_000, 60_000))
        else:
            out += length_delimited(rng.randint(50, 500), b"x" * rng.randint(10_000, 300_000))
        return bytes(out)

    def _repetition(self, rng: random.Random) -> bytes:
        out = bytearray(self._message(self.descriptor, rng, 0, extreme=False))
        if not self.descriptor.fields:
            return bytes(out) + (tag(7, VARINT) + varint(1)) * rng.randint(1000, 50_000)
        field = rng.choice(list(self.descriptor.fields))
        n = rng.randint(1000, 50_000)
        if field.type in _VARINT_TYPES and field.is_repeated:
            out += length_delimited(field.number, b"".join(varint(rng.randint(0, 500)) for _ in range(n)))
        else:
            one = self._field(field, rng, 0, extreme=False) or (tag(field.number, LEN) + varint(0))
            out += one * min(n, max(1, 2_000_000 // max(1, len(one))))
        return bytes(out)

    def _deep_nesting(self, rng: random.Random) -> bytes:
        depth = rng.choice([10, 100, 1000, 20_000])
        number = rng.randint(100, 1000)
        if rng.random() < 0.5:
            return tag(number, SGROUP) * depth + tag(number, EGROUP) * depth
        inner = b""
        for _ in range(min(depth, 2000)):
            inner = length_delimited(number, inner)
        return inner

    def _invalid_utf8(self, rng: random.Random) -> bytes:
        out = bytearray(self._message(self.descriptor, rng, 0, extreme=False))
        strings = [f for f in self.descriptor.fields if f.type == _F.TYPE_STRING]
        if strings:
            out += length_delimited(rng.choice(strings).number, b"\xff\xfe" + rng.randbytes(rng.randint(0, 30)))
        return bytes(out)
