"""The accounting process: `python -m moxy.accounting.host`, started by the serving process
(moxy.accounting.remote) with pipes on its standard input and output.

It reads the configuration, then events, from its standard input and runs the dispatcher and
sinks of moxy.accounting.dispatch on them: the message log's formatting and writing, the
syslog messages, the GDBM totals and the Redis counters all happen here, on a CPU other than
the serving event loop's. Once a second it reports on its standard output how many events it
received and each sink's backlog and drops (for the serving process's metrics).

It takes no signals: the serving process decides. SIGTERM or SIGINT sent to the whole process
group (systemd, a terminal) must not end it before the serving process has drained and sent
the last events; SIGUSR1 reaches it as a REOPEN frame. When its standard input ends (the
serving process is done, or died), it gives each sink `dispatch.FLUSH_TIMEOUT` to write what is
queued, and exits.
"""

from __future__ import annotations

import gc
import logging
import marshal
import os
import pickle
import signal
import sys

import trio

from moxy.accounting import pipe
from moxy.accounting.dispatch import Accounting
from moxy.accounting.events import count_events
from moxy.config import Config, ConfigError
from moxy.gil import set_switch_interval
from moxy.logsetup import configure_logging

logger = logging.getLogger("moxy.accounting")

REPORT = 1.0  # seconds between reports to the serving process
# Seconds between reads of the serving process's pipe while events flow (at most a fifth of
# `[accounting] interval`), when the pipe holds enough for that (pipe.widen).
PAUSE = 0.1
ENOUGH = 256 << 10  # bytes: a pipe that holds less is read as soon as anything is written
# Container allocations between young collections (Python's default is 700). This process
# makes tens of thousands of short-lived tuples a second (the events), all freed by reference
# counting; see _settle_gc.
YOUNG = 20_000


class _Paced(trio.abc.ReceiveStream):
    """The serving process's pipe, read at most once per `pause` while events flow.

    Every write into a pipe wakes a reader waiting on it, and the kernel moves a reader woken
    by a pipe to the writer's CPU: read at once, the serving process's several writes a second
    would each pull this process onto the CPU the serving event loop needs. Paced, it is
    woken by its own timer a few times a second and reads all that has gathered in one read;
    idle, it waits on the pipe (no wake-ups at all until mail flows)."""

    def __init__(self, stream: trio.lowlevel.FdStream, pause: float, size: int) -> None:
        self.stream = stream
        self.pause = pause
        self.size = size
        self.flowing = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.flowing:
            await trio.sleep(self.pause)
        data = await self.stream.receive_some(self.size)
        self.flowing = bool(data)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Received:
    count = 0


async def _report(accounting: Accounting, received: _Received,
                  stdout: trio.abc.SendStream) -> None:
    """Events received and the sinks' stats, once a second, until the serving process stops
    reading (it ended)."""
    while True:
        stats = {name: (s.backlog, s.dropped) for name, s in accounting.stats().items()}
        try:
            await stdout.send_all(pipe.frame(pipe.STATS, marshal.dumps((received.count, stats))))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        await trio.sleep(REPORT)


async def _serve() -> int:
    # Our own copies of the pipes (trio's FdStream makes its descriptor non-blocking); print()
    # must not write into the frames.
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    sys.stdout = sys.stderr
    paced = _Paced(stdin, 0.0, 1 << 16)
    incoming = pipe.frames(paced)
    first = await anext(incoming, None)
    if first is None:
        return 0  # the serving process ended before it said anything
    kind, payload = first
    if kind != pipe.CONFIG:
        raise pipe.FrameError(f"expected the configuration first, got {kind!r}")
    config: Config = pickle.loads(payload)
    size = pipe.capacity(stdin.fileno())
    if size >= ENOUGH:
        paced.pause, paced.size = min(PAUSE, config.accounting.interval / 5), size
    configure_logging(config.log.level)
    set_switch_interval(config.server.gil_switch_interval)
    try:
        accounting = Accounting.from_config(config)
    except ConfigError as exc:
        logger.error("accounting process: %s", exc)
        return 2
    _settle_gc()
    received = _Received()
    status = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(accounting.run)
        nursery.start_soon(_report, accounting, received, stdout)
        try:
            async for kind, payload in incoming:
                if kind == pipe.EVENTS:
                    events = pipe.unpack_events(payload)
                    received.count += count_events(events)
                    accounting.deliver(events)
                elif kind == pipe.REOPEN:
                    accounting.reopen()
        except pipe.FrameError as exc:  # a bug on the other side: keep what came before
            logger.error("accounting process: from the serving process: %s", exc)
            status = 1
        # The serving process is done: the sinks write what is queued (bounded), then exit.
        nursery.cancel_scope.cancel()
    return status


def _settle_gc() -> None:
    """Once the sinks are made: what exists now (modules, the sinks' clients, the configuration)
    lives as long as the process, so the collector stops looking at it (`gc.freeze`), and it
    looks at new objects less often. With the defaults the collector went through the whole
    heap about once a second while events flowed, about a tenth of this process's CPU."""
    gc.freeze()
    gc.set_threshold(YOUNG, *gc.get_threshold()[1:])


def main() -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    try:
        return trio.run(_serve)
    except pipe.FrameError as exc:
        print(f"moxy accounting process: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
