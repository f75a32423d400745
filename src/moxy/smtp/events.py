"""What the server-side protocol core reports to the session (h11-style events)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum

import attrs

from moxy.smtp.replies import Reply


class Sentinel(Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # a reply to the last command must be sent before more is parsed


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


@attrs.frozen
class Hello:
    verb: str  # "EHLO" or "HELO"
    domain: str


@attrs.frozen
class MailFrom:
    address: str  # reverse-path without angle brackets; "" for the null sender <>
    params: Mapping[str, str | None] = attrs.field(factory=dict)  # upper-cased keywords
    size: int | None = None  # SIZE= parameter, already checked against the maximum
    body: str | None = None  # BODY= parameter ("7BIT" or "8BITMIME")
    smtputf8: bool = False  # SMTPUTF8 parameter (RFC 6531): UTF-8 addresses and headers


@attrs.frozen
class RcptTo:
    address: str  # forward-path without angle brackets and without source route
    params: Mapping[str, str | None] = attrs.field(factory=dict)


@attrs.frozen
class Data:
    pass


@attrs.frozen
class Reset:
    pass


@attrs.frozen
class StartTls:
    """STARTTLS (RFC 3207). After a 220 the core forgets the session (back to GREETED, no
    HELO) and discards every byte the client sent after the command: the session must then
    wrap its stream in TLS before reading again."""


@attrs.frozen
class Noop:
    pass


@attrs.frozen
class Quit:
    pass


@attrs.frozen
class Verify:
    argument: str


@attrs.frozen
class Help:
    argument: str


@attrs.frozen
class Invalid:
    """The core refused a command itself (syntax, order, unknown, too long, too many errors).

    The session sends `reply` with `send()` like any other reply; if `reply.code == 421`
    the connection is closing. `recipient` is the address of a RCPT refused by a limit (too
    many recipients), for accounting.
    """

    reply: Reply
    recipient: str | None = None


@attrs.frozen
class BodyChunk:
    """Message bytes as they go on the wire: still dot-stuffed, CRLF line endings only.

    The chunks of one message concatenate to everything up to and including the CRLF that
    starts the end-of-data sequence; the final `.CRLF` is never part of a chunk.
    """

    data: bytes


@attrs.frozen
class BodyRefused:
    """The body broke a rule (bare CR/LF, size, line length). Reported once, as soon as seen;
    the rest of the body is read and discarded, then `BodyEnd` follows. `reply` is the final
    reply the client should get."""

    reply: Reply


@attrs.frozen
class BodyEnd:
    """The end-of-data sequence CRLF.CRLF was read."""


BODY_END = BodyEnd()  # no fields: one value serves every message


@attrs.frozen
class ConnectionClosed:
    """The client closed its side (receive_data(b"")). `mid_data` is True inside a body."""

    mid_data: bool


Event = (
    Hello | MailFrom | RcptTo | Data | Reset | StartTls | Noop | Quit | Verify | Help | Invalid
    | BodyChunk | BodyRefused | BodyEnd | ConnectionClosed
)
