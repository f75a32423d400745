"""The delivery events a session emits (moxy.accounting.events): one per leg and per message
at end-of-data, one per refused recipient, one when Moxy ends a connection itself. A mixin of
`Session`, which keeps the state they describe.
"""

from __future__ import annotations

import time

from moxy.accounting import events as acct
from moxy.accounting.events import DeliveryEvent
from moxy.context import ServerContext
from moxy.smtp.replies import Reply
from moxy.transaction import Transaction
from moxy.upstream import Leg


class SessionEvents:
    # The session's state the events describe (set by Session.__init__).
    ctx: ServerContext
    id: str
    client_ip: str
    helo: str
    tls: str
    message_id: str
    data_started: float
    transaction: Transaction | None
    ended_by: str | None

    def _event(self, kind: str, **fields: object) -> DeliveryEvent:
        t = self.transaction
        envelope = t.envelope if t is not None else None
        fields.setdefault("duration", time.monotonic() - self.data_started)
        return DeliveryEvent(
            kind=kind,
            session_id=self.id,
            message_id=self.message_id,
            client_ip=self.client_ip,
            helo=self.helo,
            mail_from=envelope.mail_from if envelope else "",
            node=self.ctx.config.server.node,
            tls=acct.tls_field(self.tls) if self.tls else "",
            **fields,  # type: ignore[arg-type]
        )

    def log_leg(self, leg: Leg, destination: str, outcome: Reply | Exception) -> None:
        if isinstance(outcome, Reply):
            code, text, stage = outcome.code, str(outcome), "end-of-data"
        else:
            code, text, stage = 0, str(outcome), getattr(outcome, "stage", "?")
        self.ctx.emit(self._event(
            "leg", recipients=tuple(leg.accepted), destination=destination,
            route=str(leg.group), size=leg.sent, code=code, reply=text, stage=stage,
        ))

    def log_message(self, reply: Reply, stage: str, size: int) -> None:
        self.ctx.metrics.message(reply.code)
        t = self.transaction
        self.ctx.emit(self._event(
            "message", recipients=tuple(t.recipients) if t else (), destination="-",
            route=" ".join(str(g) for g in t.legs) if t else "", size=size,
            code=reply.code, reply=str(reply), stage=stage,
        ))

    def log_refused(
        self, address: str, reply: Reply, reason: str, destination: str = "-", route: str = ""
    ) -> Reply:
        """A recipient refused at RCPT; returns `reply`."""
        self.ctx.metrics.recipient_refused(reason)
        self.ctx.emit(self._event(
            "refused", recipients=(address,), destination=destination, route=route, size=0,
            code=reply.code, reply=str(reply), stage="rcpt", reason=reason, duration=0.0,
        ))
        return reply

    def log_connection(self, code: int, text: str, reason: str, stage: str) -> None:
        """Moxy ends the session (once, whatever else then fails)."""
        if self.ended_by is None:
            self.ended_by = reason
            self.ctx.metrics.connection_refused(reason)
            self.ctx.emit(acct.connection_event(
                self.client_ip, code, text, reason, self.ctx.config.server.node,
                session_id=self.id, helo=self.helo, stage=stage,
            ))
