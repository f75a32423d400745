"""The Redis counters' key schema and what one `DeliveryEvent` adds to them.

Shared by the Redis sink (which writes) and `moxystats` (which reads); no client library here.
The schema is documented in docs/accounting.md ("Redis counters").
"""

from __future__ import annotations

import calendar
import functools
import time
from collections.abc import Sequence
from typing import Any

from moxy.accounting.events import DeliveryEvent
from moxy.lookup.idn import ascii_domain

DIMENSIONS = ("dest", "rcpt", "domain", "sender", "ip", "node")
METRICS = ("msgs", "bytes", "refused")
TOTAL = "total"
NO_SENDER = "<>"  # the null reverse-path of bounces
NO_NODE = "-"


# (dimension, member, metric, amount): add `amount` to `member`'s score in the sorted set of
# (`dimension`, `metric`). Plain tuples: a dozen are made per delivered copy.
Increment = tuple[str, str, str, int]


def day_period(when: float) -> str:
    return time.strftime("d:%Y-%m-%d", time.gmtime(when))


def minute_period(when: float) -> str:
    return time.strftime("m:%Y-%m-%dT%H:%M", time.gmtime(when))


def counter_key(prefix: str, period: str, dimension: str, metric: str) -> str:
    """`{prefix}{period}:{dimension}:{metric}`, e.g. `moxy:acct:d:2026-12-01:dest:bytes`."""
    return f"{prefix}{period}:{dimension}:{metric}"


def day_start(day: str) -> int:
    """Unix time of 00:00 UTC on `day` ("YYYY-MM-DD"); ValueError if it is not a date."""
    return calendar.timegm(time.strptime(day, "%Y-%m-%d"))


@functools.lru_cache(maxsize=1024)
def bucket_expiry(
    period: str, *, retention_days: int, minute_retention: int
) -> int | None:
    """When a bucket key expires (Unix time), counted from the end of its day or minute so that
    every node sets the same EXPIREAT; None for the totals, which are kept for good."""
    if period.startswith("d:"):
        return day_start(period[2:]) + (1 + retention_days) * 86400
    if period.startswith("m:"):
        start = calendar.timegm(time.strptime(period[2:], "%Y-%m-%dT%H:%M"))
        return start + 60 * (1 + minute_retention)
    return None


def domain_of(address: str) -> str | None:
    """The domain of an address, lower case, an internationalized one as A-labels (as route
    keys hold it, so both spellings are one member); None for one without '@' (postmaster)."""
    local, at, domain = address.rpartition("@")
    if not (at and local):
        return None
    domain = domain.lower()
    return domain if domain.isascii() else ascii_domain(domain) or domain


def normal_address(address: str) -> str:
    """Local part as given (it may be case sensitive), domain in lower case."""
    domain = domain_of(address)
    return f"{address.rpartition('@')[0]}@{domain}" if domain is not None else address


# What a delivery event counts, as `counted` takes it: the outcome, then the fields that
# decide the members. Events with equal tallies add to the same counters (the Redis sink sums
# them per tally and minute, and spreads each sum once per flush).
DELIVERED = "delivered"  # a leg the destination accepted: msgs and bytes
LEG_REFUSED = "leg-refused"  # a leg that failed: one refused copy
RCPT_REFUSED = "rcpt-refused"  # a "refused" event: one refused recipient each
Tally = tuple[str, str, tuple[str, ...], str, str, str]  # outcome, dest, rcpts, from, ip, node


def tally(event: DeliveryEvent) -> Tally | None:
    """What `event` counts for, or None ("message" and "connection" events count nothing)."""
    kind = event.kind
    if kind == "leg":
        outcome = DELIVERED if 200 <= event.code < 300 else LEG_REFUSED
    elif kind == "refused":
        outcome = RCPT_REFUSED
    else:
        return None
    return (outcome, event.destination, event.recipients, event.mail_from, event.client_ip,
            event.node)


def sum_known(batch: Sequence[DeliveryEvent], sums: dict[Any, list[int]], start: int) -> int:
    """The Redis sink's loop (moxy.accounting.redis): from `batch[start]` on, each event whose
    sum exists already in `sums` (keyed by the event's minute and `tally`) adds its message and
    bytes to it; events that count nothing are passed over. Returns the index of the first event
    that needs a new sum, or len(batch). The native build runs `_speedups.sum_known` instead,
    which does the same and may also stop at an event it leaves to Python (a field of an
    unexpected type)."""
    for i in range(start, len(batch)):
        event = batch[i]
        kind = event[0]
        if kind == "leg":
            outcome = DELIVERED if 200 <= event[10] < 300 else LEG_REFUSED
        elif kind == "refused":
            outcome = RCPT_REFUSED
        else:
            continue
        # (minute, *tally(event)): time, then destination, recipients, from, client, node.
        entry = sums.get((int(event[17] // 60), outcome, event[7], event[6], event[5],
                          event[3], event[14]))
        if entry is None:
            return i
        entry[0] += 1
        entry[1] += event[9]
    return len(batch)


def counted(what: Tally) -> list[tuple[str, str, str]]:
    """The (dimension, member, metric) triples one event of `what` adds to: `msgs` and `bytes`
    add one and the event's size, `refused` one. A triple may repeat (a "refused" event with
    several recipients refuses each, and its sender as often).

    - A delivered leg (2xx) is one copy: its destination, sender, client IP and node each get
      one message and the leg's bytes; so does each distinct recipient address on it and each
      distinct recipient domain (a domain once per leg, however many of its recipients the leg
      carried).
    - A failed leg is one refused copy: one `refused` for the same members.
    - A "refused" event refuses each of its recipients: one `refused` per recipient for the
      address, its domain, the sender, client IP and node, and the destination when it names one.
    """
    outcome, destination, recipients, mail_from, client_ip, node = what
    origin = [
        ("sender", normal_address(mail_from) if mail_from else NO_SENDER),
        ("ip", client_ip),
        ("node", node or NO_NODE),
    ]
    if outcome == RCPT_REFUSED:
        out = []
        for recipient in recipients:
            address = normal_address(recipient)
            domain = domain_of(address)
            members = [("rcpt", address), *origin]
            if domain is not None:
                members.append(("domain", domain))
            if destination not in ("", "-"):
                members.append(("dest", destination))
            out += [(dimension, member, "refused") for dimension, member in members]
        return out
    addresses = list(dict.fromkeys(normal_address(r) for r in recipients))
    domains = list(dict.fromkeys(d for d in map(domain_of, addresses) if d is not None))
    members = [
        ("dest", destination),
        *(("rcpt", r) for r in addresses),
        *(("domain", d) for d in domains),
        *origin,
    ]
    if outcome == DELIVERED:
        return [(dimension, member, metric) for dimension, member in members
                for metric in ("msgs", "bytes")]
    return [(dimension, member, "refused") for dimension, member in members]


def increments(event: DeliveryEvent) -> list[Increment]:
    """What `event` adds to the counters (the same for every period): see `counted`."""
    what = tally(event)
    if what is None:
        return []
    return [(dimension, member, metric, event.size if metric == "bytes" else 1)
            for dimension, member, metric in counted(what)]
