"""The accounting sink interface: where `DeliveryEvent`s go after a session emits them.

Sessions never call a sink. They hand events to the dispatcher (`emit`, which never blocks);
the dispatcher gives each configured sink its own bounded queue and its own task, which calls
the methods below one at a time, with events gathered in batches. So a sink may take its time
(a slow disk, Redis down) without delaying mail or the other sinks; what its queue cannot hold
is counted as dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs

from moxy.accounting.events import DeliveryEvent


@attrs.frozen
class SinkStats:
    """What a sink reports for metrics and logs."""

    backlog: int = 0  # increments or events held because the backend is slow or down
    dropped: int = 0  # events or increments given up for good (bounded backlog overflowed)


class Sink(Protocol):
    """One destination of accounting events (file, syslog, gdbm, redis, ...)."""

    name: str
    # Optional attribute `gather`: seconds the dispatcher lets events gather before it calls
    # `write` (absent: dispatch.GATHER, a fifth of a second; 0: at once, one wake-up of the
    # sink's task per event); sinks that write on a schedule anyway gather longer.
    # Optional method `lost(count)`: the dispatcher dropped `count` events meant for this sink
    # (its queue was full). The dispatcher counts them either way; a sink that reports its
    # drops once per outage (redis) is told, to report them with its own.

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        """Record a batch of events. An outage is not an error: the sink keeps what it can
        (bounded) for a later `tick` and returns; it raises only for bugs."""

    async def tick(self) -> None:
        """Called about once a second: time-based flushing and retries after an outage."""

    async def reopen(self) -> None:
        """SIGUSR1: reopen files, so that logrotate can move them away."""

    async def aclose(self) -> None:
        """Flush what is pending (the caller bounds the time) and release resources."""

    def stats(self) -> SinkStats:
        """Backlog and drops so far."""
