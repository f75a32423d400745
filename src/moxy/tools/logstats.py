"""What moxylogalyze counts: the filters, the summary, the totals per sender, client IP or
destination, and the messages joined with their legs (`-v`).

The counting rules (docs/tools.md repeats them):
- delivered bytes are the sizes of "leg" lines with a 2xx code (each copy a
  destination accepted, so a mirrored message counts once per copy);
- messages and recipients per sender or client IP come from "message" lines (what the
  client was told); per destination they are those of delivered legs;
- refusals come from "refused" lines, dropped connections from "connection" lines.
Memory grows with the number of groups (and distinct values), never with the number of lines.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterator

import attrs

from moxy.accounting.events import DeliveryEvent

LISTBY = ("from", "ip", "dest")
NO_DESTINATION = "-"  # the group of refusals that name no destination
MAX_PENDING = 100_000  # legs waiting for their message line (-v) before they count as orphans
MAX_LEGS = 1000  # legs kept for one message (-v); a message has one per destination group

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def accepted(event: DeliveryEvent) -> bool:
    return 200 <= event.code < 300


def sender_key(address: str) -> str:
    """How a sender is grouped and matched: case-folded, the null sender as `<>`."""
    return address.lower() if address else "<>"


def route_destinations(route: str) -> set[str]:
    """Every destination named by a route field: groups separated by spaces, `|` failover."""
    return {d.lower() for group in route.split() for d in group.split("|") if d}


@attrs.frozen
class Filters:
    """The command line's filters; a line must pass all of them. Bounds are in epoch seconds,
    `since` inclusive, `until` exclusive."""

    sender: str | None = None  # a sender_key()
    network: IPNetwork | None = None
    dest: str | None = None  # lower-case host:port
    since: float | None = None
    until: float | None = None

    def matches(self, e: DeliveryEvent) -> bool:
        if self.since is not None and e.time < self.since:
            return False
        if self.until is not None and e.time >= self.until:
            return False
        if self.sender is not None and (e.kind == "connection" or (
            sender_key(e.mail_from) != self.sender
        )):
            return False
        if self.network is not None and not _in_network(e.client_ip, self.network):
            return False
        return self.dest is None or self.concerns_dest(e)

    def concerns_dest(self, e: DeliveryEvent) -> bool:
        """A leg concerns the destination that answered it; a message or a refusal also
        concerns every destination of its route."""
        if e.kind == "connection":
            return False
        if e.destination.lower() == self.dest:
            return True
        return e.kind != "leg" and self.dest in route_destinations(e.route)


def _in_network(address: str, network: IPNetwork) -> bool:
    try:
        return ipaddress.ip_address(address) in network
    except ValueError:
        return False


# --- totals per group ------------------------------------------------------------------------


@attrs.define
class GroupTotals:
    messages: int = 0
    bytes: int = 0
    recipients: int = 0
    refused: int = 0
    failed: int = 0  # per sender/IP: messages the client was refused; per dest: failed legs


class Listing:
    """Totals per sender (`from`), client IP (`ip`) or destination (`dest`)."""

    def __init__(self, by: str) -> None:
        self.by = by
        self.groups: dict[str, GroupTotals] = {}
        self._key: Callable[[DeliveryEvent], str] = {
            "from": lambda e: sender_key(e.mail_from),
            "ip": lambda e: e.client_ip,
            "dest": lambda e: e.destination.lower(),
        }[by]

    def _group(self, key: str) -> GroupTotals:
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = GroupTotals()
        return group

    def add(self, e: DeliveryEvent) -> None:
        if e.kind == "connection":
            return  # no sender, no destination: the summary counts them
        if e.kind == "message":
            if self.by != "dest":
                group = self._group(self._key(e))
                if accepted(e):
                    group.messages += 1
                    group.recipients += len(e.recipients)
                else:
                    group.failed += 1
        elif e.kind == "leg":
            group = self._group(self._key(e))
            if accepted(e):
                group.bytes += e.size
                if self.by == "dest":
                    group.messages += 1
                    group.recipients += len(e.recipients)
            elif self.by == "dest":
                group.failed += 1
        elif e.kind == "refused":
            key = self._key(e) if self.by != "dest" else e.destination.lower() or NO_DESTINATION
            self._group(key).refused += 1

    def rows(self) -> list[tuple[str, GroupTotals]]:
        """Most bytes first; ties by messages, then by name."""
        return sorted(
            self.groups.items(), key=lambda item: (-item[1].bytes, -item[1].messages, item[0])
        )


# --- the summary -----------------------------------------------------------------------------


@attrs.define
class Summary:
    first: float | None = None
    last: float | None = None
    messages_accepted: int = 0  # "message" lines the client was answered 2xx
    messages_deferred: int = 0  # ... 4xx
    messages_rejected: int = 0  # ... 5xx (or anything else)
    bytes_received: int = 0  # from clients, in accepted messages
    bytes_delivered: int = 0  # to destinations, in accepted legs
    legs_delivered: int = 0
    legs_failed: int = 0
    recipients_accepted: int = 0  # on accepted "message" lines
    refused: Counter[str] = attrs.Factory(Counter)  # by reason
    connections: Counter[str] = attrs.Factory(Counter)  # dropped or refused, by reason
    senders: set[str] = attrs.Factory(set)
    clients: set[str] = attrs.Factory(set)
    destinations: set[str] = attrs.Factory(set)

    def add(self, e: DeliveryEvent) -> None:
        self.first = e.time if self.first is None else min(self.first, e.time)
        self.last = e.time if self.last is None else max(self.last, e.time)
        if e.client_ip:
            self.clients.add(e.client_ip)
        if e.kind == "connection":
            self.connections[e.reason or "-"] += 1
            return
        self.senders.add(sender_key(e.mail_from))
        if e.kind == "message":
            if accepted(e):
                self.messages_accepted += 1
                self.bytes_received += e.size
                self.recipients_accepted += len(e.recipients)
            elif 400 <= e.code < 500:
                self.messages_deferred += 1
            else:
                self.messages_rejected += 1
        elif e.kind == "leg":
            self.destinations.add(e.destination.lower())
            if accepted(e):
                self.legs_delivered += 1
                self.bytes_delivered += e.size
            else:
                self.legs_failed += 1
        elif e.kind == "refused":
            self.refused[e.reason or "-"] += 1


# --- messages with their legs (-v) -----------------------------------------------------------


@attrs.frozen
class JoinedMessage:
    """A "message" line with the legs logged before it; `message` is None for legs whose
    message line is not in the files read (a log cut at rotation)."""

    message: DeliveryEvent | None
    legs: tuple[DeliveryEvent, ...]


class MessageJoiner:
    """Pairs leg lines with the message line that follows them (same node, session and id)
    and yields the pairs that pass the filters, in the order their message lines come."""

    def __init__(self, filters: Filters) -> None:
        self.filters = filters
        self._pending: dict[tuple[str, str, str], list[DeliveryEvent]] = {}
        self._held = 0  # legs in _pending
        # Legs beyond MAX_LEGS for one message: counted, not kept (a log that repeats one id
        # would otherwise hold all of them), and the first such message, for the report.
        self.dropped = 0
        self.first_dropped: tuple[str, str, str] = ("", "", "")

    def add(self, e: DeliveryEvent) -> Iterator[JoinedMessage]:
        key = (e.node, e.session_id, e.message_id)
        if e.kind == "leg":
            legs = self._pending.setdefault(key, [])
            if len(legs) >= MAX_LEGS:
                if not self.dropped:
                    self.first_dropped = key
                self.dropped += 1
                return
            legs.append(e)
            self._held += 1
            while self._held > MAX_PENDING:  # bounded, even for a log of legs alone
                oldest = next(iter(self._pending))
                yield from self._orphans([self._pop(oldest)])
        elif e.kind == "message":
            joined = JoinedMessage(e, tuple(self._pop(key)))
            if self.filters.matches(e):
                yield joined

    def _pop(self, key: tuple[str, str, str]) -> list[DeliveryEvent]:
        legs = self._pending.pop(key, [])
        self._held -= len(legs)
        return legs

    def finish(self) -> Iterator[JoinedMessage]:
        rest, self._pending, self._held = list(self._pending.values()), {}, 0
        yield from self._orphans(rest)

    def _orphans(self, groups: list[list[DeliveryEvent]]) -> Iterator[JoinedMessage]:
        for legs in groups:
            if any(self.filters.matches(leg) for leg in legs):
                yield JoinedMessage(None, tuple(legs))
