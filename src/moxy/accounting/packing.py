"""The events' encoding on the pipe to the accounting process (the payload of an EVENTS frame,
moxy.accounting.pipe): a `Packer` in the serving process, `unpack` in the accounting process.

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
objects, a buffer grown and freed per frame). Sessions hand the Packer each event's fields as
arguments, and it packs them at once (no tuple made, none waiting in a list for its batch).
moxy.accounting._packer (the Packer) and moxy.accounting._frames (unpack) do the same as the
class and function below in C, which tests/accounting/test_packing.py holds side by side;
`pack` is a frame's payload at once (for tests and benchmarks).
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Callable, Sequence
from typing import Any

SAME, STR, INT, FLOAT, STRS, OTHER = range(6)
MAX_FIELDS = 255
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct(">I")
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


def _entry(out: bytearray, fields: Sequence[Any], before: Sequence[Any]) -> None:
    """One entry, its fields compared with `before` (the entry before it; () for none)."""
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


def pack(events: Sequence[tuple[Any, ...]]) -> bytes:
    """The payload for `events` (tuples of 1 to 255 fields); ValueError for others."""
    out = bytearray()
    before: tuple[Any, ...] = ()
    for event in events:
        fields = tuple(event)
        _entry(out, fields, before)
        before = fields
    return bytes(out)


class Packer:
    """Entries packed as they come, into frames of the pipe (moxy.accounting.pipe: a `kind`
    byte, the payload's length in 4 bytes big-endian, the payload) of at most `frame_entries`
    entries each; a frame ends too once `frame_bytes` have been written into it. `take`
    returns them all and starts afresh.

    `put(*fields)` is what the serving process's sessions call (as `emit`): it packs the entry
    while fewer than `limit` entries are packed (calling `wake()` when it is the `wake_at`-th,
    so that whoever takes them comes), and otherwise hands it, as a tuple, to `refuse`. An
    entry whose first field is `pair` counts as two events (`events`;
    events.LEG_AND_MESSAGE). An entry that cannot be packed raises ValueError and leaves
    nothing of itself behind, but ends the frame it would have gone into.

    moxy.accounting._packer.Packer is this class in C."""

    def __init__(self, kind: bytes, wake_at: int, limit: int, wake: Callable[[], None],
                 refuse: Callable[[tuple[Any, ...]], None], pair: str, frame_entries: int,
                 frame_bytes: int) -> None:
        if len(kind) != 1 or frame_entries < 1 or frame_bytes < 1:
            raise ValueError("Packer: a kind of one byte, frames of 1 or more")
        self.kind = kind
        self.wake_at = wake_at
        self.limit = limit  # entries `put` packs at most (may be changed)
        self.wake = wake
        self.refuse = refuse
        self.pair = pair
        self.frame_entries = frame_entries
        self.frame_bytes = frame_bytes
        self.entries = 0  # entries packed since the last take
        self.events = 0  # ... counting a `pair` entry as two
        self._out = bytearray()
        self._head = -1  # where the open frame's header is, or -1
        self._in_frame = 0  # entries in the open frame
        self._before: tuple[Any, ...] = ()  # the entry before, in the open frame

    def put(self, *fields: Any) -> None:
        if self.entries >= self.limit:
            self.refuse(fields)
            return
        self.add(fields)
        if self.entries == self.wake_at:
            self.wake()

    def add(self, fields: tuple[Any, ...]) -> None:
        out = self._out
        start = len(out)
        opened = self._head < 0
        if opened:
            self._head, self._in_frame, self._before = start, 0, ()
            out += self.kind + bytes(4)
        try:
            _entry(out, fields, self._before)
        except BaseException:  # it ends the frame it would have gone into
            del out[start:]
            if opened:
                self._head = -1
            self._seal()
            raise
        self._before = tuple(fields)
        self.entries += 1
        self.events += 2 if type(fields[0]) is str and fields[0] == self.pair else 1
        self._in_frame += 1
        if self._in_frame >= self.frame_entries or len(out) - self._head >= self.frame_bytes:
            self._seal()

    def take(self) -> bytes:
        self._seal()
        frames = bytes(self._out)
        self._out = bytearray()
        self.entries = self.events = 0
        return frames

    def _seal(self) -> None:
        head = self._head
        if head >= 0:
            self._out[head + 1:head + 5] = _U32.pack(len(self._out) - head - 5)
            self._head, self._before = -1, ()


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
