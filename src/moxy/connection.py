"""A connection to one destination: opened with failover over its addresses (asking the dead
set and the concurrency caps first), past its greeting and EHLO/HELO, then commands and their
replies (pipelined when the destination offers PIPELINING) over a `moxy.stream.Stream`.
"""

from __future__ import annotations

import errno
import logging
import operator
import socket
import time
from typing import TYPE_CHECKING, Final

import attrs
import trio

from moxy.config import Timeouts
from moxy.destinations import Destinations, Slot, Unavailable, is_ip_literal, resolve
from moxy.leg_setup import ClientIdentity, send_xclient, start_tls
from moxy.lookup.base import Destination
from moxy.metrics import Metrics
from moxy.smtp.client import ReplyParser, UpstreamProtocolError, parse_ehlo
from moxy.smtp.replies import Reply
from moxy.smtp.value import Value
from moxy.stream import Stream, StreamBroken, StreamTimeout
from moxy.tls import UpstreamTls

if TYPE_CHECKING:
    from moxy.pool import ConnectionPool

logger = logging.getLogger("moxy.upstream")

RECEIVE_SIZE: Final = 65536


class LegError(Exception):
    """The leg cannot carry on at `stage`: connection refused, closed, timed out, 421, bad reply.

    Distinct from an upstream *answer* (a 4xx/5xx reply), which is passed to the client as is.
    """

    def __init__(
        self, stage: str, where: str, detail: str, reply: Reply | None = None,
        timed_out: bool = False,
    ) -> None:
        super().__init__(f"{where}: {stage}: {detail}")
        self.stage = stage
        self.where = where
        self.detail = detail
        self.reply = reply
        self.timed_out = timed_out  # the destination said nothing in time (it did not go away)


class Envelope(Value):  # one per message: a Value, see moxy.smtp.value
    """The sender side of a transaction, as the client gave it at MAIL."""

    _fields = ("mail_from", "size", "body", "smtputf8")
    __slots__ = _fields

    def __init__(
        self, mail_from: str, size: int | None = None, body: str | None = None,
        smtputf8: bool = False,
    ) -> None:
        self.mail_from: Final = mail_from
        self.size: Final = size  # the client's SIZE= estimate
        self.body: Final = body  # BODY=7BIT / 8BITMIME
        self.smtputf8: Final = smtputf8  # RFC 6531: only legs advertising SMTPUTF8 take it

    def mail_line(self, extensions: dict[str, str]) -> bytes:
        """MAIL FROM with the parameters this upstream advertised (RFC 1870, RFC 6152)."""
        line = f"MAIL FROM:<{self.mail_from}>"
        if self.size is not None and "SIZE" in extensions:
            line += f" SIZE={self.size + TRACE_ALLOWANCE}"
        if self.body is not None and "8BITMIME" in extensions:
            line += f" BODY={self.body}"
        if self.smtputf8:
            line += " SMTPUTF8"
        return (line + "\r\n").encode("utf-8", "replace")

    def refusal(self, extensions: dict[str, str]) -> Reply | None:
        """Why a destination with these EHLO `extensions` cannot take this transaction, as the
        reply its recipients get at RCPT (before any body is sent); None when it can."""
        if self.smtputf8 and "SMTPUTF8" not in extensions:
            # RFC 6531 §3.4: never downgrade; Postfix's wording and code.
            return Reply.make(553, "5.6.7", "SMTPUTF8 is required, but was not offered by the "
                              "destination")
        text = extensions.get("SIZE", "")
        limit = int(text) if text.isdigit() else 0  # 0: no limit announced (RFC 1870)
        if self.size is not None and 0 < limit < self.size + TRACE_ALLOWANCE:
            # RFC 1870 §6: the declared size is above what the destination takes.
            return Reply.make(552, "5.3.4", f"Message size exceeds the destination's limit of "
                              f"{max(limit - TRACE_ALLOWANCE, 0)} bytes")
        return None


# Moxy prepends a Received: header, so the message an upstream gets is a little larger.
TRACE_ALLOWANCE: Final = 1024


@attrs.frozen
class UpstreamSettings:
    helo_name: str
    timeouts: Timeouts
    reply_line: int = 2048
    pool: ConnectionPool | None = attrs.field(default=None, eq=False)  # shared by sessions
    metrics: Metrics = attrs.field(factory=Metrics, eq=False)
    # Dead-destination memory and concurrency caps, shared by sessions.
    destinations: Destinations = attrs.field(factory=Destinations, eq=False)
    tls: UpstreamTls = attrs.field(factory=UpstreamTls, eq=False)  # STARTTLS to destinations
    client: ClientIdentity | None = None  # the session's client, for XCLIENT


class Connection:
    """An SMTP client connection to one destination, past greeting and EHLO/HELO."""

    def __init__(
        self, stream: Stream, destination: Destination, settings: UpstreamSettings
    ) -> None:
        self.stream = stream
        self.destination = destination
        self.name = str(destination)  # what logs and accounting call it, once per connection
        self.settings = settings
        self.parser = ReplyParser(max_line=settings.reply_line)
        self.extensions: dict[str, str] = {}
        self.stats = settings.metrics.upstream(destination)
        self.timed = self.stats.active  # reply times are measured only for metrics
        self.sent_at = time.monotonic()  # reply times count from the last write
        self.slot: Slot | None = None  # its place under the address's concurrency cap
        self.tls = ""  # "TLSv1.3 with cipher ..." once STARTTLS succeeded
        self.xclient = False  # XCLIENT told it one client's identity: never pooled
        # Where _connect_address counted it among the process's upstream connections (each
        # attempt is counted from before its connect): uncounted when closed.
        self._counted: Destinations | None = None

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def error(self, stage: str, detail: str, reply: Reply | None = None) -> LegError:
        return LegError(stage, self.name, detail, reply)

    def timeout(self, stage: str, detail: str) -> LegError:
        return LegError(stage, self.name, detail, None, True)

    async def read_reply(self, stage: str, timeout: float, more: bool = False) -> Reply:
        """The next reply, all of it within `timeout`. `more`: further replies to pipelined
        commands are still due."""
        parser = self.parser
        try:
            reply = parser.next_reply() if parser.unread else None
            if reply is None:
                stream = self.stream
                data = await stream.receive_within(RECEIVE_SIZE, timeout)
                deadline = 0.0
                while True:
                    if not data:
                        raise self.error(stage, "connection closed by upstream")
                    reply = parser.feed(data)
                    if reply is not None:
                        break
                    # A reply in pieces: all of it within `timeout` of the first wait.
                    deadline = deadline or stream.deadline or trio.current_time() + timeout
                    data = await stream.receive(RECEIVE_SIZE, deadline)
                if more and not parser.unread:
                    # A destination that leaves Nagle on and writes each pipelined reply
                    # separately holds the next one until this segment is ACKed, and Moxy has
                    # nothing to send that the ACK could ride on: ACK at once instead of after
                    # the delayed-ACK timer (~40 ms on Linux). Linux clears TCP_QUICKACK by
                    # itself, so it is set each time a reply came alone.
                    self.stream.ack_now()
        except UpstreamProtocolError as exc:
            raise self.error(stage, f"malformed reply: {exc}") from None
        except StreamBroken as exc:
            raise self.error(stage, f"connection lost: {exc}") from None
        except StreamTimeout:
            raise self.timeout(stage, f"no reply within {timeout:g}s") from None
        if self.timed:  # metrics on: the hook is not even called otherwise
            self.stats.replied(stage, time.monotonic() - self.sent_at)
        if reply.code == 421:
            raise self.error(stage, f"service closing: {reply}", reply)
        if parser.unread and not more:
            # More than the commands sent so far ask for: a reply would be taken as the answer
            # to a command not yet sent (an early "250" after the 354 as the verdict on the
            # message). The dialogue is out of step; it cannot go on.
            raise self.error(stage, f"out of step: {len(parser.unread)} octets after the "
                                    f"reply ({reply}) answer no command", reply)
        if (reply.klass == 3 or stage == "data") and reply.klass < 4 and (
            reply.code != 354 or stage != "data"
        ):
            # Only DATA may be answered 354, and DATA only with 354 or a refusal (RFC 5321
            # §4.3.2): a 334 passed on would put the client into a body it never meant to send.
            raise self.error(stage, f"a reply that cannot answer {stage}: {reply}")
        return reply

    async def send(self, data: bytes, stage: str, timeout: float) -> None:
        if self.timed:
            self.sent_at = time.monotonic()
        try:
            await self.stream.send_within(data, timeout)
        except StreamBroken as exc:
            raise self.error(stage, f"connection lost: {exc}") from None
        except StreamTimeout:
            raise self.timeout(stage, f"could not send within {timeout:g}s") from None

    async def command(self, line: bytes, stage: str, timeout: float) -> Reply:
        await self.send(line, stage, timeout)
        return await self.read_reply(stage, timeout)

    async def exchange(self, commands: list[tuple[bytes, str, float]]) -> list[Reply]:
        """Send commands and read one reply each: in one write when the upstream pipelines.

        Without PIPELINING, stops at the first non-2xx reply (later commands would only be
        answered 503); the returned list is then shorter than `commands`.
        """
        if self.pipelining:
            await self.send(b"".join([c[0] for c in commands]), commands[0][1], commands[0][2])
            last = len(commands) - 1
            replies = []
            for i, (_, stage, timeout) in enumerate(commands):
                replies.append(await self.read_reply(stage, timeout, more=i < last))
            return replies
        replies = []
        for line, stage, timeout in commands:
            reply = await self.command(line, stage, timeout)
            replies.append(reply)
            if reply.klass != 2:
                break
        return replies

    async def close(self) -> None:
        if self.slot is not None:
            self.slot.release()
        counted, self._counted = self._counted, None
        if counted is not None:
            counted.connections -= 1
        await self.stream.aclose()

    async def send_quit(self, timeout: float) -> None:
        """QUIT, without waiting for the 221 (as Postfix's smtp client does by default): the
        connection holds no transaction, so its answer cannot change anything."""
        # Not contextlib.suppress: that is three calls more, on every connection.
        try:  # noqa: SIM105
            await self.send(b"QUIT\r\n", "quit", timeout)
        except LegError:
            pass

    async def quit(self, timeout: float) -> None:
        await self.send_quit(timeout)
        await self.close()


async def _open_stream(address: Destination, timeout: float) -> Stream:
    """A TCP connection to an IP address within `timeout`, with TCP_NODELAY."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    return await Stream.connect(family, (address.host, address.port), timeout)


# The detail of a leg refused because the process has `limits.upstream_connections` open.
AT_LIMIT: Final = "upstream connection limit reached (limits.upstream_connections)"
# Failures at these stages mark an address down (src/moxy/destinations.py); a greeting heard
# marks it up, whatever follows.
_HEALTH_STAGES: Final = ("connect", "greeting")
# A connect failing with these says nothing of the destination (see _connect_address).
_LOCAL_ERRORS: Final = frozenset(
    (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL)
)


async def connect(destination: Destination, settings: UpstreamSettings) -> Connection:
    """Open a connection to the first address of `destination` that is not known to be down and
    has a free slot under its concurrency cap, each address within `upstream_connect`, and get
    it past the greeting and EHLO (HELO if EHLO is refused)."""
    timeout = settings.timeouts.upstream_connect
    try:
        if is_ip_literal(destination.host):
            addresses = [destination]
        else:
            with trio.fail_after(timeout):
                addresses = await resolve(destination)
    except trio.TooSlowError:
        raise LegError("connect", str(destination), f"no address within {timeout:g}s") from None
    except OSError as exc:
        detail = f"cannot resolve: {exc.strerror or exc}"
        raise LegError("connect", str(destination), detail) from None
    errors: list[LegError] = []
    for address in addresses:
        try:
            slot = await settings.destinations.admit(address, destination)
        except Unavailable as exc:
            errors.append(LegError(exc.stage, str(address), exc.detail))
            continue
        try:
            conn = await _connect_address(destination, address, settings)
        except LegError as exc:
            if exc.stage != "local":  # a local shortage: no verdict on the address
                slot.done(f"{exc.stage}: {exc.detail}" if exc.stage in _HEALTH_STAGES else None)
            slot.release()
            errors.append(exc)
            continue
        except BaseException:
            slot.release()
            raise
        slot.done(None)
        conn.slot = slot
        return conn
    where = str(destination)
    if len(errors) == 1:
        error = errors[0]
        raise LegError(error.stage, where, error.detail, error.reply)
    last = errors[-1]
    detail = "; ".join(f"{e.where} {e.stage}: {e.detail}" for e in errors)
    raise LegError(last.stage, where, detail, last.reply)


def _where(destination: Destination, address: Destination) -> str:
    # operator.eq: compiled (setup.py), `==` between attrs instances would compare identities.
    same = operator.eq(address, destination)
    return str(destination) if same else f"{destination} ({address})"


async def _connect_address(
    destination: Destination, address: Destination, settings: UpstreamSettings
) -> Connection:
    t = settings.timeouts
    budget = settings.destinations
    while budget.connection_cap and budget.connections >= budget.connection_cap:
        idle = settings.pool.oldest() if settings.pool is not None else None
        if idle is None:
            budget.at_connection_cap()
            raise LegError("local", _where(destination, address),
                           f"{AT_LIMIT} ({budget.connections} open)")
        await idle.quit(1.0)  # its descriptor, and its place under the cap, are free now
    budget.connections += 1  # this attempt's descriptor: the Connection gives it back at close
    started = time.monotonic()
    try:
        try:
            stream = await _open_stream(address, t.upstream_connect)
        except BaseException:
            budget.connections -= 1
            raise
    except StreamTimeout:
        raise LegError("connect", _where(destination, address),
                       f"no connection within {t.upstream_connect:g}s") from None
    except OSError as exc:
        # Out of descriptors, buffers or local ports is this host's trouble, not the
        # destination's: not a reason to mark it down for everyone (stage "local").
        stage = "local" if exc.errno in _LOCAL_ERRORS else "connect"
        raise LegError(stage, _where(destination, address), exc.strerror or str(exc)) from None
    conn = Connection(stream, destination, settings)
    conn._counted = budget
    if conn.timed:
        conn.stats.connected(time.monotonic() - started)
    try:
        greeting = await conn.read_reply("greeting", t.upstream_greeting)
        if greeting.klass != 2:
            raise conn.error("greeting", f"refused: {greeting}", greeting)
        helo = settings.helo_name.encode("ascii", "replace")
        ehlo = await conn.command(b"EHLO " + helo + b"\r\n", "ehlo", t.upstream_command)
        if ehlo.klass == 2:
            conn.extensions = parse_ehlo(ehlo)
        else:
            reply = await conn.command(b"HELO " + helo + b"\r\n", "helo", t.upstream_command)
            if reply.klass != 2:
                raise conn.error("helo", f"refused: {reply}", reply)
        mode = destination.tls or settings.tls.mode
        if mode != "none":
            if "STARTTLS" in conn.extensions:
                await start_tls(conn, helo)
            elif mode == "required":
                raise conn.error("tls", "STARTTLS required but not offered")
            elif logger.isEnabledFor(logging.DEBUG):  # not worth a _where() otherwise
                logger.debug("upstream %s does not offer STARTTLS: plain text",
                             _where(destination, address))
        if destination.xclient and settings.client is not None and "XCLIENT" in conn.extensions:
            await send_xclient(conn, settings.client, helo)
    except BaseException:
        await conn.close()
        raise
    return conn
