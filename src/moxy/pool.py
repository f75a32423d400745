"""Idle upstream connections kept between client sessions (`limits.idle_upstreams`), per
destination, closed with QUIT once idle for `timeouts.upstream_idle`.
"""

from __future__ import annotations

from collections import deque

import trio

from moxy.connection import RECEIVE_SIZE, Connection
from moxy.lookup.base import Destination
from moxy.stream import StreamBroken


class ConnectionPool:
    """Idle upstream connections kept between client sessions, like Postfix's connection cache:
    the next session's leg to that destination skips connect, greeting and EHLO.

    Only connections in a clean state (no transaction open upstream) come back here. One the
    destination spoke on, closed or reset while it was idle is not taken again
    (`spoke_while_idle`); one that goes away later is noticed at its first command, and the
    leg then connects afresh (the transaction is replayed, nothing is lost)."""

    def __init__(self, per_destination: int, idle_time: float) -> None:
        self.per_destination = per_destination
        self.idle_time = idle_time
        self._idle: dict[Destination, deque[tuple[float, Connection]]] = {}
        self._expired: list[Connection] = []
        self._reaper: trio.CancelScope | None = None  # run()'s sleep, cancelled to QUIT now

    def take(self, destination: Destination) -> Connection | None:
        idle = self._idle.get(destination)
        now = trio.current_time()
        while idle:
            since, conn = idle.pop()  # the most recently used first: the likeliest alive
            if now - since < self.idle_time and not spoke_while_idle(conn):
                return conn
            self._expire(conn)
            self._wake_reaper()  # its QUIT goes now, not at the reaper's next round
        return None

    def _expire(self, conn: Connection) -> None:
        """`conn` has been idle too long: it gets QUIT from `run`, and its place under the
        destination's concurrency cap is free at once. Held until its QUIT, a burst after a
        quiet spell found every place held by expired connections, waited, and heard 451
        4.4.5."""
        if conn.slot is not None:
            conn.slot.release()
        self._expired.append(conn)

    def _wake_reaper(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None

    def give(self, conn: Connection) -> bool:
        """Keep `conn` for later; False when the pool for its destination is full, or a leg
        waits for its place under the destination's concurrency cap."""
        idle = self._idle.get(conn.destination)
        if idle is None:
            idle = self._idle[conn.destination] = deque()
        elif len(idle) >= self.per_destination:
            return False
        if conn.parser.buffered or conn.xclient:
            return False
        slot = conn.slot
        if slot is not None and slot.owner.wanted(slot.address):
            # A leg waits for this connection's place under the destination's cap: kept, it
            # would hold that place idle while the leg waits (and at the end of its wait
            # hears 451 4.4.5). Closed by the caller, it frees the place at once.
            return False
        idle.append((trio.current_time(), conn))
        return True

    def oldest(self) -> Connection | None:
        """Take the connection to close first when the process is at
        `limits.upstream_connections`: one already expired (awaiting its QUIT), else the one
        idle longest, of any destination. None when nothing is idle."""
        if self._expired:
            return self._expired.pop()
        first: deque[tuple[float, Connection]] | None = None
        key: Destination | None = None
        for destination, idle in self._idle.items():
            if idle and (first is None or idle[0][0] < first[0][0]):
                first, key = idle, destination
        if first is None or key is None:
            return None
        conn = first.popleft()[1]
        if not first:
            del self._idle[key]
        return conn

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def run(self) -> None:
        """Close connections idle for `idle_time` (with QUIT) until cancelled, then all."""
        try:
            while True:
                pause = min(max(self.idle_time / 2, 0.05), 5.0)
                with trio.CancelScope(deadline=trio.current_time() + pause) as self._reaper:
                    await trio.sleep_forever()
                self._reaper = None
                now = trio.current_time()
                for destination, idle in list(self._idle.items()):
                    while idle and now - idle[0][0] >= self.idle_time:
                        self._expire(idle.popleft()[1])
                    if not idle:
                        del self._idle[destination]
                expired, self._expired = self._expired, []
                for conn in expired:
                    await conn.quit(min(self.idle_time, 5.0))
        finally:
            with trio.CancelScope(shield=True):
                for idle in self._idle.values():
                    for _, conn in idle:
                        await conn.close()
                for conn in self._expired:
                    await conn.close()
                self._idle.clear()
                self._expired.clear()


def spoke_while_idle(conn: Connection) -> bool:
    """Did the destination say anything while `conn` was idle? A "421" before closing, a
    close, or a reply out of step (a second verdict): each would be taken for the answer to
    the next command sent on it (a late "550" as the next sender's MAIL reply). One read that
    finds nothing."""
    try:
        return conn.stream.unasked(RECEIVE_SIZE) is not None
    except StreamBroken:
        return True
