"""The delivery events a session emits (moxy.accounting.events): one per leg and per message
at end-of-data, one per refused recipient, one when Moxy ends a connection itself. A mixin of
`Session`, which keeps the state they describe.

The events of end of data are the hot path (`log_delivery`: one per leg and the message's,
sharing what they have in common): each is the session's state handed to `emit` as its
arguments, and nothing is made when accounting has no sinks.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from moxy.accounting import events as acct
from moxy.accounting.events import LEG_AND_MESSAGE, Emit
from moxy.context import ServerContext
from moxy.smtp.replies import Reply
from moxy.stream import Stream
from moxy.transaction import LegResult, Transaction
from moxy.upstream import Leg

logger = logging.getLogger("moxy.session")
# The clocks as compiled statics: a module-level name is a dict lookup per call.
wall_time: Final = time.time
monotonic: Final = time.monotonic


def _leg_tls(leg: Leg) -> str:
    """A leg event's `tls`: the TLS of Moxy's connection to the destination (STARTTLS), as
    `acct.tls_field` writes it; "" in clear text or without a connection."""
    conn = leg.conn
    return acct.tls_field(conn.tls) if conn is not None and conn.tls else ""


class SessionEvents:
    # The session's state the events describe (set by Session.__init__).
    ctx: ServerContext
    counting: bool  # metrics on
    emit: Emit  # ctx.emit: takes an event's fields as its arguments
    events_on: bool  # emit is not events.discard (a native attribute: no global looked up)
    node: str  # [server] node
    id: str
    client_ip: str
    helo: str
    tls: str
    message_id: str
    data_started: float
    transaction: Transaction | None
    ended_by: str | None
    hostname: str
    stream: Stream
    output: list[bytes]
    received_bytes: int

    def log_delivery(self, results: list[LegResult], reply: Reply, size: int) -> None:
        """End of data: an event per leg, then the message's. They share one reading of the
        clocks and everything else that describes the message, computed once. A message whose
        one leg carried every recipient hands both over as one LEG_AND_MESSAGE entry."""
        if self.counting:
            self.ctx.metrics.message(reply.code)
        if not self.events_on:
            return
        emit = self.emit
        t = self.transaction
        assert t is not None
        # Typed Any, not float: compiled (setup.py), a float is boxed again wherever it is
        # passed, and the events would no longer share these objects, which is what packs
        # them as SAME and lets log_lines format a message's clock fields once for both of
        # its lines.
        now: Any = wall_time()
        duration: Any = monotonic() - self.data_started
        node = self.node
        tls = acct.tls_field(self.tls) if self.tls else ""
        sid, mid, ip, helo, mail_from = (
            self.id, self.message_id, self.client_ip, self.helo, t.envelope.mail_from
        )
        everyone = t.recipients
        recipients = tuple(everyone)
        if len(results) == 1 and len(t.legs) == 1:
            result = results[0]
            outcome, leg = result.outcome, result.leg
            if isinstance(outcome, Reply) and leg.accepted == everyone:
                # The commonest message: its two events as one entry (acct.LEG_AND_MESSAGE).
                emit(
                    LEG_AND_MESSAGE, sid, mid, ip, helo, mail_from, recipients,
                    result.destination, leg.route, leg.sent, outcome.code,
                    outcome.line(), "end-of-data", duration, node, "", tls, now,
                    size, reply.code, reply.line(), _leg_tls(leg),
                )
                return
        for result in results:
            outcome, leg = result.outcome, result.leg
            if isinstance(outcome, Reply):
                code, text, stage = outcome.code, outcome.line(), "end-of-data"
            else:  # a LegError: with the destination's reply when it gave one (a 421, or a
                # 2xx followed by words out of step), else code 0
                failed_reply = getattr(outcome, "reply", None)
                code = failed_reply.code if failed_reply is not None else 0
                text, stage = str(outcome), getattr(outcome, "stage", "?")
            # A leg that carried every recipient shares the message's tuple (and its "to=").
            accepted = leg.accepted
            route = leg.route
            emit(
                "leg", sid, mid, ip, helo, mail_from,
                recipients if accepted == everyone else tuple(accepted), result.destination,
                route, leg.sent, code, text, stage, duration, node, "", _leg_tls(leg), now,
            )
        if len(results) != 1 or len(t.legs) != 1:  # one leg: its route is the message's
            route = " ".join([group.text for group in t.legs])
        emit(
            "message", sid, mid, ip, helo, mail_from, recipients, "-", route, size,
            reply.code, reply.line(), "end-of-data", duration, node, "", tls, now,
        )

    def log_message(self, reply: Reply, stage: str, size: int, reason: str = "") -> None:
        """A message no leg finished: refused at DATA, its body refused by Moxy, or stopped
        by the server's shutdown (`reason` "shutdown")."""
        if self.counting:
            self.ctx.metrics.message(reply.code)
        if not self.events_on:
            return
        emit = self.emit
        t = self.transaction
        if t is not None:
            mail_from, recipients = t.envelope.mail_from, tuple(t.recipients)
            route = " ".join([group.text for group in t.legs])
        else:
            mail_from, recipients, route = "", (), ""
        emit(
            "message", self.id, self.message_id, self.client_ip, self.helo, mail_from,
            recipients, "-", route, size, reply.code, reply.line(), stage,
            monotonic() - self.data_started, self.node, reason,
            acct.tls_field(self.tls) if self.tls else "", wall_time(),
        )

    def log_stopped(self) -> None:
        """The server stopped this session (its shutdown grace over, or a second signal),
        perhaps waiting for a destination's answer to its command, perhaps mid-message: the
        client hears the replies it is owed and 421, if its socket takes them at once, and a
        message gets its event. Once the end-of-data sequence is on its way, the verdict is
        lost: the message may be delivered and its client will send it again."""
        reply = Reply.make(421, "4.3.2", f"{self.hostname} Service shutting down; try again later")
        self.stream.say_now(b"".join([*self.output, reply.to_bytes()]))
        t = self.transaction
        if t is None or not t.streaming:
            return
        committed = [leg.destination for leg in t.streaming if leg.committing]
        if committed:
            logger.warning(
                "message %s: stopped awaiting the verdict of %s after the end of data: it may "
                "be delivered, and its client may send it again (duplicate possible)",
                self.message_id, ", ".join(committed),
            )
        else:
            logger.warning("message %s: stopped during its data; not delivered",
                           self.message_id)
        self.log_message(reply, "end-of-data" if committed else "data", self.received_bytes,
                         acct.SHUTDOWN)

    def log_refused(
        self, address: str, reply: Reply, reason: str, destination: str = "-", route: str = ""
    ) -> Reply:
        """A recipient refused at RCPT; returns `reply`."""
        self.ctx.metrics.recipient_refused(reason)
        emit = self.emit
        if self.events_on:
            t = self.transaction
            emit(
                "refused", self.id, self.message_id, self.client_ip, self.helo,
                t.envelope.mail_from if t is not None else "", (address,), destination, route,
                0, reply.code, reply.line(), "rcpt", 0.0, self.node, reason,
                acct.tls_field(self.tls) if self.tls else "", wall_time(),
            )
        return reply

    def log_connection(self, code: int, text: str, reason: str, stage: str) -> None:
        """Moxy ends the session (once, whatever else then fails)."""
        if self.ended_by is None:
            self.ended_by = reason
            self.ctx.metrics.connection_refused(reason)
            if self.events_on:
                self.emit(*acct.connection_event(
                    self.client_ip, code, text, reason, self.node,
                    session_id=self.id, helo=self.helo, stage=stage,
                    tls=acct.tls_field(self.tls) if self.tls else "",
                ))
