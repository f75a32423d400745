"""The one value object that every delivery produces: what the accounting sinks consume.

Kinds:
- "leg": one upstream leg of a message (one copy sent to one destination);
- "message": the message as the client saw it (the reply it got);
- "refused": one recipient refused at RCPT (relay denied, lookup failure, a destination's
  refusal or unavailability) — `reason` says which;
- "connection": a client connection refused or dropped by Moxy (connection limit, too many
  protocol errors, timeout) — `reason` says which.

Text logs, counters and statistics are all derived from these. `to_log_line` and `to_json`
are the two file formats; their field names are the same, and tools (moxylogalyze) read both.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs

KINDS = ("leg", "message", "refused", "connection")

# `reason` values of "refused" events.
RELAY_DENIED = "relay-denied"
LOOKUP_FAILED = "lookup-failed"
DESTINATION_REFUSED = "destination-refused"  # the destination answered 4xx/5xx
DESTINATION_UNAVAILABLE = "destination-unavailable"  # no destination could take it
POLICY = "policy"  # Moxy's own rule (split destinations, recipient limit, ...)
# `reason` values of "connection" events.
CONNECTION_LIMIT = "connection-limit"
PROTOCOL_ERRORS = "protocol-errors"
CLIENT_TIMEOUT = "timeout"
CONNECTIONS_PER_IP = "connections-per-ip"  # the per-client limits ([limits], clientlimits.py)
CONNECTION_RATE = "connection-rate-per-ip"
MESSAGE_RATE = "message-rate-per-ip"


def _fmt_list(values: tuple[str, ...]) -> str:
    return ",".join(f"<{v}>" for v in values) or "-"


def tls_field(tls: str) -> str:
    """"TLSv1.3:TLS_AES_256_GCM_SHA384" (no spaces, one log field), "-" without TLS."""
    if not tls:
        return "-"
    version, _, rest = tls.partition(" with cipher ")
    return f"{version}:{rest.split(' ', 1)[0]}" if rest else version


def format_time(when: float) -> str:
    """UTC with milliseconds, as both log formats write it: 2026-11-25T22:40:18.105Z."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    return f"{stamp}.{int(when * 1000) % 1000:03d}Z"


@attrs.frozen
class DeliveryEvent:
    kind: str  # one of KINDS
    session_id: str
    message_id: str  # the transaction id used in the Received header ("" outside one)
    client_ip: str
    helo: str
    mail_from: str
    recipients: tuple[str, ...]
    destination: str  # "host:port" of the leg that answered (kind "leg"); "-" otherwise
    route: str  # the destination group ("a|b"), or all groups for "message"
    size: int  # message bytes sent to this leg / received from the client
    code: int  # final reply code (upstream's for a leg, the client's otherwise)
    reply: str  # reply text, for the log
    stage: str  # where it ended: "end-of-data", "data", "rcpt", "body", "connect", ...
    duration: float  # seconds from DATA to the final reply
    node: str = ""  # `[server] node`: which Moxy of a cluster saw it
    reason: str = ""  # why, for "refused" and "connection" events
    tls: str = ""  # the client's TLS after STARTTLS, as tls_field writes it; "" without
    time: float = attrs.field(factory=time.time)

    @property
    def delivered(self) -> bool:
        """A copy the destination accepted: what bandwidth counters count."""
        return self.kind == "leg" and 200 <= self.code < 300

    def to_log_line(self) -> str:
        reply = self.reply.replace("\n", " ").replace('"', "'")
        return (
            f"{format_time(self.time)} {self.kind} node={self.node or '-'}"
            f" session={self.session_id} id={self.message_id or '-'}"
            f" client={self.client_ip} helo={self.helo or '-'} from=<{self.mail_from}>"
            f" to={_fmt_list(self.recipients)} dest={self.destination} route={self.route or '-'}"
            f" size={self.size} code={self.code} stage={self.stage}"
            f" reason={self.reason or '-'} tls={tls_field(self.tls)}"
            f" duration={self.duration:.3f} reply=\"{reply}\""
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-lines record: the text line's field names, `to` as a list."""
        return {
            "time": format_time(self.time),
            "kind": self.kind,
            "node": self.node,
            "session": self.session_id,
            "id": self.message_id,
            "client": self.client_ip,
            "helo": self.helo,
            "from": self.mail_from,
            "to": list(self.recipients),
            "dest": self.destination,
            "route": self.route,
            "size": self.size,
            "code": self.code,
            "stage": self.stage,
            "reason": self.reason,
            "tls": tls_field(self.tls) if self.tls else "",
            "duration": round(self.duration, 3),
            "reply": self.reply,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))


def connection_event(
    client_ip: str, code: int, reply: str, reason: str, node: str, *,
    session_id: str = "-", helo: str = "", stage: str = "connect",
) -> DeliveryEvent:
    """A "connection" event: a client connection Moxy refused or ended (`reason`)."""
    return DeliveryEvent(
        kind="connection", session_id=session_id, message_id="", client_ip=client_ip,
        helo=helo, mail_from="", recipients=(), destination="-", route="", size=0, code=code,
        reply=reply, stage=stage, duration=0.0, node=node, reason=reason,
    )
