"""One upstream leg: Moxy as an SMTP client of one destination group.

A `Leg` owns at most one connection to one of its group's failover alternatives, keeps it open
across the client's transactions (RSET is sent lazily, only when the next transaction needs the
connection), and can replay the current transaction (MAIL and the recipients the client saw
accepted) on a fresh connection when an upstream goes away before DATA.

The end-of-data sequence is sent in exactly one place, `Leg.finish()`; every fault path closes the
connection instead (`Leg.abort()`), which makes the upstream discard a partial message.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import socket
import time
from collections import deque

import attrs
import trio

from moxy.config import Timeouts
from moxy.destinations import Destinations, Slot, Unavailable, resolve
from moxy.leg_setup import ClientIdentity, send_xclient, start_tls
from moxy.lookup.base import Destination, DestinationGroup
from moxy.metrics import Metrics
from moxy.smtp.client import ReplyParser, UpstreamProtocolError, parse_ehlo
from moxy.smtp.replies import Reply
from moxy.tls import UpstreamTls

logger = logging.getLogger("moxy.upstream")

RECEIVE_SIZE = 65536
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only


class LegError(Exception):
    """The leg cannot carry on at `stage`: connection refused, closed, timed out, 421, bad reply.

    Distinct from an upstream *answer* (a 4xx/5xx reply), which is passed to the client as is.
    """

    def __init__(self, stage: str, where: str, detail: str, reply: Reply | None = None) -> None:
        super().__init__(f"{where}: {stage}: {detail}")
        self.stage = stage
        self.where = where
        self.detail = detail
        self.reply = reply


@attrs.frozen
class Envelope:
    """The sender side of a transaction, as the client gave it at MAIL."""

    mail_from: str
    size: int | None = None  # the client's SIZE= estimate
    body: str | None = None  # BODY=7BIT / 8BITMIME
    smtputf8: bool = False  # RFC 6531: only legs that advertise SMTPUTF8 may take it

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
TRACE_ALLOWANCE = 1024


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
        self, stream: trio.abc.Stream, destination: Destination, settings: UpstreamSettings
    ) -> None:
        self.stream = stream
        self.destination = destination
        self.settings = settings
        self.parser = ReplyParser(max_line=settings.reply_line)
        self.extensions: dict[str, str] = {}
        self.stats = settings.metrics.upstream(destination)
        self.sent_at = time.monotonic()  # reply times count from the last write
        self.slot: Slot | None = None  # its place under the address's concurrency cap
        self.tls = ""  # "TLSv1.3 with cipher ..." once STARTTLS succeeded
        self.xclient = False  # XCLIENT told it one client's identity: never pooled

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def error(self, stage: str, detail: str, reply: Reply | None = None) -> LegError:
        return LegError(stage, str(self.destination), detail, reply)

    async def read_reply(self, stage: str, timeout: float, more: bool = False) -> Reply:
        """The next reply. `more`: further replies to pipelined commands are still due."""
        with trio.move_on_after(timeout):
            try:
                received = False
                while True:
                    reply = self.parser.next_reply()
                    if reply is not None:
                        self.stats.replied(stage, time.monotonic() - self.sent_at)
                        if reply.code == 421:
                            raise self.error(stage, f"service closing: {reply}", reply)
                        if more and received and not self.parser.buffered:
                            self._ack_now()
                        return reply
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise self.error(stage, "connection closed by upstream")
                    self.parser.receive_data(bytes(data))
                    received = True
            except UpstreamProtocolError as exc:
                raise self.error(stage, f"malformed reply: {exc}") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self.error(stage, f"connection lost: {exc}") from None
        raise self.error(stage, f"no reply within {timeout:g}s")

    def _ack_now(self) -> None:
        """ACK what arrived at once instead of after the delayed-ACK timer (~40 ms on Linux).

        A destination that leaves Nagle on and writes each pipelined reply separately holds
        the next reply until its previous segment is ACKed; Moxy has nothing to send that the
        ACK could ride on while it waits for that reply. Linux clears TCP_QUICKACK by itself,
        so it is set again each time, and only when a reply arrived alone."""
        sock = getattr(self.stream, "socket", None)
        if sock is not None and _QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    async def send(self, data: bytes, stage: str, timeout: float) -> None:
        self.sent_at = time.monotonic()
        with trio.move_on_after(timeout):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise self.error(stage, f"connection lost: {exc}") from None
            return
        raise self.error(stage, f"could not send within {timeout:g}s")

    async def command(self, line: bytes, stage: str, timeout: float) -> Reply:
        await self.send(line, stage, timeout)
        return await self.read_reply(stage, timeout)

    async def exchange(self, commands: list[tuple[bytes, str, float]]) -> list[Reply]:
        """Send commands and read one reply each: in one write when the upstream pipelines.

        Without PIPELINING, stops at the first non-2xx reply (later commands would only be
        answered 503); the returned list is then shorter than `commands`.
        """
        if self.pipelining:
            await self.send(b"".join(c[0] for c in commands), commands[0][1], commands[0][2])
            last = len(commands) - 1
            return [
                await self.read_reply(stage, timeout, more=i < last)
                for i, (_, stage, timeout) in enumerate(commands)
            ]
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
        await trio.aclose_forcefully(self.stream)

    async def quit(self) -> None:
        """QUIT politely (the caller bounds the wait), then close."""
        with contextlib.suppress(LegError):
            await self.command(b"QUIT\r\n", "quit", math.inf)
        await self.close()


class ConnectionPool:
    """Idle upstream connections kept between client sessions, like Postfix's connection cache:
    the next session's leg to that destination skips connect, greeting and EHLO.

    Only connections in a clean state (no transaction open upstream) come back here. A pooled
    connection the upstream has closed meanwhile is noticed at its first command, and the leg
    then connects afresh (the transaction is replayed, nothing is lost)."""

    def __init__(self, per_destination: int, idle_time: float) -> None:
        self.per_destination = per_destination
        self.idle_time = idle_time
        self._idle: dict[Destination, deque[tuple[float, Connection]]] = {}
        self._expired: list[Connection] = []

    def take(self, destination: Destination) -> Connection | None:
        idle = self._idle.get(destination)
        now = trio.current_time()
        while idle:
            since, conn = idle.pop()  # the most recently used first: the likeliest alive
            if now - since < self.idle_time:
                return conn
            self._expired.append(conn)
        return None

    def give(self, conn: Connection) -> bool:
        """Keep `conn` for later; False when the pool for its destination is full."""
        idle = self._idle.setdefault(conn.destination, deque())
        if len(idle) >= self.per_destination or conn.parser.buffered or conn.xclient:
            return False
        idle.append((trio.current_time(), conn))
        return True

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def run(self) -> None:
        """Close connections idle for `idle_time` (with QUIT) until cancelled, then all."""
        try:
            while True:
                await trio.sleep(min(max(self.idle_time / 2, 0.05), 5.0))
                now = trio.current_time()
                for destination, idle in list(self._idle.items()):
                    while idle and now - idle[0][0] >= self.idle_time:
                        self._expired.append(idle.popleft()[1])
                    if not idle:
                        del self._idle[destination]
                expired, self._expired = self._expired, []
                for conn in expired:
                    with trio.move_on_after(min(self.idle_time, 5.0)):
                        await conn.quit()
        finally:
            with trio.CancelScope(shield=True):
                for idle in self._idle.values():
                    for _, conn in idle:
                        await conn.close()
                for conn in self._expired:
                    await conn.close()
                self._idle.clear()
                self._expired.clear()


async def _open_stream(address: Destination) -> trio.SocketStream:
    """A TCP connection to an IP address; trio's SocketStream sets TCP_NODELAY on it."""
    family = socket.AF_INET6 if ipaddress.ip_address(address.host).version == 6 \
        else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((address.host, address.port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


# Failures at these stages mark an address down (src/moxy/destinations.py); a greeting heard
# marks it up, whatever follows.
_HEALTH_STAGES = ("connect", "greeting")


async def connect(destination: Destination, settings: UpstreamSettings) -> Connection:
    """Open a connection to the first address of `destination` that is not known to be down and
    has a free slot under its concurrency cap, each address within `upstream_connect`, and get
    it past the greeting and EHLO (HELO if EHLO is refused)."""
    where = str(destination)
    timeout = settings.timeouts.upstream_connect
    try:
        with trio.fail_after(timeout):
            addresses = await resolve(destination)
    except trio.TooSlowError:
        raise LegError("connect", where, f"no address within {timeout:g}s") from None
    except OSError as exc:
        raise LegError("connect", where, f"cannot resolve: {exc.strerror or exc}") from None
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
    if len(errors) == 1:
        error = errors[0]
        raise LegError(error.stage, where, error.detail, error.reply)
    last = errors[-1]
    detail = "; ".join(f"{e.where} {e.stage}: {e.detail}" for e in errors)
    raise LegError(last.stage, where, detail, last.reply)


async def _connect_address(
    destination: Destination, address: Destination, settings: UpstreamSettings
) -> Connection:
    t = settings.timeouts
    where = str(destination) if address == destination else f"{destination} ({address})"
    started = time.monotonic()
    try:
        with trio.fail_after(t.upstream_connect):
            stream = await _open_stream(address)
    except trio.TooSlowError:
        raise LegError("connect", where, f"no connection within {t.upstream_connect:g}s") from None
    except OSError as exc:
        raise LegError("connect", where, exc.strerror or str(exc)) from None
    conn = Connection(stream, destination, settings)
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
            else:
                logger.debug("upstream %s does not offer STARTTLS: plain text", where)
        if destination.xclient and settings.client is not None and "XCLIENT" in conn.extensions:
            await send_xclient(conn, settings.client, helo)
    except BaseException:
        await conn.close()
        raise
    return conn


class Leg:
    """The session's link to one destination group, reused across transactions."""

    def __init__(self, group: DestinationGroup, settings: UpstreamSettings) -> None:
        self.group = group
        self.settings = settings
        self.conn: Connection | None = None
        self.reused = False  # the connection served an earlier transaction
        # Transaction state on this leg.
        self.envelope: Envelope | None = None
        self.mail_reply: Reply | None = None
        self.accepted: list[str] = []  # recipients the client saw accepted, routed here
        self.synced = False  # the connection holds MAIL + self.accepted of this transaction
        self.needs_reset = False  # the upstream holds transaction state to clear with RSET
        self.failure: LegError | None = None  # this transaction can no longer use this leg
        self.in_data = False
        self.sent = 0

    def __repr__(self) -> str:
        return f"<Leg {self.group} via {self.destination}>"

    @property
    def destination(self) -> str:
        return str(self.conn.destination) if self.conn else str(self.group)

    # -- transaction bookkeeping (no I/O) --------------------------------------------------

    def begin(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.mail_reply = None
        self.accepted = []
        self.synced = False
        self.failure = None
        self.sent = 0

    def end_transaction(self) -> None:
        self.reused = self.conn is not None
        self.envelope = None
        self.mail_reply = None
        self.accepted = []
        self.synced = False
        self.failure = None
        self.in_data = False

    def unaccept(self, recipient: str) -> None:
        """The upstream accepted `recipient` but the client saw it rejected: before this leg is
        used again the upstream transaction is reset and replayed without it."""
        self.synced = False
        self.needs_reset = True
        if recipient in self.accepted:
            self.accepted.remove(recipient)

    # -- I/O ---------------------------------------------------------------------------------

    async def _open(self, skip: Destination | None = None, fresh: bool = False) -> Connection:
        """Connect to the first alternative that greets (an idle pooled connection to it counts,
        unless `fresh`)."""
        errors: list[LegError] = []
        alternatives = list(self.group.alternatives)
        if skip is not None and skip in alternatives and len(alternatives) > 1:
            # Failover after a failure mid-transaction: the alternatives after the failed one
            # first, then the ones before it.
            i = alternatives.index(skip)
            alternatives = alternatives[i + 1 :] + alternatives[:i]
        pool = None if fresh else self.settings.pool
        for destination in alternatives:
            pooled = pool.take(destination) if pool is not None else None
            if pooled is not None:
                self.conn, self.reused, self.synced, self.needs_reset = pooled, True, False, False
                return pooled
            try:
                conn = await connect(destination, self.settings)
            except LegError as exc:
                logger.info("upstream %s unavailable: %s", destination, exc)
                errors.append(exc)
                continue
            self.conn, self.reused, self.synced, self.needs_reset = conn, False, False, False
            return conn
        last = errors[-1]
        detail = "; ".join(f"{e.where} {e.stage}: {e.detail}" for e in errors)
        raise LegError(last.stage, str(self.group), detail, last.reply)

    async def drop(self) -> None:
        """Close the connection hard (never sends the end-of-data sequence)."""
        conn, self.conn = self.conn, None
        self.synced = self.needs_reset = self.in_data = self.reused = False
        if conn is not None:
            await conn.close()

    async def _sync(self, recipient: str | None) -> Reply | None:
        """Bring the upstream in line with this transaction, then RCPT `recipient`, pipelined.

        Returns the reply for `recipient` (or the MAIL reply when MAIL was refused).
        """
        assert self.envelope is not None
        conn = self.conn or await self._open()
        t = self.settings.timeouts
        commands: list[tuple[bytes, str, float]] = []
        replay = not self.synced
        reset = replay and self.needs_reset
        if replay and (refusal := self.envelope.refusal(conn.extensions)) is not None:
            # Refused here, for every recipient of this leg: the destination never sees MAIL.
            self.mail_reply, self.synced = refusal, True
            if self.accepted:
                self.failure = conn.error("mail", f"replay refused: {refusal}")
            return refusal
        if reset:
            commands.append((b"RSET\r\n", "rset", t.upstream_command))
        if replay:
            commands.append((self.envelope.mail_line(conn.extensions), "mail", t.upstream_mail))
            commands += [(_rcpt_line(r), "rcpt", t.upstream_rcpt) for r in self.accepted]
        if recipient is not None:
            commands.append((_rcpt_line(recipient), "rcpt", t.upstream_rcpt))
        if not commands:
            return None
        replies = await conn.exchange(commands)
        if reset:
            rset = replies.pop(0)
            if rset.klass != 2:
                raise conn.error("rset", f"refused: {rset}", rset)
            self.needs_reset = False
        if replay:
            self.mail_reply = replies.pop(0) if replies else None
            self.needs_reset = True
            if self.mail_reply is None or self.mail_reply.klass != 2:
                self.synced = True  # nothing more to replay: MAIL itself was answered
                if self.accepted:
                    self.failure = conn.error("mail", f"replay refused: {self.mail_reply}")
                return self.mail_reply
            replayed, replies = replies[: len(self.accepted)], replies[len(self.accepted) :]
            if len(replayed) < len(self.accepted) or any(r.klass != 2 for r in replayed):
                self.failure = conn.error("rcpt", "replayed recipient no longer accepted")
                return Reply.make(451, "4.3.0", "Destination changed its answer; try again later")
            self.synced = True
        elif self.mail_reply is not None and self.mail_reply.klass != 2:
            return self.mail_reply
        return replies[0] if recipient is not None and replies else None

    async def _with_failover(self, recipient: str | None) -> Reply | None:
        """`_sync`, retried once on a fresh connection (next alternative) if the upstream goes
        away; the transaction is replayed there."""
        try:
            return await self._sync(recipient)
        except LegError as exc:
            failed = self.conn.destination if self.conn else None
            was_reused = self.reused
            await self.drop()
            if failed is None and not was_reused:
                raise  # could not open at all: _open already tried every alternative
            logger.info("leg %s lost at %s (%s); retrying", self.group, exc.stage, exc.detail)
            await self._open(skip=None if was_reused else failed, fresh=True)
            return await self._sync(recipient)

    async def rcpt(self, recipient: str) -> Reply:
        """The upstream's answer for `recipient` (MAIL is sent first if this transaction has
        not used the leg yet). Raises LegError when no alternative can take it."""
        if self.failure is not None:
            raise self.failure
        if self.synced and self.mail_reply is not None and self.mail_reply.klass != 2:
            return self.mail_reply
        try:
            reply = await self._with_failover(recipient)
        except LegError as exc:
            self.failure = exc
            raise
        assert reply is not None
        return reply

    async def data(self) -> Reply:
        """Replay if needed, then DATA. 354 means the leg now expects the body."""
        if self.failure is not None:
            raise self.failure
        try:
            if not self.synced:
                reply = await self._with_failover(None)
                if self.failure is not None:
                    raise self.failure
                if reply is not None and reply.klass != 2:
                    return reply
            assert self.conn is not None
            t = self.settings.timeouts
            reply = await self.conn.command(b"DATA\r\n", "data", t.upstream_data_init)
        except LegError as exc:
            self.failure = exc
            await self.drop()
            raise
        self.in_data = reply.code == 354
        return reply

    async def send_body(self, data: bytes) -> None:
        assert self.conn is not None and self.in_data
        await self.conn.send(data, "body", self.settings.timeouts.upstream_data_block)
        self.sent += len(data)
        self.conn.stats.sent(len(data))

    async def finish(self, tail: bytes = b"") -> Reply:
        """Send the rest of the body and the end-of-data sequence, in one write, and read the
        verdict: the one commit point."""
        assert self.conn is not None and self.in_data
        t = self.settings.timeouts
        stats = self.conn.stats
        try:
            await self.conn.send(tail + b".\r\n", "end-of-data", t.upstream_data_block)
            self.sent += len(tail)
            stats.sent(len(tail))
            reply = await self.conn.read_reply("end-of-data", t.upstream_data_end)
        except LegError:
            stats.finished(0)
            await self.drop()
            raise
        stats.finished(reply.code)
        self.in_data = False
        self.needs_reset = False  # a final reply ends the upstream transaction
        return reply

    async def abort(self) -> None:
        """Give up the current message: drop the connection so no partial message is delivered."""
        if self.in_data:
            await self.drop()

    def release(self) -> bool:
        """At the end of the client session: hand a clean connection to the pool."""
        pool, conn = self.settings.pool, self.conn
        clean = not (self.in_data or self.needs_reset or self.envelope or self.failure)
        if pool is None or conn is None or not clean or not pool.give(conn):
            return False
        self.conn = None
        return True

    async def quit(self) -> None:
        conn = self.conn
        if conn is None:
            return
        if not self.in_data:
            with trio.move_on_after(min(self.settings.timeouts.upstream_command, 5.0)):
                with contextlib.suppress(LegError):
                    await conn.command(b"QUIT\r\n", "quit", math.inf)
        await self.drop()


def _rcpt_line(recipient: str) -> bytes:
    return f"RCPT TO:<{recipient}>\r\n".encode("utf-8", "replace")
