"""The events' encoding on the pipe to the accounting process (the payload of an EVENTS frame,
moxy.accounting.pipe): `pack` in the serving process, `unpack` in the accounting process.

Consecutive events of a frame repeat most of their fields (session, client, HELO, sender,
recipients, destination, route, node, reply texts), so a field equal to the same field of the
event before it is one byte. Everything else is written plainly:

    payload := event*
    event   := u8 n (1..255)  field{n}
    field   := 0x00                        SAME: equal to field i of the event before (in
                                                 this payload), which has at least i+1 fields
             | 0x01 len data               a str: `len` bytes of UTF-8 (surrogates passed)
             | 0x02 i64                    an int of 64 bits
             | 0x03 f64                    a float
             | 0x04 count (len data){count}  a tuple of str
             | 0x05 len data               anything else: marshal.dumps(value, 4)
    len, count := unsigned LEB128 (7 bits a byte, low first; at most 9 bytes)
    i64, f64 := 8 bytes, little-endian

"Equal" is: the same object; or, both of the same exact type, an equal str or int, or a
tuple of str whose items are equal. A float is SAME only as the same object (so -0.0 stays
-0.0). Only exact types take the plain forms (a bool is marshalled, a str subclass too).

In the serving process marshal cost about 2,800 instructions a message (its table of written
objects, a buffer grown and freed per frame); moxy.accounting._frames does the same as the
functions below in C, which tests/accounting/test_packing.py holds side by side.
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Sequence
from typing import Any

SAME, STR, INT, FLOAT, STRS, OTHER = range(6)
MAX_FIELDS = 255
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_LOW, _HIGH = -(1 << 63), (1 << 63) - 1


class PackError(ValueError):
    """Not a payload `pack` makes."""


def _length(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _text(out: bytearray, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    _length(out, len(data))
    out += data


def _equal(value: Any, before: Any) -> bool:
    if value is before:
        return True
    kind = type(value)
    if kind is not type(before) or kind is float:
        return False
    if kind is str or kind is int:
        return bool(value == before)
    if kind is tuple:
        return len(value) == len(before) and all(
            type(a) is str and type(b) is str and a == b
            for a, b in zip(value, before, strict=True)
        )
    return False


def pack(events: Sequence[tuple[Any, ...]]) -> bytes:
    """The payload for `events` (tuples of 1 to 255 fields); ValueError for others."""
    out = bytearray()
    before: tuple[Any, ...] = ()
    for event in events:
        fields = tuple(event)
        if not 0 < len(fields) <= MAX_FIELDS:
            raise ValueError(f"an event of {len(fields)} fields")
        out.append(len(fields))
        for i, value in enumerate(fields):
            kind = type(value)
            if i < len(before) and _equal(value, before[i]):
                out.append(SAME)
            elif kind is str:
                out.append(STR)
                _text(out, value)
            elif kind is int and _LOW <= value <= _HIGH:
                out.append(INT)
                out += _I64.pack(value)
            elif kind is float:
                out.append(FLOAT)
                out += _F64.pack(value)
            elif kind is tuple and all(type(item) is str for item in value):
                out.append(STRS)
                _length(out, len(value))
                for item in value:
                    _text(out, item)
            else:
                out.append(OTHER)
                data = marshal.dumps(value, 4)
                _length(out, len(data))
                out += data
        before = fields
    return bytes(out)


def unpack(payload: bytes) -> list[tuple[Any, ...]]:
    """The events of a payload `pack` made; PackError for anything else."""
    view = memoryview(payload)
    end = len(payload)
    at = 0

    def length() -> int:
        nonlocal at
        n = shift = 0
        while True:
            if at >= end or shift > 56:
                raise PackError(f"a bad length at byte {at}")
            byte = payload[at]
            at += 1
            n |= (byte & 0x7F) << shift
            if byte < 0x80:
                return n
            shift += 7

    def data(n: int) -> memoryview:
        nonlocal at
        if n > end - at:
            raise PackError(f"{n} bytes wanted at byte {at}, {end - at} left")
        at += n
        return view[at - n:at]

    def text() -> str:
        try:
            return str(data(length()), "utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise PackError(f"a string that is not UTF-8 before byte {at}") from exc

    events: list[tuple[Any, ...]] = []
    before: tuple[Any, ...] = ()
    while at < end:
        n = payload[at]
        at += 1
        if n == 0:
            raise PackError(f"an event of no fields at byte {at - 1}")
        fields: list[Any] = []
        for i in range(n):
            if at >= end:
                raise PackError("the payload ends inside an event")
            tag = payload[at]
            at += 1
            if tag == SAME:
                if i >= len(before):
                    raise PackError(f"field {i} repeats a field the event before lacks")
                fields.append(before[i])
            elif tag == STR:
                fields.append(text())
            elif tag == INT:
                fields.append(_I64.unpack(data(8))[0])
            elif tag == FLOAT:
                fields.append(_F64.unpack(data(8))[0])
            elif tag == STRS:
                fields.append(tuple([text() for _ in range(length())]))
            elif tag == OTHER:
                try:
                    fields.append(marshal.loads(data(length())))
                except (EOFError, ValueError, TypeError) as exc:
                    raise PackError(f"a marshalled field that is not before byte {at}") from exc
            else:
                raise PackError(f"unknown tag {tag} at byte {at - 1}")
        before = tuple(fields)
        events.append(before)
    return events
