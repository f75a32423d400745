"""One client connection: moves bytes between the socket and the protocol core, owns the
transaction and the pool of upstream legs, and turns the legs' answers into client replies.

Every way a session can end (QUIT, client gone, timeout, server shutdown, bug) passes through
`Session.close()`, which drops any leg inside DATA before anything else: no partial message
can be delivered upstream because the end-of-data sequence is only sent on a complete body.
"""

from __future__ import annotations

import logging
import time
from typing import NoReturn

import trio

from moxy.accounting import events as acct
from moxy.context import ServerContext
from moxy.lookup.base import BadRouteData, DestinationGroup, LookupFailed
from moxy.relay import sender_routed
from moxy.session_events import SessionEvents
from moxy.session_kept import (
    HELP_REPLY,
    MAIL_OK,
    OK,
    TLS_READY,
    VRFY_REPLY,
    bye,
    client_settings,
    greeting,
    hello_reply,
)
from moxy.smtp import events as ev
from moxy.smtp.events import NEED_DATA, PAUSED, BodyChunk, BodyEnd, Data, MailFrom, RcptTo
from moxy.smtp.replies import Reply
from moxy.smtp.server import ServerConnection
from moxy.stream import Stream, StreamBroken, StreamTimeout
from moxy.tls import describe
from moxy.trace import new_session_id, received_header, with_protocol
from moxy.transaction import Transaction, decide_final
from moxy.upstream import Envelope, Leg, UpstreamSettings, close_legs

__all__ = ["ClientGone", "Session", "received_header"]

logger = logging.getLogger("moxy.session")

class ClientGone(Exception):
    pass


class Session(SessionEvents):
    def __init__(self, stream: Stream, client_ip: str, ctx: ServerContext) -> None:
        self.stream = stream
        self.client_ip = client_ip
        self.ctx = ctx
        # Metrics off (the default): the hooks do nothing, so they are not even called.
        self.counting = ctx.metrics.registry is not None
        cfg = ctx.config
        # What every message reads, taken out of the configuration once.
        self.command_timeout = cfg.timeouts.client_command
        self.data_timeout = cfg.timeouts.client_data
        self.drain = ctx.drain
        self.split_destinations = cfg.proxy.split_destinations
        self.emit = ctx.emit
        self.events_on = ctx.emit is not acct.discard
        self.node = cfg.server.node
        self.data_chunk = cfg.limits.data_chunk
        self.session_legs = cfg.limits.session_legs
        self.hostname = cfg.server.hostname
        self.id = new_session_id()
        self.trusted = ctx.relay.trusts(client_ip)  # [relay] trusted_networks
        self.smtp = ServerConnection(
            max_command_line=cfg.limits.command_line,
            max_text_line=cfg.limits.text_line,
            max_recipients=cfg.limits.recipients,
            max_message_size=cfg.limits.message_size,
            max_errors=cfg.limits.errors,
            bare_newlines=cfg.proxy.bare_newlines,
            hostname=cfg.server.hostname,
            starttls=ctx.tls is not None,
            require_tls=cfg.tls.require and ctx.tls is not None,
        )
        self.legs: dict[DestinationGroup, Leg] = {}
        self.transaction: Transaction | None = None
        self.helo = ""
        self.protocol = "SMTP"
        self.tls = ""  # after STARTTLS: "TLSv1.3 with cipher ... (256/256 bits)"
        self.messages = 0
        self.message_id = ""
        self.data_started = 0.0
        self.received_bytes = 0
        self.body_refusal: Reply | None = None
        self.output: list[bytes] = []  # replies not yet written
        self.ended_by: str | None = None  # why Moxy ended the session (a "connection" event)
        self._upstream: UpstreamSettings | None = None  # see upstream_settings()

    # -- I/O with the client ---------------------------------------------------------------

    def reply(self, reply: Reply) -> None:
        """Queue a reply. Replies go out when Moxy next waits for the client, so the answers to
        a pipelined group of commands leave in one write (RFC 2920 §3.2)."""
        self.output.append(self.smtp.send(reply))

    async def flush(self) -> None:
        if not self.output:
            return
        data = b"".join(self.output)  # one reply: that very bytes object, no copy
        self.output.clear()
        # A client that stops reading must not hold the session forever.
        timeout = self.command_timeout
        try:
            await self.stream.send_within(data, timeout)
        except StreamBroken:
            raise ClientGone from None
        except StreamTimeout:
            self.log_connection(0, "client did not read its replies", acct.CLIENT_TIMEOUT,
                                "reply")
            raise ClientGone from None

    async def next_event(self) -> ev.Event:
        smtp = self.smtp
        while True:
            event = smtp.next_event()
            if event is NEED_DATA:
                if self.output:
                    await self.flush()
                in_data = self.transaction is not None and bool(self.transaction.streaming)
                timeout = self.data_timeout if in_data else self.command_timeout
                drain = self.drain
                if drain.draining and not in_data:
                    await self.say_goodbye(Reply.make(
                        421, "4.3.2", f"{self.hostname} Service shutting down; try again later"
                    ))
                try:
                    data = await self.stream.receive_within(
                        self.data_chunk, timeout,
                        interruptible=not in_data,  # by the drain: see Drain.start
                    )
                except StreamBroken:
                    data = b""
                except StreamTimeout:
                    if drain.draining and not in_data:
                        continue  # say goodbye at the top of the loop
                    goodbye = Reply.make(421, "4.4.2", f"{self.hostname} Timeout, closing")
                    self.log_connection(goodbye.code, str(goodbye), acct.CLIENT_TIMEOUT,
                                        "data" if in_data else "command")
                    await self.say_goodbye(goodbye)
                smtp.receive_data(data)
                continue
            assert event is not PAUSED, "a command was left without a reply"
            return event

    async def say_goodbye(self, reply: Reply) -> NoReturn:
        """Give up the transaction, send a closing 421 and end the session."""
        await self.abort_transaction()
        self.reply(reply)
        await self.flush()
        raise ClientGone

    # -- the session -----------------------------------------------------------------------

    async def run(self) -> None:
        logger.debug("session %s from %s", self.id, self.client_ip)
        self.drain.waiting.add(self.stream)
        try:
            self.reply(greeting(self.hostname, self.ctx.config.server.banner))
            while await self.handle(await self.next_event()):
                pass
            await self.flush()
        except ClientGone:
            pass
        except trio.Cancelled:  # the server stopping past its grace: no checkpoint here
            self.log_stopped()
            raise
        finally:
            await self.close()

    async def handle(self, event: ev.Event) -> bool:
        """Answer one event; False ends the session."""
        # By exact type, the commands of every message first: the core makes these events and
        # subclasses none of them (a `match` on class patterns was an isinstance call and an
        # attribute lookup per case tried: 15 and 17 of each per message).
        if type(event) is MailFrom:
            await self.mail(event)
        elif type(event) is RcptTo:
            reply = await self.rcpt(event.address)
            if self.counting:
                self.ctx.metrics.recipient(reply.code)
            self.reply(reply)
        elif type(event) is Data:
            await self.data()
        elif type(event) is BodyChunk:
            assert self.transaction is not None
            size = len(event.data)
            self.received_bytes += size
            if self.counting:
                self.ctx.metrics.received(size)
            await self.transaction.send(event.data)
        elif type(event) is BodyEnd:
            await self.end_of_data()
        else:
            return await self.handle_other(event)
        return True

    async def handle_other(self, event: ev.Event) -> bool:
        """`handle` for the events that are not part of every message."""
        match event:
            case ev.BodyRefused(reply=reply):
                self.body_refusal = reply
                await self.abort_transaction(keep=True)
            case ev.Hello(verb=verb, domain=domain):
                await self.end_transaction()
                self.helo = domain
                self.protocol = "ESMTP" if verb == "EHLO" else "SMTP"
                self.reply(hello_reply(self.hostname, verb, domain, self.smtp.extensions))
            case ev.Reset():
                await self.end_transaction()
                self.reply(OK)
            case ev.StartTls():
                self.reply(TLS_READY)
                await self.start_tls()
            case ev.Noop():
                self.reply(OK)
            case ev.Verify():
                self.reply(VRFY_REPLY)
            case ev.Help():
                self.reply(HELP_REPLY)
            case ev.Quit():
                self.reply(bye(self.hostname))
                return False
            case ev.Invalid(reply=reply, recipient=recipient):
                self.ctx.metrics.invalid(reply)
                self.reply(reply)
                if reply.code == 421:
                    self.log_connection(reply.code, str(reply), acct.PROTOCOL_ERRORS, "command")
                elif recipient is not None:
                    self.log_refused(recipient, reply, acct.POLICY)
                return reply.code != 421
            case ev.ConnectionClosed():
                return False
        return True

    async def start_tls(self) -> None:
        """After the 220: the handshake, on the same connection. The core has already dropped
        whatever the client pipelined after STARTTLS and forgotten its HELO (RFC 3207 §4.2);
        a failed handshake ends this session only."""
        await self.flush()
        if self.smtp.discarded:
            logger.warning(
                "session %s from %s: %d bytes sent after STARTTLS before the handshake were "
                "discarded (command injection?)", self.id, self.client_ip, self.smtp.discarded,
            )
        assert self.ctx.tls is not None
        timeout = self.ctx.config.timeouts.client_command
        failure = ""
        try:
            await self.stream.start_tls(  # a stop cuts it short: see Drain.start
                self.ctx.tls, trio.current_time() + timeout, server_side=True,
                interruptible=True,
            )
        except StreamTimeout:
            failure = f"no handshake within {timeout:g}s"
            if self.drain.draining:
                failure = "the server is stopping"
            else:
                self.log_connection(0, failure, acct.CLIENT_TIMEOUT, "tls")
        except StreamBroken as exc:
            failure = str(exc)
        if failure:
            logger.info("session %s from %s: TLS handshake failed: %s",
                        self.id, self.client_ip, failure)
            raise ClientGone
        self.tls = describe(self.stream.ssl)
        self.helo, self.protocol = "", "SMTP"
        if self.legs:  # opened before TLS: an XCLIENT on them told the clear-text HELO
            await close_legs(list(self.legs.values()))
            self.legs.clear()
        logger.info("session %s from %s: TLS established: %s", self.id, self.client_ip, self.tls)

    async def mail(self, event: ev.MailFrom) -> None:
        await self.end_transaction()
        clients = self.ctx.clients
        if clients is not None and not clients.allow_message(self.client_ip):  # logs it
            reply = Reply.make(
                421, "4.7.0", f"{self.hostname} Too many messages from your address; "
                "try again later"
            )
            self.log_connection(reply.code, str(reply), acct.MESSAGE_RATE, "mail")
            await self.say_goodbye(reply)
        envelope = Envelope(event.address, event.size, event.body, event.smtputf8)
        self.transaction = Transaction(
            self.legs, self.upstream_settings(), envelope,
            self.split_destinations,
        )
        self.messages += 1
        self.message_id = f"{self.id}.{self.messages}"
        self.reply(MAIL_OK)

    def upstream_settings(self) -> UpstreamSettings:
        """The server's settings plus who this client is (for XCLIENT to trusted legs), made
        again only when the client's HELO changed."""
        protocol = "ESMTP" if self.protocol == "ESMTP" else "SMTP"
        settings = self._upstream
        known = settings.client if settings is not None else None
        if settings is None or known is None or (known.helo, known.protocol) != (
            self.helo, protocol
        ):
            settings = self._upstream = client_settings.get(
                self.ctx.upstream, self.client_ip, self.helo, protocol
            )
        return settings

    async def rcpt(self, address: str) -> Reply:
        assert self.transaction is not None
        relay = self.ctx.relay
        if not self.trusted and sender_routed(address):
            return self.relay_denied(address)
        try:
            route = relay.fixed_route() or await self.ctx.router.route(address)
        except BadRouteData as exc:
            logger.error("bad route data for <%s>: %s", address, exc)
            failed = Reply.make(451, "4.3.0", "Routing data error; try again later")
        except LookupFailed as exc:  # the outage is logged once, by the router
            logger.debug("route lookup for <%s> failed: %s", address, exc)
            failed = Reply.make(451, "4.4.3", "Routing temporarily unavailable; try again later")
        except Exception:
            # A bug, not a routing answer: never accept what cannot be routed, keep the session.
            logger.exception("route lookup for <%s> raised", address)
            failed = Reply.make(451, "4.3.0", "Routing error; try again later")
        else:
            route = route or relay.fallback(self.trusted)
            if route is None:
                return self.relay_denied(address)
            reply = await self.transaction.add_recipient(address, route)
            refusal = self.transaction.refusal
            if reply.klass != 2 and refusal is not None:
                if refusal.of_recipient and reply.klass == 5 and reply.code != 552:
                    self.smtp.refused_recipient()
                self.log_refused(address, reply, refusal.reason, refusal.destination, str(route))
            return reply
        return self.log_refused(address, failed, acct.LOOKUP_FAILED)

    def relay_denied(self, address: str) -> Reply:
        self.smtp.refused_recipient()  # an error of the client's (limits.errors)
        reply = Reply.make(550, "5.7.1", f"<{address}>: Relaying denied")
        return self.log_refused(address, reply, acct.RELAY_DENIED)

    async def data(self) -> None:
        assert self.transaction is not None
        self.body_refusal = None
        self.received_bytes = 0
        self.data_started = time.monotonic()
        header = received_header(
            self.helo, self.client_ip, self.hostname,
            with_protocol(self.protocol, self.transaction.envelope.smtputf8, bool(self.tls)),
            self.message_id, self.transaction.recipients, tls=self.tls,
        )
        reply = await self.transaction.start_data(header)
        if reply.code != 354:
            self.log_message(reply, "data", 0)
        self.reply(reply)

    async def end_of_data(self) -> None:
        transaction = self.transaction
        assert transaction is not None
        if self.body_refusal is not None:
            reply = self.body_refusal
            self.log_message(reply, "body", self.received_bytes)
        else:
            results = await transaction.finish()
            reply = decide_final([r.outcome for r in results], self.message_id)
            self.log_delivery(results, reply, self.received_bytes)
            if reply.klass != 2:
                unsure = [r.destination for r in results if r.may_have_it()]
                if unsure:
                    logger.warning(
                        "message %s: %s accepted it or gave no clear verdict after the end of "
                        "data, client told %s: duplicate possible",
                        self.message_id, ", ".join(unsure), reply.code,
                    )
        await self.end_transaction()
        self.reply(reply)

    # -- ending things ---------------------------------------------------------------------

    async def abort_transaction(self, keep: bool = False) -> None:
        """Drop legs inside DATA (no partial delivery). With `keep`, the transaction stays
        until its end-of-data so the final reply can still be given."""
        if self.transaction is not None:
            await self.transaction.abort()
            if not keep:
                self.transaction.close()
                self.transaction = None

    async def end_transaction(self) -> None:
        if self.transaction is not None:
            await self.transaction.abort()
            self.transaction.close()
            self.transaction = None
        if len(self.legs) > self.session_legs:  # no hoarding: pooled, or QUIT
            await close_legs(list(self.legs.values()))
            self.legs.clear()

    async def close(self) -> None:
        # Most sessions end with each leg clean (pooled now) or gone: then nothing waits.
        for leg in self.legs.values():
            if leg.conn is not None and (leg.in_data or not leg.release()):
                with trio.CancelScope(shield=True):
                    await close_legs(list(self.legs.values()))
                break
        self.drain.waiting.discard(self.stream)
        stream = self.stream
        if stream.ssl is None:
            await stream.aclose()  # a plain socket closes at once, nothing waits
        else:
            with trio.CancelScope(shield=True):
                await stream.aclose()
