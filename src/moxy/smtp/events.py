"""What the server-side protocol core reports to the session (h11-style events)."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Final

import attrs

from moxy.smtp.replies import Reply
from moxy.smtp.value import Value


class Sentinel(Enum):
    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # a reply to the last command must be sent before more is parsed


NEED_DATA: Final = Sentinel.NEED_DATA
PAUSED: Final = Sentinel.PAUSED


class Hello(Value):  # once per connection: a Value, like the events of every message
    _fields = ("verb", "domain")
    __slots__ = _fields

    def __init__(self, verb: str, domain: str) -> None:
        self.verb: Final = verb  # "EHLO" or "HELO"
        self.domain: Final = domain


# The events of every message are `Value`s, not attrs classes: see moxy.smtp.value.


class MailFrom(Value):
    _fields = ("address", "params", "size", "body", "smtputf8")
    __slots__ = _fields

    def __init__(
        self, address: str, params: Mapping[str, str | None] | None = None,
        size: int | None = None, body: str | None = None, smtputf8: bool = False,
    ) -> None:
        # reverse-path without angle brackets; "" for the null sender <>
        self.address: Final = address
        self.params: Final = {} if params is None else params  # upper-cased keywords
        self.size: Final = size  # SIZE= parameter, already checked against the maximum
        self.body: Final = body  # BODY= parameter ("7BIT" or "8BITMIME")
        self.smtputf8: Final = smtputf8  # SMTPUTF8 (RFC 6531): UTF-8 addresses and headers


class RcptTo(Value):
    _fields = ("address", "params")
    __slots__ = _fields

    def __init__(self, address: str, params: Mapping[str, str | None] | None = None) -> None:
        self.address: Final = address  # forward-path without angle brackets or source route
        self.params: Final = {} if params is None else params


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


class BodyChunk(Value):
    """Message bytes as they go on the wire: still dot-stuffed, CRLF line endings only.

    The chunks of one message concatenate to everything up to and including the CRLF that
    starts the end-of-data sequence; the final `.CRLF` is never part of a chunk.
    """

    _fields = ("data",)
    __slots__ = _fields

    def __init__(self, data: bytes) -> None:
        self.data: Final = data


@attrs.frozen
class BodyRefused:
    """The body broke a rule (bare CR/LF, size, line length). Reported once, as soon as seen;
    the rest of the body is read and discarded, then `BodyEnd` follows. `reply` is the final
    reply the client should get."""

    reply: Reply


@attrs.frozen
class BodyEnd:
    """The end-of-data sequence CRLF.CRLF was read."""


BODY_END: Final = BodyEnd()  # no fields: one value serves every message


@attrs.frozen
class ConnectionClosed:
    """The client closed its side (receive_data(b"")). `mid_data` is True inside a body."""

    mid_data: bool


Event = (
    Hello | MailFrom | RcptTo | Data | Reset | StartTls | Noop | Quit | Verify | Help | Invalid
    | BodyChunk | BodyRefused | BodyEnd | ConnectionClosed
)
