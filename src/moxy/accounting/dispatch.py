"""The accounting dispatcher: sessions hand it events, it hands them to every configured sink.

`emit` never blocks and wakes nothing: it appends the event to each sink's bounded list. One
clock task looks at the lists every WINDOW seconds and wakes the task of each sink with events
waiting (a full batch wakes it at once); so a sink costs a wake-up per batch, not per message.
A slow or dead sink delays neither mail nor the other sinks; what its list cannot hold is
counted and logged (once per outage). At shutdown every sink gets a bounded time to write
what is queued.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

import trio

from moxy.accounting.base import Sink, SinkStats
from moxy.accounting.events import DeliveryEvent, discard
from moxy.accounting.filesink import FileSink
from moxy.accounting.settings import RedisSinkSettings, SyslogSinkSettings
from moxy.accounting.syslog import SyslogSink
from moxy.config import Config, ConfigError

logger = logging.getLogger("moxy.accounting")

BATCH = 512  # events per Sink.write
TICK = 1.0  # seconds between Sink.tick calls
# Seconds between the clock's looks: events reach a sink within about this time. Every trio
# timer costs as much as writing a few hundred log lines, so there is one, for all sinks.
WINDOW = 0.5
FLUSH_TIMEOUT = 5.0  # seconds every sink gets at shutdown to write its queue and close


class _Lane:
    """One sink, its queue and its bookkeeping."""

    def __init__(self, sink: Sink, size: int) -> None:
        self.sink = sink
        self.queue: list[DeliveryEvent] = []  # swapped for a new list when its task takes it
        self.size = size
        gather = getattr(sink, "gather", None)
        self.gather = WINDOW if gather is None else float(gather)
        # A full batch (or half the queue) wakes the task before its gathering time is up;
        # a sink that gathers nothing is woken by every event.
        self.wake_at = 1 if self.gather <= 0 else max(1, min(BATCH, size // 2))
        self.next_look = 0.0  # when the clock wakes the task for what has gathered
        self.next_tick = 0.0  # when the clock wakes it for Sink.tick
        self.dropped = 0  # events its full (or closed) queue refused
        self.overflowing = False  # in an outage: dropping since the last catch-up
        self.failing = False  # the sink raised (a bug) since its last good write
        self.reopen = False
        self.stopping = False
        self.closed = False  # its task has ended: what comes now is dropped
        self.parked: trio.lowlevel.Task | None = None  # its task, while it waits to be woken

    def wake(self) -> None:
        task = self.parked
        if task is not None:
            self.parked = None
            trio.lowlevel.reschedule(task)

    async def park(self) -> None:
        """Wait for `wake` (a plain reschedule: no cancel scope, no timer)."""
        self.parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self.parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def queued(self) -> int:
        return len(self.queue)

    def take(self) -> list[DeliveryEvent]:
        """Up to BATCH events, oldest first."""
        queue = self.queue
        if len(queue) <= BATCH:
            self.queue = []
            return queue
        batch = queue[:BATCH]
        del queue[:BATCH]
        return batch


class Accounting:
    """The dispatcher: `emit` from sessions, `run` in the server's nursery."""

    def __init__(self, sinks: Sequence[Sink], queue: int = 10_000) -> None:
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"accounting sinks need distinct names, got {names}")
        self.lanes = [_Lane(sink, queue) for sink in sinks]
        # Without sinks, `emit` is `events.discard`, which tells sessions to make no events.
        self.emit: Callable[[DeliveryEvent], None] = self._emit if self.lanes else discard

    @classmethod
    def from_config(cls, config: Config) -> Accounting:
        """The sinks `[accounting] sinks` names, each made from its settings."""
        return cls([build_sink(name, config) for name in config.accounting.sinks],
                   config.accounting.queue)

    def _emit(self, event: DeliveryEvent) -> None:
        for lane in self.lanes:
            queue = lane.queue
            if len(queue) < lane.size and not lane.closed:
                queue.append(event)
                if len(queue) == lane.wake_at and lane.parked is not None:
                    lane.wake()
                continue
            lane.dropped += 1
            if not lane.overflowing:
                lane.overflowing = True
                logger.error(
                    "accounting sink %s is not keeping up (%d events queued): dropping "
                    "events until it catches up", lane.sink.name, lane.size,
                )

    def reopen(self) -> None:
        """SIGUSR1: every sink reopens its files before it writes again."""
        for lane in self.lanes:
            lane.reopen = True
            lane.wake()

    def stats(self) -> dict[str, SinkStats]:
        """Per sink: events waiting (in its queue, or held by the sink) and events lost."""
        out = {}
        for lane in self.lanes:
            own = _sink_stats(lane)
            out[lane.sink.name] = SinkStats(
                backlog=lane.queued() + own.backlog, dropped=lane.dropped + own.dropped
            )
        return out

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the sinks until cancelled; then give them FLUSH_TIMEOUT to write what is
        queued and close (the lanes are shielded, so they finish even though this task was
        cancelled)."""
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lanes, stopping)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                stopping.set()

    async def _lanes(self, stopping: trio.Event) -> None:
        with trio.CancelScope(shield=True) as scope:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._clock)
                async with trio.open_nursery() as feeds:
                    for lane in self.lanes:
                        feeds.start_soon(self._feed, lane)
                    await stopping.wait()
                    scope.deadline = trio.current_time() + FLUSH_TIMEOUT
                    for lane in self.lanes:
                        lane.stopping = True
                        lane.wake()
                outer.cancel_scope.cancel()  # every sink is closed: the clock too

    async def _clock(self) -> None:
        """Every WINDOW: wake each sink's task that has events gathered long enough, or a
        tick due."""
        while True:
            await trio.sleep(WINDOW)
            now = trio.current_time()
            for lane in self.lanes:
                if (lane.queue and now >= lane.next_look) or now >= lane.next_tick:
                    lane.wake()

    async def _feed(self, lane: _Lane) -> None:
        """One sink's task: what has gathered goes to `write` in batches when the clock (or a
        full batch) wakes it; `tick` about once a second, `reopen` when asked; once stopping,
        what is queued is written and the sink closed."""
        sink = lane.sink
        lane.next_tick = trio.current_time() + TICK
        try:
            while True:
                if not (lane.stopping or lane.reopen or len(lane.queue) >= lane.wake_at):
                    await lane.park()
                if lane.reopen:
                    lane.reopen = False
                    await self._call(lane, sink.reopen, "reopen")
                # Gathering starts again after a write: at most one write per `gather`.
                lane.next_look = trio.current_time() + lane.gather - WINDOW / 2
                while lane.queue:
                    await self._write(lane, lane.take())
                if lane.stopping:
                    break
                if trio.current_time() >= lane.next_tick:
                    await self._call(lane, sink.tick, "tick")
                    lane.next_tick = trio.current_time() + TICK
            await self._call(lane, sink.aclose, "close")
        finally:
            # Events emitted from now on count as dropped instead of waiting forever.
            lane.closed = True
            left = len(lane.queue)
            lane.queue = []
            if left:
                lane.dropped += left
                logger.error("accounting sink %s: %d events not written at shutdown (gave up "
                             "after %gs)", sink.name, left, FLUSH_TIMEOUT)

    async def _write(self, lane: _Lane, batch: list[DeliveryEvent]) -> None:
        if await self._call(lane, lambda: lane.sink.write(batch), "write"):
            lane.failing = False
        else:
            lane.dropped += len(batch)
        if lane.overflowing and lane.queued() <= lane.size // 2:
            lane.overflowing = False
            logger.warning("accounting sink %s caught up; %d events dropped so far",
                           lane.sink.name, lane.dropped)

    async def _call(self, lane: _Lane, method: Callable[[], Any], what: str) -> bool:
        """Call a sink method; a sink raises only for bugs, which must not stop accounting
        (nor mail): logged once until the sink works again."""
        try:
            await method()
        except Exception:
            if not lane.failing:
                lane.failing = True
                logger.exception("accounting sink %s: %s failed", lane.sink.name, what)
            return False
        return True


def _sink_stats(lane: _Lane) -> SinkStats:
    try:
        return lane.sink.stats()
    except Exception:
        logger.exception("accounting sink %s: stats failed", lane.sink.name)
        return SinkStats()


# --- sinks by name ------------------------------------------------------------------------

# Sinks whose modules import client libraries: loaded only when configured.
_LAZY = {"gdbm": ("moxy.accounting.gdbm", "GdbmSink"), "redis": ("moxy.accounting.redis",
                                                                   "RedisSink")}


def build_sink(name: str, config: Config) -> Sink:
    """The sink `name` of `[accounting] sinks`, made from its `[accounting.<name>]` table.

    Raises ConfigError when it cannot be made (a sink missing from this installation)."""
    if name == "file":
        return FileSink(config.file_sink)
    if name == "syslog":
        return SyslogSink(config.accounting.syslog or SyslogSinkSettings())
    if name not in _LAZY:
        raise ConfigError([f"accounting.sinks: unknown sink {name!r}"], config.path)
    settings = getattr(config.accounting, name)
    if settings is None and name == "redis":  # every key has a default: the table may be absent
        settings = RedisSinkSettings()
    return _lazy_class(name, config)(settings)


def _lazy_class(name: str, config: Config) -> Callable[[Any], Sink]:
    """The class of a sink whose module is imported only when it is configured."""
    module_name, class_name = _LAZY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise ConfigError(
                [f"accounting.sinks: the {name!r} sink is not part of this Moxy installation"],
                config.path,
            ) from None
        raise ConfigError(
            [f"accounting.sinks: the {name!r} sink cannot be loaded: {exc}"], config.path
        ) from None
    return cast(Callable[[Any], Sink], getattr(module, class_name))


def check_sinks(config: Config) -> None:
    """What `moxy serve` checks before it listens: every sink can be made, and the message log
    can be opened (a typo in its path is a configuration error, not a silent loss of events).

    The GDBM and Redis sinks are only loaded, not made: they open their backends when made,
    and each worker process makes its own. Raises ConfigError naming the key."""
    for name in config.accounting.sinks:
        if name in _LAZY:
            _lazy_class(name, config)
    path = config.file_sink.path
    if "file" in config.accounting.sinks and path is not None:
        key = "log.file"
        if config.accounting.file is not None and config.accounting.file.path is not None:
            key = "accounting.file.path"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
        except OSError as exc:
            raise ConfigError(
                [f"{key}: cannot open {path} for appending: {exc.strerror or exc}"], config.path
            ) from None
