"""What one server process knows about its destination addresses, shared by all its sessions:
which are down (dead-destination memory, like Postfix's dead-host cache) and how many
connections each has (per-destination concurrency), so a dark server costs one sender a
timeout, not every sender, and never more than its cap of Moxy's connections.

An address is an IP and port after resolution (`Destination` with an IP literal as host). A leg
asks `admit()` before connecting and holds the returned `Slot` for as long as the connection
lives; the slot carries the attempt's verdict back (`Slot.done`).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import resource
import socket
import time

import attrs
import trio

from moxy.config import DestinationSettings
from moxy.logsetup import Throttle
from moxy.lookup.base import Destination
from moxy.metrics import Metrics

logger = logging.getLogger("moxy.destinations")

MAX_DOUBLINGS = 30  # 2**30 times any down_time is past any sensible down_time_max


class Unavailable(Exception):
    """No attempt on this address now. `stage` is "down" (it failed recently and its time is
    not up, or another attempt is already finding out) or "busy" (no free slot in time)."""

    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(f"{stage}: {detail}")
        self.stage = stage
        self.detail = detail


@attrs.define
class _Down:
    failures: int
    since: float  # wall clock, for people
    until: float  # trio clock: no attempt before this
    reason: str
    probing: bool = False  # the one attempt let through after `until` is under way


@attrs.frozen
class DownEntry:
    """One address of the dead set, as `moxy destinations list` shows it."""

    address: str
    failures: int
    since: float  # seconds since the epoch
    retry_in: float  # seconds until an attempt is let through (0: at the next leg)
    probing: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


class Slot:
    """One connection's place under its address's concurrency cap; `release()` (idempotent)
    gives it back. A slot that is the recovery attempt (`probe`) reports its verdict with
    `done()`; released without one, the next leg may try instead."""

    def __init__(self, owner: Destinations, address: Destination, probe: bool) -> None:
        self.owner = owner
        self.address = address
        self.probe = probe
        self._semaphore: trio.Semaphore | None = None
        self._settled = False

    def done(self, failure: str | None) -> None:
        """The attempt greeted (`failure` None) or failed at connect/greeting (the reason)."""
        if self._settled:
            return
        self._settled = True
        if failure is None:
            self.owner.mark_up(self.address)
        else:
            self.owner.mark_down(self.address, failure, probe=self.probe)

    def release(self) -> None:
        if not self._settled:
            self._settled = True
            if self.probe:
                self.owner.abandon(self.address)
        semaphore, self._semaphore = self._semaphore, None
        if semaphore is not None:
            semaphore.release()
            self.owner.forget_idle(self.address, semaphore)


# Descriptors left to everything but client and upstream connections (listeners, the message
# log, the routes' and sinks' clients, the control socket) when `limits.upstream_connections`
# is derived from the open-file limit.
FD_RESERVE = 128


def connection_cap(configured: int, clients: int) -> int:
    """Upstream connections one process may have open: `limits.upstream_connections`, or (0)
    what the open-file limit leaves once `clients` client connections and FD_RESERVE have
    theirs, and at least half the limit; 0 (no cap) when the limit is infinite."""
    if configured:
        return configured
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(soft - clients - FD_RESERVE, soft // 2)


def raise_open_file_limit(configured: int, clients: int) -> None:
    """At `moxy serve`'s start (workers inherit it): the open-file limit raised to its hard
    limit, as nginx's `worker_rlimit_nofile` and Go's runtime do (a shell's soft 1024 under a
    hard limit of a million left clients refused for want of descriptors); a warning when even
    that leaves client connections and their upstream ones too little room."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # a hard limit the kernel's nr_open caps: keep the soft
            pass
    if configured or soft == resource.RLIM_INFINITY:
        return
    if soft - clients - FD_RESERVE < soft // 2:
        logger.warning(
            "the open-file limit (%d) is low for limits.connections = %d: each client "
            "connection may need an upstream one too; upstream connections are capped at %d, "
            "and clients may be refused for want of descriptors (raise LimitNOFILE or "
            "ulimit -n to about %d, or set limits.upstream_connections)",
            soft, clients, soft // 2, 2 * clients + FD_RESERVE,
        )


class Destinations:
    def __init__(
        self, settings: DestinationSettings | None = None, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings or DestinationSettings()
        self.metrics = metrics or Metrics()
        self._down: dict[Destination, _Down] = {}
        self._slots: dict[Destination, trio.Semaphore] = {}
        self._waiting: dict[Destination, int] = {}  # legs waiting for a place, per address
        self._caps = {o.destination: o.concurrency for o in self.settings.override}
        # Upstream connections open in this process (counted by moxy.connection's
        # _connect_address from before each connect until the connection closes), and how
        # many `limits.upstream_connections` allows (set by ServerContext.build).
        self.connections = 0
        self.connection_cap = 0  # 0: no cap
        self._at_cap = Throttle()  # legs refused at the cap, said every 10 s

    def at_connection_cap(self) -> None:
        """A leg found the process at `limits.upstream_connections` with nothing idle to close
        (it gets 451 4.3.0): counted, and said at most every 10 seconds."""
        self.metrics.destination_skipped("limit")
        if refused := self._at_cap.due():
            logger.warning(
                "upstream connections: %d open, as many as limits.upstream_connections allows, "
                "none idle: %d leg(s) refused with 451 4.3.0 since this was last said",
                self.connections, refused,
            )

    # -- admission --------------------------------------------------------------------------

    def cap(self, address: Destination, named: Destination | None = None) -> int:
        """The concurrency cap of `address`: an override for it, else one for the destination
        as the route `named` it, else `concurrency` (0: none)."""
        if not self._caps:  # no overrides (the usual case): no lookups
            return self.settings.concurrency
        if address in self._caps:
            return self._caps[address]
        if named is not None and named in self._caps:
            return self._caps[named]
        return self.settings.concurrency

    async def admit(self, address: Destination, named: Destination | None = None) -> Slot:
        """A slot for one connection attempt to `address`, or `Unavailable` at once if it is
        down, or after `concurrency_wait` if it stays at its cap."""
        try:
            slot = Slot(self, address, probe=self._may_try(address))
        except Unavailable as exc:
            self.metrics.destination_skipped(exc.stage)
            raise
        try:
            cap = self.cap(address, named)
            if cap:
                semaphore = self._slots.get(address)
                if semaphore is None:
                    semaphore = self._slots[address] = trio.Semaphore(cap, max_value=cap)
                try:
                    semaphore.acquire_nowait()  # usually free: no deadline needed
                    slot._semaphore = semaphore
                except trio.WouldBlock:
                    self._waiting[address] = self._waiting.get(address, 0) + 1
                    try:
                        with trio.move_on_after(self.settings.concurrency_wait):
                            await semaphore.acquire()
                            slot._semaphore = semaphore
                    finally:
                        if self._waiting[address] == 1:
                            del self._waiting[address]
                        else:
                            self._waiting[address] -= 1
                if slot._semaphore is None:
                    raise Unavailable(
                        "busy", f"{cap} connections in use, none free within "
                        f"{self.settings.concurrency_wait:g}s"
                    )
                if not slot.probe and address in self._down:
                    # Marked down by another leg while this one waited for its slot.
                    raise Unavailable("down", self._down[address].reason)
        except Unavailable as exc:
            self.metrics.destination_skipped(exc.stage)
            slot.release()
            raise
        except BaseException:
            slot.release()
            raise
        return slot

    def _may_try(self, address: Destination) -> bool:
        """Raise `Unavailable` while `address` is down; True when this attempt is the one
        let through after its time is up."""
        if not self._down:  # nothing is down (the usual case): no lookup
            return False
        state = self._down.get(address)
        if state is None:
            return False
        remaining = state.until - trio.current_time()
        if remaining > 0:
            raise Unavailable("down", f"known down, next try in {remaining:.0f}s "
                              f"({state.reason})")
        if state.probing:
            raise Unavailable("down", f"known down, being retried ({state.reason})")
        state.probing = True
        return True

    # -- health ---------------------------------------------------------------------------------

    def mark_down(self, address: Destination, reason: str, *, probe: bool) -> None:
        base = self.settings.down_time
        if base <= 0:
            return
        now = trio.current_time()
        state = self._down.get(address)
        if state is None:
            self._prune(now)
            self._down[address] = _Down(1, time.time(), now + base, reason)
            self.metrics.destination_marked_down()
            self.metrics.destinations_down(len(self._down))
            logger.warning("destination %s marked down for %gs: %s", address, base, reason)
        elif probe:
            state.failures += 1
            wait = min(base * 2 ** min(state.failures - 1, MAX_DOUBLINGS),
                       self.settings.down_time_max)
            state.until, state.probing, state.reason = now + wait, False, reason
            logger.warning("destination %s still down (%d failures), marked down for %gs: %s",
                           address, state.failures, wait, reason)
        else:
            state.reason = reason  # an attempt that began before it was marked down

    def mark_up(self, address: Destination) -> None:
        if not self._down:  # after every greeting: nothing to forget, usually
            return
        state = self._down.pop(address, None)
        if state is not None:
            self.metrics.destinations_down(len(self._down))
            logger.warning("destination %s up again after %.0fs down",
                           address, time.time() - state.since)

    def abandon(self, address: Destination) -> None:
        """The recovery attempt ended without a verdict (its session went away)."""
        state = self._down.get(address)
        if state is not None:
            state.probing = False

    def _prune(self, now: float) -> None:
        """Forget addresses nobody has tried long after their time was up (bounded memory)."""
        horizon = now - max(self.settings.down_time_max, self.settings.down_time)
        for address in [a for a, s in self._down.items() if s.until < horizon and not s.probing]:
            del self._down[address]
        self.metrics.destinations_down(len(self._down))

    def wanted(self, address: Destination) -> bool:
        """A leg waits for a place under `address`'s cap: a connection that could be kept idle
        (limits.idle_upstreams) is closed instead, which gives the place to that leg."""
        return bool(self._waiting) and address in self._waiting

    def forget_idle(self, address: Destination, semaphore: trio.Semaphore) -> None:
        """Drop an address's semaphore once nobody holds or waits for it (bounded memory)."""
        idle = semaphore.value == semaphore.max_value and not semaphore.statistics().tasks_waiting
        if idle and self._slots.get(address) is semaphore:
            del self._slots[address]

    # -- what operators see -----------------------------------------------------------------------

    def down(self) -> list[DownEntry]:
        now = trio.current_time()
        return [
            DownEntry(str(a), s.failures, s.since, max(0.0, s.until - now), s.probing, s.reason)
            for a, s in sorted(self._down.items())
        ]

    def in_use(self, address: Destination) -> int:
        semaphore = self._slots.get(address)
        return 0 if semaphore is None or semaphore.max_value is None \
            else semaphore.max_value - semaphore.value

    def clear(self, address: Destination | None = None) -> list[str]:
        """Forget one address (or all): the next leg tries it at once."""
        cleared = [a for a in self._down if address is None or a == address]
        for a in cleared:
            del self._down[a]
            logger.warning("destination %s cleared from the dead set by the operator", a)
        self.metrics.destinations_down(len(self._down))
        return [str(a) for a in sorted(cleared)]


@functools.lru_cache(maxsize=1024)
def is_ip_literal(host: str) -> bool:
    """Whether `host` is an IP address (cached: asked at every connection)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(destination: Destination) -> list[Destination]:
    """The addresses of `destination`, in the resolver's order (an IP literal is its own)."""
    if is_ip_literal(destination.host):
        return [destination]
    try:
        infos = await trio.socket.getaddrinfo(
            destination.host, destination.port, type=socket.SOCK_STREAM
        )
    except UnicodeError:  # IDNA: a label over 63 characters, or an empty one
        raise socket.gaierror(socket.EAI_NONAME, "not a valid host name") from None
    return list(dict.fromkeys(Destination(str(info[4][0]), destination.port) for info in infos))
