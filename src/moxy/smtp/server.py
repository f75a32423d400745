"""The server side of one SMTP connection, sans I/O: bytes in, events out; replies in, bytes out.

`ServerConnection` reads command lines with hard limits, enforces command order (RFC 5321 §4.1.4)
with a small transition table, and switches to the body reader after a 354. It never raises on
anything the client sends; `LocalProtocolError` is only for the session misusing it.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from moxy.smtp.commands import NOT_IMPLEMENTED, command_verb, parse_command
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
_TRANSITIONS: dict[tuple[type, int], State] = {
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
_IN_TRANSACTION = (State.MAIL, State.RCPT)
_CLOSING_CODES = (221, 421)
# Replies that are ordinary outcomes of pipelining, not client mistakes: they do not count
# towards max_errors (a client pipelining 150 RCPTs must not be disconnected).
_NOT_COUNTED = (452, 552, 554)

NEED_MAIL = Reply.make(503, "5.5.1", "Error: need MAIL command")
NEED_HELLO = Reply.make(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply.make(503, "5.5.1", "Error: nested MAIL command")
NO_RECIPIENTS = Reply.make(554, "5.5.1", "Error: no valid recipients")
TOO_MANY_RECIPIENTS = Reply.make(452, "4.5.3", "Error: too many recipients")
LINE_TOO_LONG = Reply.make(500, "5.5.6", "Error: line too long")
# RFC 3207 §4: with TLS required, only EHLO, NOOP, RSET, QUIT and STARTTLS work before it.
NEED_STARTTLS = Reply.make(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_ACTIVE = Reply.make(554, "5.5.1", "Error: TLS already active")
TLS_IN_TRANSACTION = Reply.make(503, "5.5.1", "Error: MAIL transaction in progress")


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
        self.body: BodyReader | None = None  # the current message's reader, in state DATA
        self._buf = bytearray()
        self._eof = False
        self._discarding = False  # inside an over-long command line, dropping up to its LF
        self._queue: deque[Event] = deque()
        self._awaiting: Event | _Greeting | None = _Greeting()

    @property
    def extensions(self) -> tuple[str, ...]:
        """The EHLO keywords matching what this core accepts (RFC 1870: SIZE 0 = no limit).

        No CHUNKING: see docs/security.md ("BDAT")."""
        keywords: tuple[str, ...] = (
            "PIPELINING", f"SIZE {self.max_message_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        )
        if self.starttls and not self.tls:
            keywords += ("STARTTLS",)
        return keywords

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf)

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
        else:
            self._buf += data

    def next_event(self) -> Event | Sentinel:
        """The next event, NEED_DATA (call receive_data), or PAUSED: a reply is owed first,
        or the connection is CLOSED and nothing more will come."""
        if self.state is State.CLOSED:
            return PAUSED
        if self._queue:
            return self._emit(self._queue.popleft())
        if self._awaiting is not None:
            return PAUSED
        if self.state is State.DATA:
            return self._next_body_event()
        return self._next_command_event()

    def send(self, reply: Reply) -> bytes:
        """The wire bytes of `reply`, after applying what it means to the state.

        A 421 may be sent at any time (shutdown, timeout); any other reply must answer the
        greeting or the last event that needs a reply.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("send() on a closed connection")
        if not 200 <= reply.code <= 599:
            raise LocalProtocolError(f"not an SMTP reply code: {reply.code}")
        answered = self._awaiting
        if answered is None and reply.code != 421:
            raise LocalProtocolError(f"reply {reply.code} answers nothing")
        self._awaiting = None
        if reply.code in _CLOSING_CODES:
            self.state = State.CLOSED
            self._queue.clear()
            self._buf.clear()
        elif isinstance(answered, StartTls) and reply.code == 220:
            # RFC 3207 §4.2: forget everything learnt before TLS. Bytes the client pipelined
            # after STARTTLS came in clear text and could be an attacker's (CVE-2011-0411):
            # they are dropped, never parsed.
            self.discarded = len(self._buf)
            self._buf.clear()
            self._discarding = False
            self.tls = True
            self.hello = self.hello_domain = None
            self._enter(State.GREETED)
        else:
            new = _TRANSITIONS.get((type(answered), reply.klass))
            if isinstance(answered, Hello) and new is State.READY:
                self.hello, self.hello_domain = answered.verb, answered.domain
            if new is State.READY and self.hello is None:
                new = State.GREETED  # RSET before any HELO/EHLO
            if isinstance(answered, RcptTo) and new is State.RCPT:
                self.accepted_recipients += 1
            if isinstance(answered, MailFrom) and new is State.MAIL:
                self.smtputf8 = answered.smtputf8
            if new is not None:
                self._enter(new)
        return reply.to_bytes()

    def _enter(self, new: State) -> None:
        if new in (State.READY, State.GREETED, State.MAIL):
            self.accepted_recipients = 0  # a new or no transaction
            self.body = None
            if new is not State.MAIL:
                self.smtputf8 = False
        elif new is State.DATA:
            self.body = BodyReader(
                max_message_size=self.max_message_size,
                max_text_line=self.max_text_line,
                bare_newlines=self.bare_newlines,
            )
        self.state = new

    def _emit(self, event: Event) -> Event:
        # Every command, and the end of a body, gets exactly one reply; nothing else does.
        if not isinstance(event, BodyChunk | BodyRefused | ConnectionClosed):
            self._awaiting = event
        return event

    def _next_body_event(self) -> Event | Sentinel:
        assert self.body is not None
        if self._buf:
            self._queue.extend(self.body.feed(self._buf))
            self._buf.clear()
            if self.body.done:
                self._buf += self.body.leftover  # pipelined commands after the message
        if self._queue:
            return self._emit(self._queue.popleft())
        if self._eof:
            return ConnectionClosed(mid_data=not self.body.done)
        return NEED_DATA

    def _next_command_event(self) -> Event | Sentinel:
        lf = self._buf.find(b"\n")
        if self._discarding:
            if lf < 0:
                self._buf.clear()
                return ConnectionClosed(mid_data=False) if self._eof else NEED_DATA
            del self._buf[: lf + 1]
            self._discarding = False
            return self._invalid(LINE_TOO_LONG)
        if lf < 0:
            if len(self._buf) >= self.max_command_line:
                # Too long whatever follows; drop it now and the rest as it comes, then answer
                # once the line ends so replies stay in step with pipelined commands.
                self._discarding = True
                self._buf.clear()
                return self._next_command_event()
            return ConnectionClosed(mid_data=False) if self._eof else NEED_DATA
        if lf + 1 > self.max_command_line:
            del self._buf[: lf + 1]
            return self._invalid(LINE_TOO_LONG)
        line = bytes(self._buf[:lf])
        del self._buf[: lf + 1]
        return self._command(line[:-1] if line.endswith(b"\r") else line)

    def _command(self, line: bytes) -> Event:
        order_error = self._order_error(command_verb(line))
        if order_error is not None:
            return self._invalid(order_error)
        event = parse_command(
            line, esmtp=self.hello == "EHLO", max_message_size=self.max_message_size,
            smtputf8=self.smtputf8,
        )
        if isinstance(event, Invalid):
            return self._invalid(event.reply)
        if isinstance(event, StartTls):
            if not self.starttls:
                return self._invalid(NOT_IMPLEMENTED.reply)
            if self.tls:
                return self._invalid(TLS_ACTIVE)
        if (
            isinstance(event, RcptTo)
            and self.max_recipients
            and self.accepted_recipients >= self.max_recipients
        ):
            return self._invalid(TOO_MANY_RECIPIENTS, recipient=event.address)
        return self._emit(event)

    def _order_error(self, verb: str) -> Reply | None:
        """RFC 5321 §4.1.4 command order, checked before syntax as Postfix does."""
        if verb == "MAIL":
            if self.state is State.GREETED:
                return NEED_HELLO
            if self.state in _IN_TRANSACTION:
                return NESTED_MAIL
            if self.require_tls and not self.tls:
                return NEED_STARTTLS
        elif verb == "STARTTLS" and self.starttls and not self.tls:
            if self.state is State.GREETED:
                return NEED_HELLO
            if self.state in _IN_TRANSACTION:
                return TLS_IN_TRANSACTION
        elif verb == "RCPT":
            if self.state not in _IN_TRANSACTION:
                return NEED_MAIL
        elif verb == "DATA":
            if self.state not in _IN_TRANSACTION:
                return NEED_MAIL
            if self.accepted_recipients == 0:
                return NO_RECIPIENTS
        return None

    def _invalid(self, reply: Reply, recipient: str | None = None) -> Event:
        if reply.code not in _NOT_COUNTED:
            self.errors += 1
            if self.max_errors and self.errors > self.max_errors:
                host = f"{self.hostname} " if self.hostname else ""
                reply = Reply.make(421, "4.7.0", f"{host}Error: too many errors")
        return self._emit(Invalid(reply, recipient))
