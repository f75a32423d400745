"""One upstream leg: Moxy as an SMTP client of one destination group.

A `Leg` owns at most one connection to one of its group's failover alternatives, keeps it open
across the client's transactions (RSET is sent lazily, only when the next transaction needs the
connection), and can replay the current transaction (MAIL and the recipients the client saw
accepted) on a fresh connection when an upstream goes away before DATA.

The end-of-data sequence is sent in exactly one place, `Leg.finish()`; every fault path closes the
connection instead (`Leg.abort()`), which makes the upstream discard a partial message.
"""

from __future__ import annotations

import logging

import trio

from moxy.connection import (
    AT_LIMIT,
    RECEIVE_SIZE,
    TRACE_ALLOWANCE,
    Connection,
    Envelope,
    LegError,
    UpstreamSettings,
    connect,
)
from moxy.lookup.base import Destination, DestinationGroup
from moxy.pool import ConnectionPool, spoke_while_idle
from moxy.smtp.replies import Reply
from moxy.stream import StreamBroken

__all__ = ["TRACE_ALLOWANCE", "ConnectionPool", "Envelope", "Leg", "LegError", "UpstreamSettings"]

logger = logging.getLogger("moxy.upstream")


class Leg:
    """The session's link to one destination group, reused across transactions."""

    def __init__(self, group: DestinationGroup, settings: UpstreamSettings) -> None:
        self.group = group
        self.route = group.text  # as events name it, read once (a Python attribute)
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
        self.seven_bit = False  # in DATA to a destination without 8BITMIME (data())
        self.committing = False  # the end-of-data sequence is on its way: a verdict is due
        self.sent = 0

    def __repr__(self) -> str:
        return f"<Leg {self.group} via {self.destination}>"

    @property
    def destination(self) -> str:
        return self.conn.name if self.conn else str(self.group)

    # -- transaction bookkeeping (no I/O) --------------------------------------------------

    def begin(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self.mail_reply = None
        self.accepted = []
        self.synced = False
        self.failure = None
        self.committing = False
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
                # Skipped while marked down ("down", "busy"): the marking is logged once, a
                # line per recipient would be a flood (200,000 in 20 minutes, seen).
                # So is the process's upstream connection limit (Destinations says so).
                level = (logging.DEBUG if exc.stage in ("down", "busy")
                         or exc.detail.startswith(AT_LIMIT) else logging.INFO)
                logger.log(level, "upstream %s unavailable: %s", destination, exc)
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
        conn = self.conn
        if conn is not None and self.reused and not self.synced and spoke_while_idle(conn):
            # Kept from the session's earlier transaction, and the destination spoke since (a
            # late second verdict, a 421 before closing): its words would answer this MAIL.
            # Not used again, as the pool would not take it.
            await self.drop()
            conn = None
        conn = conn or await self._open()
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
            for accepted in self.accepted:
                commands.append((_rcpt_line(accepted), "rcpt", t.upstream_rcpt))
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
            if self.accepted:
                replayed, replies = replies[: len(self.accepted)], replies[len(self.accepted) :]
                if len(replayed) < len(self.accepted) or any(r.klass != 2 for r in replayed):
                    self.failure = conn.error("rcpt", "replayed recipient no longer accepted")
                    return Reply.make(
                        451, "4.3.0", "Destination changed its answer; try again later"
                    )
            self.synced = True
        elif self.mail_reply is not None and self.mail_reply.klass != 2:
            return self.mail_reply
        return replies[0] if recipient is not None and replies else None

    async def _failover(self, exc: LegError, recipient: str | None) -> Reply | None:
        """`_sync` failed with `exc`: once more on a fresh connection, and the transaction
        replayed there: to the next alternative of the group, or to the same destination when
        the connection that failed was an old one (pooled, or kept from an earlier message)
        that went away. Never to the same destination after it took a whole timeout, or said
        421, on a connection of its own: the sender would wait twice (past RFC 5321's 5
        minutes for RCPT with the defaults). A failure here is the leg's `failure` for this
        transaction."""
        try:
            failed = self.conn.destination if self.conn else None
            was_reused = self.reused
            await self.drop()
            if failed is None and not was_reused:
                raise exc  # could not open at all: _open already tried every alternative
            same_again = was_reused and not exc.timed_out
            if not same_again and len(self.group.alternatives) < 2:
                raise exc
            logger.info("leg %s lost at %s (%s); retrying", self.group, exc.stage, exc.detail)
            await self._open(skip=None if same_again else failed, fresh=True)
            return await self._sync(recipient)
        except LegError as error:
            self.failure = error
            raise

    async def rcpt(self, recipient: str) -> Reply:
        """The upstream's answer for `recipient` (MAIL is sent first if this transaction has
        not used the leg yet). Raises LegError when no alternative can take it."""
        if self.failure is not None:
            raise self.failure
        if self.synced and self.mail_reply is not None and self.mail_reply.klass != 2:
            return self.mail_reply
        try:
            reply = await self._sync(recipient)
        except LegError as exc:
            reply = await self._failover(exc, recipient)
        assert reply is not None
        return reply

    async def data(self) -> Reply:
        """Replay if needed, then DATA. 354 means the leg now expects the body."""
        if self.failure is not None:
            raise self.failure
        try:
            if not self.synced:
                try:
                    reply = await self._sync(None)
                except LegError as exc:
                    reply = await self._failover(exc, None)
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
        # RFC 6152: an 8BITMIME message may not go as it is to a destination without 8BITMIME,
        # and Moxy does not convert: its body is checked to be 7-bit (the client's BODY= is a
        # claim; many 8BITMIME messages are 7-bit all the same).
        assert self.envelope is not None and self.conn is not None
        self.seven_bit = self.envelope.body == "8BITMIME" and (
            "8BITMIME" not in self.conn.extensions
        )
        return reply

    async def send_body(self, data: bytes) -> None:
        assert self.conn is not None and self.in_data
        conn = self.conn
        if self.seven_bit and not data.isascii():
            raise self.not_7bit()
        await conn.send(data, "body", self.settings.timeouts.upstream_data_block)
        self.sent += len(data)
        if conn.timed:  # metrics on
            conn.stats.sent(len(data))

    def not_7bit(self) -> LegError:
        assert self.conn is not None
        return self.conn.error("8bitmime", "8-bit data for a destination without 8BITMIME")

    def heard_unasked(self) -> LegError | None:
        """Before the commit: the destination must have said nothing since its 354. A reply
        now (an early "250", then perhaps a "550" for the message itself), a close or a reset
        fails the leg before any leg gets the end-of-data sequence. One read that finds
        nothing (over TLS, a look at what is buffered and a peek: Stream.unasked)."""
        conn = self.conn
        assert conn is not None and self.in_data
        try:
            data = conn.stream.unasked(RECEIVE_SIZE)
        except StreamBroken as exc:
            return conn.error("body", f"connection lost: {exc}")
        if data is None:
            return None
        if not data:
            return conn.error("body", "connection closed by upstream")
        return conn.error("body", f"out of step: it spoke before the end of data: {data[:80]!r}")

    async def finish(self, tail: bytes = b"") -> Reply:
        """Send the rest of the body and the end-of-data sequence, in one write, and read the
        verdict: the one commit point."""
        assert self.conn is not None and self.in_data
        t = self.settings.timeouts
        conn = self.conn
        # A session cancelled now (a shutdown past its grace) must not commit: it could not
        # read the verdict, and its client would send the message again.
        await trio.lowlevel.checkpoint_if_cancelled()
        self.committing = True
        try:
            await conn.send(tail + b".\r\n", "end-of-data", t.upstream_data_block)
            self.sent += len(tail)
            if conn.timed:  # metrics on
                conn.stats.sent(len(tail))
            reply = await conn.read_reply("end-of-data", t.upstream_data_end)
        except LegError as exc:
            if conn.timed:  # the destination's reply when it gave one (a 2xx out of step)
                conn.stats.finished(exc.reply.code if exc.reply is not None else 0)
            await self.drop()
            raise
        if conn.timed:
            conn.stats.finished(reply.code)
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
            await conn.send_quit(min(self.settings.timeouts.upstream_command, 5.0))
        await self.drop()


async def close_legs(legs: list[Leg]) -> None:
    """The end of a session whose legs could not all be pooled: the legs in DATA dropped,
    the clean ones pooled, the others sent QUIT (within 5 s in all)."""
    # First, before anything that may wait: no leg may stay inside DATA.
    for leg in legs:
        if leg.in_data:
            await leg.drop()
    to_quit = [leg for leg in legs if not leg.release() and leg.conn]
    if len(to_quit) == 1:  # its QUIT's write has a deadline of at most 5 s itself
        await to_quit[0].quit()
    elif to_quit:
        with trio.move_on_after(5):
            for leg in to_quit:
                await leg.quit()
    for leg in legs:
        if leg.conn is not None:  # pooled or quit: nothing left to close
            await leg.drop()


def _rcpt_line(recipient: str) -> bytes:
    return f"RCPT TO:<{recipient}>\r\n".encode("utf-8", "replace")
