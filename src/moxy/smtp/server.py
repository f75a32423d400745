"""The server side of one SMTP connection, sans I/O: bytes in, events out; replies in, bytes out.

`ServerConnection` reads command lines with hard limits, enforces command order (RFC 5321 §4.1.4)
with a small transition table, and switches to the body reader after a 354. It never raises on
anything the client sends; `LocalProtocolError` is only for the session misusing it.
"""

from __future__ import annotations

from collections import deque
from enum import Enum
from typing import Final

from moxy.smtp.commands import NOT_IMPLEMENTED, parse_verb, split_command
from moxy.smtp.data import BareNewlines, BodyReader
from moxy.smtp.events import (
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyEnd,
    BodyRefused,
    ConnectionClosed,
    Data,
    Event,
    Hello,
    Invalid,
    MailFrom,
    RcptTo,
    Reset,
    Sentinel,
    StartTls,
)
from moxy.smtp.lines import CUT_LINE
from moxy.smtp.replies import Reply


class LocalProtocolError(Exception):
    """Our side broke the protocol (e.g. a reply with no command to answer): a bug, not input."""


class State(Enum):
    CONNECTED = "CONNECTED"  # greeting not sent yet
    GREETED = "GREETED"  # greeting sent, no successful HELO/EHLO
    READY = "READY"  # HELO/EHLO accepted, no transaction
    MAIL = "MAIL"  # MAIL FROM accepted, no recipient yet
    RCPT = "RCPT"  # at least one recipient accepted
    DATA = "DATA"  # 354 sent: reading the body, then awaiting its final reply
    CLOSED = "CLOSED"  # 221 or 421 sent: nothing more is read


class _Greeting:
    """What the first reply answers: the connection itself."""


# (what the reply answers, reply class) → next state. Pairs not listed leave the state as it is,
# e.g. RFC 5321 §4.1.4: a refused EHLO keeps the state it found. Any 221 or 421 closes.
_TRANSITIONS: Final[dict[tuple[type, int], State]] = {
    (_Greeting, 2): State.GREETED,
    (_Greeting, 4): State.GREETED,
    (_Greeting, 5): State.GREETED,  # 554 greeting: the client is expected to QUIT
    (Hello, 2): State.READY,
    (MailFrom, 2): State.MAIL,
    (RcptTo, 2): State.RCPT,
    (Data, 3): State.DATA,
    (BodyEnd, 2): State.READY,
    (BodyEnd, 4): State.READY,
    (BodyEnd, 5): State.READY,
    (Reset, 2): State.READY,  # GREETED if there was no HELO/EHLO yet, see send()
}
_IN_TRANSACTION: Final = (State.MAIL, State.RCPT)
_ORDERED: Final = frozenset({"MAIL", "RCPT", "DATA", "STARTTLS"})  # verbs with order rules
# The states as module constants: read on every event.
_GREETED: Final = State.GREETED
_READY: Final = State.READY
_MAIL: Final = State.MAIL
_RCPT: Final = State.RCPT
_DATA: Final = State.DATA
_CLOSED: Final = State.CLOSED
_CLOSING_CODES: Final = (221, 421)
# Replies that are ordinary outcomes of pipelining, not client mistakes: they do not count
# towards max_errors (a client pipelining 150 RCPTs must not be disconnected).
_NOT_COUNTED: Final = (452, 552, 554)

NEED_MAIL: Final = Reply.make(503, "5.5.1", "Error: need MAIL command")
NEED_HELLO: Final = Reply.make(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL: Final = Reply.make(503, "5.5.1", "Error: nested MAIL command")
NO_RECIPIENTS: Final = Reply.make(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS: Final = Reply.make(452, "4.5.3", "Error: too many recipients")
LINE_TOO_LONG: Final = Reply.make(500, "5.5.6", "Error: line too long")
# RFC 3207 §4: with TLS required, only EHLO, NOOP, RSET, QUIT and STARTTLS work before it.
NEED_STARTTLS: Final = Reply.make(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_ACTIVE: Final = Reply.make(554, "5.5.1", "Error: TLS already active")
TLS_IN_TRANSACTION: Final = Reply.make(503, "5.5.1", "Error: MAIL transaction in progress")


class ServerConnection:
    """One client connection. Feed bytes with `receive_data`, take events with `next_event`,
    answer each command event (and the connection, first) with exactly one `send`.

    After an event that needs a reply, `next_event` returns PAUSED until `send` answers it: the
    reply decides how the following bytes read (after a 354 they are the body), which is what
    makes PIPELINING safe. Call `receive_data` when `next_event` says NEED_DATA, so the buffer
    stays within one read plus one command line. Limits of 0 mean no limit.
    """

    def __init__(
        self,
        *,
        max_command_line: int = 512,
        max_text_line: int = 1000,
        max_recipients: int = 100,
        max_message_size: int = 52428800,
        max_errors: int = 20,
        bare_newlines: BareNewlines = "refuse",
        hostname: str = "",
        starttls: bool = False,
        require_tls: bool = False,
    ) -> None:
        if bare_newlines not in ("refuse", "normalise"):
            raise ValueError(f"bare_newlines must be 'refuse' or 'normalise': {bare_newlines!r}")
        self.max_command_line = max_command_line or 2**62
        self.max_text_line = max_text_line
        self.max_recipients = max_recipients
        self.max_message_size = max_message_size
        self.max_errors = max_errors
        self.bare_newlines: BareNewlines = bare_newlines
        self.hostname = hostname  # named in the 421 reply when given
        self.starttls = starttls  # STARTTLS offered (the session can wrap its stream)
        self.require_tls = require_tls  # MAIL refused with 530 until TLS is active
        self.tls = False  # a STARTTLS was answered 220: the session now runs over TLS
        self.discarded = 0  # bytes the client sent after its STARTTLS line, thrown away
        self.smtputf8 = False  # the current transaction's MAIL carried SMTPUTF8
        self.state = State.CONNECTED
        self.hello: str | None = None  # "EHLO" or "HELO" once accepted
        self.hello_domain: str | None = None
        self.accepted_recipients = 0
        self.errors = 0
        self.refused_here = 0  # recipients refused_recipient() counted in this transaction
        self.body: BodyReader | None = None  # the current message's reader, in state DATA
        self._buf = bytearray()
        self._body_in = b""  # body bytes received in state DATA, not yet fed to the reader
        self._eof = False
        self._discarding = False  # inside an over-long command line, dropping up to its LF
        self._queue: deque[Event] = deque()
        self._awaiting: Event | _Greeting | None = _Greeting()
        self._keywords: tuple[str, ...] = (
            "PIPELINING", f"SIZE {max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        )

    @property
    def extensions(self) -> tuple[str, ...]:
        """The EHLO keywords matching what this core accepts (RFC 1870: SIZE 0 = no limit).

        No CHUNKING: see docs/security.md ("BDAT")."""
        if self.starttls and not self.tls:
            return (*self._keywords, "STARTTLS")
        return self._keywords

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf) + len(self._body_in)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means it closed its side."""
        if self._eof:
            raise LocalProtocolError("receive_data() after end of file")
        if not data:
            self._eof = True
        elif self.state is State.CLOSED:
            pass  # nothing more will be parsed; do not let it pile up
        elif self._discarding and not self._buf and b"\n" not in data:
            pass  # still inside an over-long line: memory stays bounded however long it is
        elif self.state is _DATA and not self._buf and not (self.body is None or self.body.done):
            # A body read goes to the reader as it is, without a copy into the command buffer.
            self._body_in = self._body_in + data if self._body_in else data
        else:
            self._buf += data

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA (call receive_data), or PAUSED: a reply is owed first,
        or the connection is CLOSED and nothing more will come."""
        state = self.state
        if state is _CLOSED:
            return PAUSED
        if self._queue:
            return self._emit(self._queue.popleft())
        if self._awaiting is not None:
            return PAUSED
        if not self._buf and not self._body_in and not self._eof:
            return NEED_DATA  # what either reader below would say, without asking it
        if state is _DATA:
            return self._next_body_event()
        return self._next_command_event()

    def send(self, reply: Reply) -> bytes:
        """The wire bytes of `reply`, after applying what it means to the state.

        A 421 may be sent at any time (shutdown, timeout); any other reply must answer the
        greeting or the last event that needs a reply.
        """
        if self.state is _CLOSED:
            raise LocalProtocolError("send() on a closed connection")
        code = reply.code
        if not 200 <= code <= 599:
            raise LocalProtocolError(f"not an SMTP reply code: {code}")
        answered = self._awaiting
        if answered is None and code != 421:
            raise LocalProtocolError(f"reply {code} answers nothing")
        self._awaiting = None
        kind = type(answered)
        if code in _CLOSING_CODES:
            self.state = _CLOSED
            self._queue.clear()
            self._buf.clear()
            self._body_in = b""
        elif kind is StartTls and code == 220:
            # RFC 3207 §4.2: forget everything learnt before TLS. Bytes the client pipelined
            # after STARTTLS came in clear text and could be an attacker's (CVE-2011-0411):
            # they are dropped, never parsed.
            self.discarded = len(self._buf)
            self._buf.clear()
            self._discarding = False
            self.tls = True
            self.hello = self.hello_domain = None
            self._enter(_GREETED)
        else:
            new = _TRANSITIONS.get((kind, reply.klass))
            if new is _RCPT:  # only an accepted RcptTo leads here
                self.accepted_recipients += 1
                self.state = new
            elif new is not None:
                if new is _READY:
                    if kind is BodyEnd and code < 300:
                        self.errors = 0  # mail delivered: the count starts again (Postfix)
                    elif kind is Hello:
                        self.hello, self.hello_domain = answered.verb, answered.domain  # type: ignore[union-attr]
                    elif self.hello is None:
                        new = _GREETED  # RSET before any HELO/EHLO
                elif new is _MAIL:  # only an accepted MailFrom leads here
                    self.smtputf8 = answered.smtputf8  # type: ignore[union-attr]
                self._enter(new)

        return reply.to_bytes()

    def _enter(self, new: State) -> None:
        if new is _READY or new is _GREETED or new is _MAIL:
            self.accepted_recipients = 0  # a new or no transaction
            self.refused_here = 0
            self.body = None
            if new is not _MAIL:
                self.smtputf8 = False
        elif new is _DATA:
            self.body = BodyReader(
                max_message_size=self.max_message_size,
                max_text_line=self.max_text_line,
                bare_newlines=self.bare_newlines,
            )
        self.state = new

    def _emit(self, event: Event) -> Event:
        # Every command, and the end of a body, gets exactly one reply; nothing else does.
        kind = type(event)
        if kind is not BodyChunk and kind is not BodyRefused and kind is not ConnectionClosed:
            self._awaiting = event
        return event

    def _next_body_event(self) -> Event | Sentinel:
        body = self.body
        assert body is not None
        if self._buf:  # bytes that came with the DATA command, before the 354
            self._queue.extend(body.feed(self._buf))
            self._buf.clear()
        if self._body_in:
            data, self._body_in = self._body_in, b""
            self._queue.extend(body.feed(data))
        if body.done and body.leftover:
            self._buf += body.leftover  # pipelined commands after the message
            body.leftover = b""
        if self._queue:
            return self._emit(self._queue.popleft())
        if self._eof:
            return ConnectionClosed(mid_data=not body.done)
        return NEED_DATA

    def _next_command_event(self) -> Event | Sentinel:
        buf = self._buf
        if not self._discarding:  # the usual case: a whole line of acceptable length
            line = CUT_LINE(buf, self.max_command_line)
            if line is not None:
                return self._command(line)
        lf = buf.find(b"\n")
        if self._discarding:
            if lf < 0:
                buf.clear()
                return ConnectionClosed(mid_data=False) if self._eof else NEED_DATA
            del buf[: lf + 1]
            self._discarding = False
            return self._invalid(LINE_TOO_LONG)
        if lf < 0:
            if len(buf) >= self.max_command_line:
                # Too long whatever follows; drop it now and the rest as it comes, then answer
                # once the line ends so replies stay in step with pipelined commands.
                self._discarding = True
                buf.clear()
                return self._next_command_event()
            return ConnectionClosed(mid_data=False) if self._eof else NEED_DATA
        del buf[: lf + 1]  # what CUT_LINE left: a line of max_command_line or more
        return self._invalid(LINE_TOO_LONG)

    def refused_recipient(self) -> None:
        """The RCPT just answered was refused with a 5xx for the recipient itself (relay
        denied, no such user): an error, as in Postfix, so that a client guessing addresses
        is cut off. The session says which refusals are (not one passed on for the sender,
        nor 552 "too many recipients")."""
        self.errors += 1
        self.refused_here += 1

    def _command(self, line: bytes) -> Event:
        verb, arg = split_command(line)
        if self.max_errors and self.errors > self.max_errors and (
            verb == "MAIL" or self.refused_here > (self.max_recipients or 100)
        ):
            # Over the limit through refused recipients: cut off at the next transaction, or
            # within this one once it has more refused recipients than a message may have
            # recipients (a message with some stale addresses among many still goes out).
            return self._emit(Invalid(self._too_many_errors()))
        if verb in _ORDERED:
            order_error = self._order_error(verb)
            if order_error is not None:
                return self._invalid(order_error)
        event = parse_verb(verb, arg, self.hello == "EHLO", self.max_message_size, self.smtputf8)
        kind = type(event)
        if kind is RcptTo:
            if self.max_recipients and self.accepted_recipients >= self.max_recipients:
                return self._invalid(TOO_MANY_RECIPIENTS, recipient=event.address)  # type: ignore[union-attr]
        elif kind is Invalid:
            return self._invalid(event.reply)  # type: ignore[union-attr]
        elif kind is StartTls:
            if not self.starttls:
                return self._invalid(NOT_IMPLEMENTED.reply)
            if self.tls:
                return self._invalid(TLS_ACTIVE)
        self._awaiting = event  # every command gets exactly one reply
        return event

    def _order_error(self, verb: str) -> Reply | None:
        """RFC 5321 §4.1.4 command order, checked before syntax as Postfix does."""
        state = self.state
        if verb == "MAIL":
            if state is _GREETED:
                return NEED_HELLO
            if state in _IN_TRANSACTION:
                return NESTED_MAIL
            if self.require_tls and not self.tls:
                return NEED_STARTTLS
        elif verb == "STARTTLS" and self.starttls and not self.tls:
            if state is _GREETED:
                return NEED_HELLO
            if state in _IN_TRANSACTION:
                return TLS_IN_TRANSACTION
        elif verb == "RCPT":
            if state is not _MAIL and state is not _RCPT:
                return NEED_MAIL
        elif verb == "DATA":
            if state is not _MAIL and state is not _RCPT:
                return NEED_MAIL
            if self.accepted_recipients == 0:
                return NO_RECIPIENTS
        return None

    def _invalid(self, reply: Reply, recipient: str | None = None) -> Event:
        if reply.code not in _NOT_COUNTED:
            self.errors += 1
            if self.max_errors and self.errors > self.max_errors:
                reply = self._too_many_errors()
        return self._emit(Invalid(reply, recipient))

    def _too_many_errors(self) -> Reply:
        host = f"{self.hostname} " if self.hostname else ""
        return Reply.make(421, "4.7.0", f"{host}Error: too many errors")
