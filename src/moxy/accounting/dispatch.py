"""The accounting dispatcher: sessions hand it events, it hands them to every configured sink.

`emit` never blocks and wakes nothing: it appends the event to one list. One clock task takes
that list every `[accounting] interval` (half a second; sooner when a batch is full), adds it
to each sink's bounded queue and wakes each sink's task with events gathered long enough; so a
sink costs a wake-up per batch, not per message. A slow or dead sink delays neither mail nor
the other sinks; what its queue cannot hold is counted and logged (once per outage). At
shutdown every sink gets a bounded time to write what is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from moxy.accounting.base import Sink, SinkStats
from moxy.accounting.events import (
    LEG_AND_MESSAGE,
    DeliveryEvent,
    Emit,
    Fields,
    count_events,
    discard,
    expand,
)
from moxy.accounting.intake import Mailbox
from moxy.accounting.sinks import build_sink
from moxy.config import Config
from moxy.logsetup import plural

logger = logging.getLogger("moxy.accounting")

BATCH = 512  # events per Sink.write
TICK = 1.0  # seconds between Sink.tick calls
# Seconds between the clock's looks by default (`[accounting] interval`): events reach a sink
# within about this time. Every trio timer costs as much as writing a few log lines, so there
# is one, for all sinks.
WINDOW = 0.5
FLUSH_TIMEOUT = 5.0  # seconds every sink gets at shutdown to write its queue and close


class _Lane:
    """One sink, its queue and its bookkeeping."""

    def __init__(self, sink: Sink, size: int, window: float) -> None:
        self.sink = sink
        self.queue: list[DeliveryEvent] = []  # swapped for a new list when its task takes it
        self.size = size
        self.window = window
        self.gather = max(window, float(getattr(sink, "gather", 0.0)))
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

    def add(self, events: list[DeliveryEvent]) -> None:
        """What the clock took from the intake; beyond `size` queued, dropped and counted."""
        queue = self.queue
        room = 0 if self.closed else self.size - len(queue)
        if len(events) <= room:
            queue += events
            return
        if room > 0:
            queue += events[:room]
        self.lose(len(events) - max(room, 0))
        if not self.overflowing:
            self.overflowing = True
            logger.error(
                "accounting sink %s is not keeping up (%s queued): dropping events "
                "until it catches up", self.sink.name, plural(self.size, "event"),
            )

    def lose(self, count: int) -> None:
        """Count `count` events dropped for this sink, and tell a sink that reports its
        outages' drops (its optional `lost`)."""
        self.dropped += count
        lost = getattr(self.sink, "lost", None)
        if lost is not None:
            try:
                lost(count)
            except Exception:
                logger.exception("accounting sink %s: lost failed", self.sink.name)

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


class Intake:
    """What sessions see of accounting: `emit`, which keeps an event until a clock task takes
    what has gathered, every `interval` (sooner once a batch has gathered). Shared by the
    dispatcher below (which keeps the events as tuples in a list) and by the serving side of
    an accounting process of its own (moxy.accounting.remote, which packs them at once)."""

    def __init__(self, queue: int, interval: float, wake_at: int | None = None) -> None:
        self.window = interval
        self.size = queue
        # A full batch (or half a queue) wakes the clock, unless the caller says otherwise
        # (`wake_at` entries). An entry may be two events (events.LEG_AND_MESSAGE): the
        # counts are halved.
        self._wake_at = max(1, min(BATCH, queue // 2) // 2) if wake_at is None else wake_at
        self._lost = 0  # events the intake itself refused (the loop is far behind, or stopped)
        self._losing = False  # refusing since the clock's last look without a loss
        self._lost_before = 0  # self._lost when this episode of losses began
        self._lost_at_look = 0  # self._lost at the clock's last look
        self._clock_task: trio.lowlevel.Task | None = None  # the clock, while it waits
        self._stopped = False

    def _refuse(self, event: Fields) -> None:
        """An event the intake cannot hold (half a queue's worth waits: the loop is far
        behind), or emitted once accounting has stopped: lost for every sink, counted as
        their drop."""
        lost = self._lost
        self._lost += 2 if event[0] == LEG_AND_MESSAGE else 1
        if not self._losing:  # the first of an episode: at once; its count when it is over
            self._losing = True
            self._lost_before = lost
            logger.error("accounting: events lost before reaching any sink (the event loop "
                         "is far behind, or accounting has stopped), until they flow again")

    def _losses_over(self) -> None:
        """At each look of the clock: a loss episode with no loss since the look before is
        over (events flow again), and its count is logged."""
        if self._losing and self._lost == self._lost_at_look and not self._stopped:
            self._losing = False
            logger.warning("accounting: events reach the sinks again; %s lost before "
                           "reaching any sink", plural(self._lost - self._lost_before, "event"))
        self._lost_at_look = self._lost

    def _wake_clock(self) -> None:
        """A plain reschedule: cancelling the clock's wait instead raised Cancelled through it,
        about 45,000 instructions a wake-up (once a batch, in the serving event loop)."""
        task = self._clock_task
        if task is not None:
            self._clock_task = None
            trio.lowlevel.reschedule(task)

    def _clock_aborted(self, _: object) -> trio.lowlevel.Abort:
        self._clock_task = None  # its interval is over (or everything is cancelled)
        return trio.lowlevel.Abort.SUCCEEDED

    async def _look(self) -> None:
        """Wait for the clock's next look: an interval, or a wake-up."""
        self._losses_over()
        with trio.CancelScope(deadline=trio.current_time() + self.window):
            self._clock_task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._clock_aborted)


class Accounting(Intake):
    """The dispatcher: `emit` from sessions, `run` in the server's nursery."""

    def __init__(
        self, sinks: Sequence[Sink], queue: int = 10_000, interval: float = WINDOW
    ) -> None:
        names = [sink.name for sink in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"accounting sinks need distinct names, got {names}")
        super().__init__(queue, interval)
        self.lanes = [_Lane(sink, queue, interval) for sink in sinks]
        # Events emitted since the clock's last look, as sessions made them.
        self._intake: list[Fields] = []
        # Without sinks, `emit` is `events.discard`, which tells sessions to make no events.
        # Otherwise it is the mailbox's `put` (compiled in the native build): the intake list
        # takes the event while it holds fewer than `_wake_at`, else `_crowded` does.
        self._mailbox = Mailbox(self._intake, self._wake_at, self._crowded)
        self.emit: Emit = self._mailbox.put if sinks else discard

    def _crowded(self, event: Fields) -> None:
        """A batch has gathered before the clock's look: wake it. The intake holds at most
        half a queue's worth."""
        self._wake_clock()
        if len(self._intake) < self.size // 2 and not self._stopped:
            self._intake.append(event)
        else:
            self._refuse(event)

    def _take_intake(self) -> list[Fields]:
        intake = self._intake
        if not intake:
            return []
        events = intake.copy()  # `emit` appends to this very list: emptied, not replaced
        intake.clear()
        return events

    @classmethod
    def from_config(cls, config: Config) -> Accounting:
        """The sinks `[accounting] sinks` names, each made from its settings."""
        return cls([build_sink(name, config) for name in config.accounting.sinks],
                   config.accounting.queue, config.accounting.interval)

    def reopen(self) -> None:
        """SIGUSR1: every sink reopens its files before it writes again."""
        for lane in self.lanes:
            lane.reopen = True
            lane.wake()

    def stats(self) -> dict[str, SinkStats]:
        """Per sink: events waiting (in its queue, or held by the sink) and events lost."""
        out = {}
        waiting, lost = count_events(self._intake), self._lost
        if self._stopped:
            waiting, lost = 0, lost + waiting
        for lane in self.lanes:
            own = _sink_stats(lane)
            out[lane.sink.name] = SinkStats(
                backlog=waiting + lane.queued() + own.backlog,
                dropped=lost + lane.dropped + own.dropped,
            )
        return out

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Feed the sinks until cancelled; then give them FLUSH_TIMEOUT to write what is
        queued and close (the lanes are shielded, so they finish even though this task was
        cancelled)."""
        if not self.lanes:  # no sinks: no tasks, no clock
            task_status.started()
            await trio.sleep_forever()
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
                    self.deliver(self._take_intake())  # the last sessions' events
                    for lane in self.lanes:
                        lane.stopping = True
                        lane.wake()
                outer.cancel_scope.cancel()  # every sink is closed: the clock too
            self._stopped = True

    async def _clock(self) -> None:
        """Every interval (sooner when a batch has gathered): the intake to the sinks' queues,
        and a wake-up for each sink's task with events gathered long enough, or a tick due."""
        while True:
            await self._look()
            self.deliver(self._take_intake())

    def deliver(self, emitted: list[Fields]) -> None:
        """Events (or their fields) to every sink's queue, and a wake-up for each sink's task
        with events gathered long enough (or a full batch), or a tick due. The clock's, and
        what the accounting process does with the events the serving process sends it."""
        if emitted:
            events = expand(emitted)
            for lane in self.lanes:
                lane.add(events)
        now = trio.current_time()
        for lane in self.lanes:
            queued = len(lane.queue)
            if ((queued and (now >= lane.next_look or queued >= 2 * self._wake_at))
                    or now >= lane.next_tick):
                lane.wake()

    async def _feed(self, lane: _Lane) -> None:
        """One sink's task: what has gathered goes to `write` in batches when the clock (or a
        full batch) wakes it; `tick` about once a second, `reopen` when asked; once stopping,
        what is queued is written and the sink closed."""
        sink = lane.sink
        lane.next_tick = trio.current_time() + TICK
        try:
            while True:
                if not (lane.stopping or lane.reopen):
                    await lane.park()
                if lane.reopen:
                    lane.reopen = False
                    await self._call(lane, sink.reopen, "reopen")
                # Gathering starts again after a write: at most one write per `gather`.
                lane.next_look = trio.current_time() + lane.gather - lane.window / 2
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
                logger.error("accounting sink %s: %s not written at shutdown (gave up "
                             "after %gs)", sink.name, plural(left, "event"), FLUSH_TIMEOUT)

    async def _write(self, lane: _Lane, batch: list[DeliveryEvent]) -> None:
        if await self._call(lane, lambda: lane.sink.write(batch), "write"):
            lane.failing = False
        else:
            lane.lose(len(batch))
        if lane.overflowing and lane.queued() <= lane.size // 2:
            lane.overflowing = False
            logger.warning("accounting sink %s caught up; %s dropped so far",
                           lane.sink.name, plural(lane.dropped, "event"))

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
