"""Limits per client address: simultaneous connections, new connections per minute, messages
per minute. One client (an IPv6 client: its /64, which one host usually has whole) must not
take the places that `limits.connections` keeps for everyone.

Counts live in one process: with `[server] workers` each worker keeps its own, so a client may
get up to N times a limit across N workers (docs/security.md).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
import math
import time
from collections.abc import Callable

# `reason` of the "connection" events and keys of `ClientLimiter.refused`.
from moxy.accounting.events import CONNECTION_RATE, CONNECTIONS_PER_IP, MESSAGE_RATE
from moxy.config import Limits
from moxy.logsetup import plural
from moxy.relay import client_address

IPV6_PREFIX = 64
_PRUNE_EVERY = 4096  # new buckets between two sweeps of the idle ones
_LOG_INTERVAL = 10.0  # seconds between two lines about refused messages

logger = logging.getLogger("moxy.server")


@functools.lru_cache(maxsize=4096)
def client_key(ip: str) -> str:
    """What a limit counts: the IPv4 address, or the /64 of an IPv6 address. Cached: it is
    asked at every connection and every MAIL, and parsing an address is not cheap."""
    address = client_address(ip)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address) if address is not None else ip


class RateLimit:
    """At most `per_minute` events per key in any minute on average, with bursts up to that
    many (a token bucket refilled continuously). Memory: one bucket per key seen in the last
    minute; full buckets are dropped in sweeps."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._new = 0

    def allow(self, key: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = self._clock()
        tokens, when = self._buckets.get(key, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - when) * self.per_minute / 60.0)
        if key not in self._buckets:
            self._new += 1
            if self._new >= _PRUNE_EVERY:
                self._prune(now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        self._new = 0
        full = [k for k, (tokens, when) in self._buckets.items()
                if tokens + (now - when) * self.per_minute / 60.0 >= self.per_minute]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class ClientLimiter:
    """The per-client limits of one server process; kept across configuration reloads (the
    counts stay, `configure` changes the numbers)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[str, int] = {}  # key -> connections open now
        self.refused: collections.Counter[str] = collections.Counter()
        self.per_ip = limits.connections_per_ip
        self._message_refusals = 0
        self._message_logged = -math.inf
        self.connection_rate = RateLimit(limits.connections_per_ip_rate, clock)
        self.message_rate = RateLimit(limits.messages_per_ip_rate, clock)

    def configure(self, limits: Limits) -> None:
        """New numbers (a reload); the buckets stay, so a reload gives no client a new burst."""
        self.per_ip = limits.connections_per_ip
        self.connection_rate.per_minute = limits.connections_per_ip_rate
        self.message_rate.per_minute = limits.messages_per_ip_rate

    def admit(self, ip: str) -> str | None:
        """Count a new connection from `ip`; or say which limit refuses it (it is then not
        counted). An admitted connection must be `release`d when it ends."""
        key = client_key(ip)
        reason = None
        rate = self.connection_rate
        if self.per_ip and self._open.get(key, 0) >= self.per_ip:
            reason = CONNECTIONS_PER_IP
        elif rate.per_minute > 0 and not rate.allow(key):  # no call with the limit off
            reason = CONNECTION_RATE
        if reason is not None:
            self.refused[reason] += 1
            return reason
        self._open[key] = self._open.get(key, 0) + 1
        return None

    def release(self, ip: str) -> None:
        key = client_key(ip)
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    def allow_message(self, ip: str) -> bool:
        """A new transaction (MAIL) from `ip`: False when over `messages_per_ip_rate`."""
        if self.message_rate.per_minute <= 0 or self.message_rate.allow(client_key(ip)):
            return True
        self.refused[MESSAGE_RATE] += 1
        # Logged at most every 10 s with the count, as the refused connections are: a client
        # over its rate would otherwise write a line per MAIL.
        self._message_refusals += 1
        now = self._clock()
        if now - self._message_logged >= _LOG_INTERVAL:
            logger.warning("per-client limit: closed %s over limits.messages_per_ip_rate "
                           "(latest from %s)", plural(self._message_refusals, "session"), ip)
            self._message_refusals = 0
            self._message_logged = now
        return False

    def open_connections(self, ip: str) -> int:
        return self._open.get(client_key(ip), 0)
