"""Reading Moxy's message log back into `DeliveryEvent`s: text or JSON lines (told apart per
line), plain or gzip-compressed files (told apart by their magic bytes), or standard input.

Files are streamed line by line with a bound on a line's length; a line that is not a log line
is counted in `Malformed` and skipped, never fatal. A file that cannot be read is `InputError`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

import attrs

from moxy.accounting.events import KINDS, DeliveryEvent

GZIP_MAGIC = b"\x1f\x8b"
MAX_LINE = 4 * 1024 * 1024  # far above any real line (1000 recipients of 256 octets)
STDIN_NAME = "<stdin>"
# A size or code: no log line has more digits (sizes are bytes, far below 10**18).
MAX_DIGITS = 18
MAX_COUNT = 10**MAX_DIGITS - 1


class InputError(Exception):
    """A log file cannot be opened or read (missing, a directory, a broken gzip stream)."""


class BadLine(ValueError):
    """A line that is not a log line in either format."""


@attrs.define
class Malformed:
    """Lines skipped so far, and where the first one was."""

    count: int = 0
    first: str = ""  # "FILE:LINE"

    def add(self, where: str) -> None:
        self.count += 1
        if not self.first:
            self.first = where


def read_events(inputs: list[Input], malformed: Malformed) -> Iterator[DeliveryEvent]:
    """Every event of every input in turn."""
    for source in inputs:
        for number, line in _lines(source):
            if line is None:
                malformed.add(f"{source.name}:{number}")
                continue
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            if not text.strip():
                continue  # a blank line says nothing, wrong or right
            try:
                yield parse_line(text)
            except BadLine:
                malformed.add(f"{source.name}:{number}")


@attrs.define
class Input:
    """One LOGFILE argument, opened once to check that it can be read."""

    name: str  # as messages show it: the path, or <stdin>
    path: str | None = None  # a regular file: opened again when its turn comes
    raw: BinaryIO | None = None  # stdin, a pipe, a FIFO, a device: kept, read only once
    owned: bool = True  # False for standard input, which is not ours to close


def open_inputs(names: list[str]) -> list[Input]:
    """Open every input before any output, so that one that cannot be opened fails first.

    A regular file is closed again and reopened when read, so that a rotated set of thousands
    of files does not hold thousands of descriptors. Anything else (`-`, `<(zcat ...)`, a
    FIFO) keeps the handle opened here: what was read from it, or a writer that saw its reader
    go, would be lost by a second open (or the second open would wait for a writer forever)."""
    inputs: list[Input] = []
    try:
        for name in names:
            inputs.append(_stdin_input() if name == "-" else _file_input(name))
    except InputError:
        for opened in inputs:
            if opened.raw is not None and opened.owned:
                opened.raw.close()
        raise
    return inputs


def _stdin_input() -> Input:
    raw = getattr(sys.stdin, "buffer", None)  # None: started with standard input closed
    if raw is None:
        raise InputError(f"{STDIN_NAME}: standard input is closed")
    return Input(STDIN_NAME, raw=raw, owned=False)


def _file_input(name: str) -> Input:
    raw = _open_raw(name)
    try:
        regular = stat.S_ISREG(os.fstat(raw.fileno()).st_mode)
    except OSError as exc:
        raw.close()
        raise InputError(f"{name}: {exc.strerror or exc}") from None
    if regular:
        raw.close()
        return Input(name, path=name)
    return Input(name, raw=raw)


def _open_raw(name: str) -> BinaryIO:
    try:
        return open(name, "rb", buffering=0)
    except OSError as exc:  # missing, unreadable, a directory
        raise InputError(f"{name}: {exc.strerror or exc}") from None


class _Replay(io.RawIOBase):
    """The first bytes already read (to tell gzip from text), then the rest of the stream:
    a pipe cannot seek back to them, and a buffered reader's peek may show fewer than two."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        super().__init__()
        self._head = head
        # One read(2) call at a time, so that a line written to a pipe is seen when it comes.
        self._read = getattr(rest, "read1", rest.read)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            data, self._head = self._head[: len(buffer)], self._head[len(buffer) :]
        else:
            data = self._read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _head(raw: BinaryIO, size: int) -> bytes:
    """The first `size` bytes, fewer only at the end of the stream."""
    head = b""
    while len(head) < size and (chunk := raw.read(size - len(head))):
        head += chunk
    return head


def _stream(source: Input) -> tuple[BinaryIO, BinaryIO]:
    """The stream of lines to read, plain or gunzipped, and the file under it."""
    raw = source.raw if source.raw is not None else _open_raw(source.path or source.name)
    try:
        head = _head(raw, len(GZIP_MAGIC))
    except OSError as exc:  # a directory opened as a device, stdin opened for writing only
        if source.owned:
            raw.close()
        raise InputError(f"{source.name}: {exc.strerror or exc}") from None
    stream: Any = io.BufferedReader(_Replay(head, raw), 64 * 1024)
    if head == GZIP_MAGIC:  # rotated logs follow no suffix rule we could trust
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    return stream, raw


def _lines(source: Input) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) pairs; the line is None when it was longer than MAX_LINE."""
    stream, raw = _stream(source)
    number = 0
    try:
        while True:
            line = stream.readline(MAX_LINE)
            if not line:
                return
            number += 1
            if len(line) == MAX_LINE and not line.endswith(b"\n"):
                while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass  # the rest of an overlong line, read and forgotten
                yield number, None
            else:
                yield number, line
    except (OSError, EOFError, zlib.error) as exc:
        # A truncated or corrupt gzip stream, or an I/O error in the middle of a file.
        raise InputError(f"{source.name}: cannot read line {number + 1}: {exc}") from None
    finally:
        stream.close()  # not the file under a GzipFile, nor standard input
        if source.owned:
            raw.close()


# --- one line --------------------------------------------------------------------------------


def parse_line(text: str) -> DeliveryEvent:
    """A text log line or a JSON-lines record, whichever this line is."""
    return _parse_json(text) if text.lstrip().startswith("{") else _parse_text(text)


def parse_time(stamp: str) -> float:
    """Seconds since the epoch of an ISO 8601 time; without a zone it is UTC."""
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        raise BadLine(f"bad time {stamp!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise BadLine(f"unknown kind {kind!r}")
    return kind


# The text form's fields, in the order `DeliveryEvent.to_log_line` writes them. `node`,
# `reason` and `tls` are optional: logs written before they existed lack them.
_KEYS = (
    "node", "session", "id", "client", "helo", "from", "to", "dest", "route", "size", "code",
    "stage", "reason", "tls", "duration",
)  # fmt: skip
_OPTIONAL = frozenset({"node", "reason", "tls"})
_BRACKETED = frozenset({"from", "to"})  # <address> and <address>,<address>; followed by to=, dest=


def _text_fields(rest: str) -> dict[str, str]:
    """`key=value` fields in their fixed order (`rest` starts with a space).

    Most lines have every field, none with a space in its value: split at the spaces, each
    piece is its field, which is what `_careful_fields` makes of such a line too, at about a
    third of the cost. Any other line is read by `_careful_fields`."""
    pieces = rest.split(" ")
    if len(pieces) == len(_KEYS) + 1:
        fields: dict[str, str] = {}
        for key, piece in zip(_KEYS, pieces[1:], strict=True):
            name, equals, value = piece.partition("=")
            if name != key or not equals:
                break
            fields[key] = value
        else:
            return fields
    return _careful_fields(rest)


def _careful_fields(rest: str) -> dict[str, str]:
    """`key=value` fields in their fixed order. A value ends where the next key starts, so
    values with spaces (a message's `route` lists its groups with spaces) come out whole."""
    fields: dict[str, str] = {}
    pos = 0
    for i, key in enumerate(_KEYS):
        marker = f" {key}="
        if not rest.startswith(marker, pos):
            if key in _OPTIONAL:
                continue
            raise BadLine(f"expected {key}= at column {pos}")
        start = pos + len(marker)
        end = len(rest) if i == len(_KEYS) - 1 else -1
        for later in _KEYS[i + 1 :]:
            found = rest.find(f" {later}=", start)
            if found >= 0 and (end < 0 or found < end):
                end = found
            if later not in _OPTIONAL:
                break
        if key in _BRACKETED and rest.startswith("<", start):
            # A quoted local part may hold ` to=` or ` dest=`: an address list ends at `>`.
            closing = rest.find(f"> {_KEYS[i + 1]}=", start)
            end = closing + 1 if closing >= 0 else end
        if end < 0:
            raise BadLine(f"no field after {key}=")
        fields[key] = rest[start:end]
        pos = end
    if pos != len(rest):
        raise BadLine("text after the last field")
    return fields


def _int(value: str, key: str) -> int:
    # ASCII digits only: str.isdigit() takes "²", which int() refuses. The length bound keeps
    # a line of digits below int()'s limit and the totals printable.
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_DIGITS:
        raise BadLine(f"{key}={value[:40]!r} is not a number")
    return int(value)


def _float(value: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise BadLine(f"{key}={value!r} is not a number") from None


def _addresses(value: str) -> tuple[str, ...]:
    """`<a>,<b>` or `-`."""
    if value == "-":
        return ()
    if not (value.startswith("<") and value.endswith(">")):
        raise BadLine(f"to={value!r} is not a list of <addresses>")
    return tuple(value[1:-1].split(">,<"))


def _dash(value: str) -> str:
    return "" if value == "-" else value


def _parse_text(text: str) -> DeliveryEvent:
    # The reply is last and quoted; `"` inside it is written as `'`, so the last ` reply="`
    # is where it starts.
    head, sep, reply = text.rpartition(' reply="')
    if not sep or not reply.endswith('"'):
        raise BadLine('no reply="..." at the end')
    stamp, _, rest = head.partition(" ")
    kind, space, rest = rest.partition(" ")
    if not space:
        raise BadLine("no fields")
    fields = _text_fields(" " + rest)
    sender = fields["from"]
    if not (sender.startswith("<") and sender.endswith(">")):
        raise BadLine(f"from={sender!r} is not an <address>")
    return DeliveryEvent(
        kind=_kind(kind),
        session_id=fields["session"],
        message_id=_dash(fields["id"]),
        client_ip=fields["client"],
        helo=_dash(fields["helo"]),
        mail_from=sender[1:-1],
        recipients=_addresses(fields["to"]),
        destination=fields["dest"],
        route=_dash(fields["route"]),
        size=_int(fields["size"], "size"),
        code=_int(fields["code"], "code"),
        reply=reply[:-1],
        stage=fields["stage"],
        duration=_float(fields["duration"], "duration"),
        node=_dash(fields.get("node", "-")),
        reason=_dash(fields.get("reason", "-")),
        tls=_dash(fields.get("tls", "-")),
        time=parse_time(stamp),
    )


def _get(record: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = record.get(key, default)
    # bool is an int to Python, never to a log reader.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadLine(f"{key}: {value!r} is not a {kind.__name__}")
    return value


def _count(record: dict[str, Any], key: str) -> int:
    value: int = _get(record, key, int, 0)
    if not 0 <= value <= MAX_COUNT:
        raise BadLine(f"{key}: out of range (negative, or more than {MAX_DIGITS} digits)")
    return value


def _parse_json(text: str) -> DeliveryEvent:
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: `[[[...` nested too deep
        raise BadLine("not JSON") from None
    if not isinstance(record, dict):
        raise BadLine("not a JSON object")
    recipients = _get(record, "to", list, [])
    if not all(isinstance(r, str) for r in recipients):
        raise BadLine("to: not a list of strings")
    duration = record.get("duration", 0.0)
    if not isinstance(duration, int | float) or isinstance(duration, bool):
        raise BadLine(f"duration: {duration!r} is not a number")
    if "time" not in record:
        raise BadLine("no time")
    return DeliveryEvent(
        kind=_kind(_get(record, "kind", str, "")),
        session_id=_get(record, "session", str, ""),
        message_id=_get(record, "id", str, ""),
        client_ip=_get(record, "client", str, ""),
        helo=_get(record, "helo", str, ""),
        mail_from=_get(record, "from", str, ""),
        recipients=tuple(recipients),
        destination=_get(record, "dest", str, "-"),
        route=_get(record, "route", str, ""),
        size=_count(record, "size"),
        code=_count(record, "code"),
        reply=_get(record, "reply", str, ""),
        stage=_get(record, "stage", str, ""),
        duration=float(duration),
        node=_get(record, "node", str, ""),
        reason=_get(record, "reason", str, ""),
        tls=_get(record, "tls", str, ""),
        time=parse_time(_get(record, "time", str, "")),
    )
