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

import functools
import json
import operator
import time as _time
from collections.abc import Callable, Iterable
from typing import Any, Final, NamedTuple, TypeAlias

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
SHUTDOWN = "shutdown"  # a message the server's shutdown stopped (message events)


def tls_field(tls: str) -> str:
    """"TLSv1.3:TLS_AES_256_GCM_SHA384" (no spaces, one log field), "-" without TLS."""
    if not tls:
        return "-"
    version, _, rest = tls.partition(" with cipher ")
    return f"{version}:{rest.split(' ', 1)[0]}" if rest else version


# The last second format_time wrote, and its text: events come in time order, so most of
# them reuse it (strftime and gmtime once a second, not once per event).
_last_second = -1
_last_stamp = ""
_MILLIS = [f".{n:03d}Z" for n in range(1000)]


def format_time(when: float) -> str:
    """UTC with milliseconds, as both log formats write it: 2026-11-25T22:40:18.105Z."""
    global _last_second, _last_stamp
    second = int(when)
    if second != _last_second or when < 0:
        _last_stamp = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(when))
        _last_second = second
    return _last_stamp + _MILLIS[int(when * 1000) % 1000]


class _Fields(NamedTuple):
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
    node: str  # `[server] node`: which Moxy of a cluster saw it
    reason: str  # why, for "refused" and "connection" events
    tls: str  # as tls_field writes it, "" without: a leg's to its destination, else the client's
    time: float  # Unix time it happened


class DeliveryEvent(_Fields):
    """One event, immutable. A named tuple rather than an attrs class because a session makes
    two per message: `DeliveryEvent.make` (one tuple, no per-field work) is what the hot path
    uses; the keyword form below (defaults for node, reason, tls, and `time` now) is for
    everyone else."""

    __slots__ = ()

    def __new__(
        cls, kind: str, session_id: str, message_id: str, client_ip: str, helo: str,
        mail_from: str, recipients: tuple[str, ...], destination: str, route: str, size: int,
        code: int, reply: str, stage: str, duration: float, node: str = "", reason: str = "",
        tls: str = "", time: float | None = None,
    ) -> DeliveryEvent:
        return tuple.__new__(cls, (
            kind, session_id, message_id, client_ip, helo, mail_from, recipients, destination,
            route, size, code, reply, stage, duration, node, reason, tls,
            _time.time() if time is None else time,
        ))

    @classmethod
    def make(cls, fields: Iterable[Any]) -> DeliveryEvent:
        """All 18 fields in order (`time` included): no defaults, no checks, no copying."""
        return tuple.__new__(cls, fields)

    @property
    def delivered(self) -> bool:
        """A copy the destination accepted: what bandwidth counters count."""
        return self.kind == "leg" and 200 <= self.code < 300

    def to_log_line(self) -> str:
        return log_line(self)

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


def log_line(event: DeliveryEvent) -> str:
    """The text form of one event, without the line break."""
    return log_lines((event,))[:-1]


def log_lines(batch: Iterable[DeliveryEvent]) -> str:
    """Text lines of a batch, each ending in a line break: what the file sink writes.

    The hot part of the message log, so it does per event only what differs from the event
    before. A message's leg and message events (and a session's messages) share the fields
    from `node` to `from`; a message's events share its clock readings and, on one leg, the
    reply too. So the part from `node` to `to=` is formatted again only when one of its fields
    is another object than before; likewise the part from `code` to `reply`, the recipients and
    the time (the date and time to the second are formatted once per second)."""
    global _last_second, _last_stamp
    out: list[str] = []
    append = out.append
    second, stamp = _last_second, _last_stamp
    millis = _MILLIS
    who: tuple[str, str, str, str, str, str] | None = None
    origin = ""
    how: tuple[int, str, str, str, float, str] | None = None
    outcome = ""
    listed: tuple[str, ...] | None = None
    to = ""
    then: float | None = None
    moment = ""
    for (kind, session_id, message_id, client_ip, helo, mail_from, recipients, destination,
         route, size, code, reply, stage, duration, node, reason, tls, when) in batch:
        if int(when) != second or when < 0:
            second = int(when)
            stamp = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.gmtime(when))
            then = None
        if (who is None or session_id is not who[0] or message_id is not who[1]
                or mail_from is not who[2] or helo is not who[3] or client_ip is not who[4]
                or node is not who[5]):
            who = (session_id, message_id, mail_from, helo, client_ip, node)
            origin = (f" node={node or '-'} session={session_id} id={message_id or '-'}"
                      f" client={client_ip} helo={helo or '-'} from=<{mail_from}> to=")
        if (how is None or reply is not how[5] or duration is not how[4] or code != how[0]
                or stage is not how[1] or reason is not how[2] or tls is not how[3]):
            how = (code, stage, reason, tls, duration, reply)
            if "\n" in reply or '"' in reply:
                reply = reply.replace("\n", " ").replace('"', "'")
            outcome = (f" code={code} stage={stage} reason={reason or '-'}"
                       f" tls={tls_field(tls) if tls else '-'} duration={duration:.3f}"
                       f' reply="{reply}"\n')
        if recipients is not listed:
            listed = recipients
            if len(recipients) == 1:
                to = f"<{recipients[0]}>"
            else:
                to = ",".join([f"<{r}>" for r in recipients]) or "-"
        if when is not then:
            then = when
            moment = stamp + millis[int(when * 1000) % 1000]
        append(f"{moment} {kind}{origin}{to} dest={destination} route={route or '-'} size={size}"
               f"{outcome}")
    _last_second, _last_stamp = second, stamp
    return "".join(out)


def json_lines(batch: Iterable[DeliveryEvent]) -> str:
    return "".join([event.to_json() + "\n" for event in batch])


# What `emit` takes: an event's 18 fields in order as its arguments (sessions call it as
# `emit(kind, session_id, ...)`; a DeliveryEvent `e` goes as `emit(*e)`), or both events of a
# message that went to one leg, as the 22 fields of a LEG_AND_MESSAGE entry. With an
# accounting process they are packed at once (moxy.accounting.packing.Packer: no tuple made);
# with the sinks in the serving process they wait as a plain tuple (`Fields`), which the
# garbage collector stops tracking at its first look, for their batch. The dispatcher makes
# DeliveryEvents of them (`expand`).
Fields: TypeAlias = tuple[Any, ...]
Emit: TypeAlias = Callable[..., None]

# The commonest message, one leg that carried every recipient, as one tuple: the message's 18
# fields (the client's `tls`) with this kind, the leg's size, reply code and text in place of
# the message's, then the message's size, reply code and reply text, and the leg's `tls` (its
# connection to the destination). Half the objects to hand over (and to marshal to an
# accounting process) of its two events.
LEG_AND_MESSAGE: Final = "leg+message"

# A DeliveryEvent of 18 fields (or a copy of one), without DeliveryEvent.make's Python frame.
_make: Callable[[Fields], DeliveryEvent] = functools.partial(tuple.__new__, DeliveryEvent)


def expand_in_python(emitted: Iterable[Fields]) -> list[DeliveryEvent]:
    """The DeliveryEvents of what sessions emitted, in order: `expand`, and its reference."""
    events: list[DeliveryEvent] = []
    append = events.append
    for fields in emitted:
        if fields[0] != LEG_AND_MESSAGE:
            append(_make(fields))
            continue
        (_, session_id, message_id, client_ip, helo, mail_from, recipients, destination,
         route, sent, code, reply, stage, duration, node, reason, tls, when, size,
         message_code, message_reply, leg_tls) = fields
        append(_make(("leg", session_id, message_id, client_ip, helo, mail_from, recipients,
                      destination, route, sent, code, reply, stage, duration, node, reason,
                      leg_tls, when)))
        append(_make(("message", session_id, message_id, client_ip, helo, mail_from,
                      recipients, "-", route, size, message_code, message_reply,
                      "end-of-data", duration, node, "", tls, when)))
    return events


try:  # the native build's expand (C): the same list, a fraction of the cost
    from moxy.accounting import _speedups
except ImportError:  # pure Python
    expand = expand_in_python
else:
    def expand(emitted: Iterable[Fields]) -> list[DeliveryEvent]:
        """The DeliveryEvents of what sessions emitted, in order."""
        if type(emitted) is not list:  # C reads it once: a generator could not be read again
            return expand_in_python(emitted)
        events = _speedups.expand(emitted, DeliveryEvent, LEG_AND_MESSAGE)
        return expand_in_python(emitted) if events is None else events


_kind_of = operator.itemgetter(0)


def count_events(emitted: list[Fields]) -> int:
    """How many DeliveryEvents `expand` makes of `emitted`."""
    return len(emitted) + list(map(_kind_of, emitted)).count(LEG_AND_MESSAGE)


def discard(*event: Any) -> None:
    """What `Accounting.emit` is without sinks: a session seeing it builds no events at all."""


def connection_event(
    client_ip: str, code: int, reply: str, reason: str, node: str, *,
    session_id: str = "-", helo: str = "", stage: str = "connect", tls: str = "",
) -> DeliveryEvent:
    """A "connection" event: a client connection Moxy refused or ended (`reason`); `tls` as
    `tls_field` writes it, "" in clear text."""
    return DeliveryEvent(
        kind="connection", session_id=session_id, message_id="", client_ip=client_ip,
        helo=helo, mail_from="", recipients=(), destination="-", route="", size=0, code=code,
        reply=reply, stage=stage, duration=0.0, node=node, reason=reason, tls=tls,
    )
