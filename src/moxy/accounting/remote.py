"""Accounting in a process of its own (`[accounting] process = true`, the default): the
serving side.

Sessions call `emit` with an event's fields, as with the in-process dispatcher; here it is a
Packer's `put` (moxy.accounting.packing, in C where built), which packs them at once into the
frames it keeps. Every `[accounting] interval` (sooner once a batch has gathered) one task
sends those frames down a pipe to the accounting process (moxy.accounting.host), which runs
the dispatcher and the sinks. So the message log's formatting, the Redis counters' summing and
every sink's I/O use another CPU than the serving event loop's; what stays here is packing
the events' fields and one write per batch.

The accounting process is one per serving process (a worker has its own, as it had its own
sinks). If it dies, what it had not confirmed is counted as dropped, and it is started again
(after a second, longer while it keeps dying). At shutdown the serving process sends the last
events and closes the pipe; the accounting process gets `dispatch.FLUSH_TIMEOUT` to write what
is queued, and a little more before it is killed.
"""

from __future__ import annotations

import logging
import marshal
import os
import pickle
import site
import subprocess
import sys
from pathlib import Path

import trio

import moxy
from moxy.accounting import pipe
from moxy.accounting.base import SinkStats
from moxy.accounting.dispatch import FLUSH_TIMEOUT, Accounting, Intake
from moxy.accounting.events import discard
from moxy.config import Config
from moxy.logsetup import plural

logger = logging.getLogger("moxy.accounting")

RESTART_DELAY = 1.0  # seconds before an accounting process that died is started again
RESTART_MAX = 30.0  # ... doubling while it keeps dying within STABLE seconds
STABLE = 60.0
EXIT_GRACE = 2.0  # seconds after FLUSH_TIMEOUT before an accounting process is killed


class RemoteAccounting(Intake):
    """`emit` for sessions, `run` in the server's nursery (as `dispatch.Accounting`)."""

    def __init__(self, config: Config) -> None:
        """Raises pickle's errors when `config` cannot be sent (see `accounting_for`)."""
        settings = config.accounting
        self._config_frame = pipe.frame(pipe.CONFIG, pickle.dumps(config))
        # Sent once pipe.SEND_AT entries have gathered, while they are still in the CPU's caches.
        super().__init__(settings.queue, settings.interval,
                         wake_at=max(1, min(pipe.SEND_AT, settings.queue // 2)))
        # Sessions' events are packed until half a queue's worth waits; beyond, each is lost
        # (counted as every sink's drop).
        self._packer = pipe.packer(self._wake_at, self.size // 2, self._wake_clock,
                                   self._refuse)
        self.emit = self._packer.put if settings.sinks else discard
        self.names = tuple(settings.sinks)
        self.pid: int | None = None  # the accounting process, while it runs
        self._reopen = False
        self._sent = 0  # events sent to the current accounting process
        self._received = 0  # ... of which it has said it received
        self._host: dict[str, SinkStats] = {}  # its sinks' stats, as last reported
        self._gone = 0  # events sent to accounting processes that died before taking them
        self._ended: dict[str, int] = {}  # per sink, what ended processes dropped or held
        self._scope: trio.CancelScope | None = None
        self._closing = False  # the last events are sent: its end is expected now

    def reopen(self) -> None:
        """SIGUSR1: passed on to the accounting process, whose sinks reopen their files."""
        self._reopen = True
        self._wake_clock()

    def stats(self) -> dict[str, SinkStats]:
        """Per sink: events waiting (here, in the pipe, or in the accounting process) and
        events lost."""
        waiting = self._packer.events + self._sent - self._received
        lost = self._lost + self._gone
        if self._stopped:
            waiting, lost = 0, lost + waiting
        out = {}
        for name in self.names:
            own = self._host.get(name, SinkStats())
            out[name] = SinkStats(backlog=waiting + own.backlog,
                                  dropped=lost + own.dropped + self._ended.get(name, 0))
        return out

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep an accounting process fed until cancelled; then send it the last events and
        let it finish (shielded, bounded)."""
        if not self.names:
            task_status.started()
            await trio.sleep_forever()
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            try:
                # A stop at once may come while the first process starts: `_keep` is
                # shielded, and only `stopping` ends it.
                await nursery.start(self._keep, stopping)
                task_status.started()
                await trio.sleep_forever()
            finally:
                stopping.set()
                self._wake_clock()
                if self._scope is not None:
                    self._scope.deadline = trio.current_time() + FLUSH_TIMEOUT + EXIT_GRACE

    async def _keep(self, stopping: trio.Event, task_status: trio.TaskStatus[None]) -> None:
        """Started once the first accounting process is (or could not be)."""
        delay = RESTART_DELAY
        with trio.CancelScope(shield=True) as self._scope:
            while True:
                started = trio.current_time()
                if await self._one(stopping, task_status) or stopping.is_set():
                    break
                delay = RESTART_DELAY if trio.current_time() - started > STABLE else delay
                logger.error("accounting: starting the accounting process again in %gs", delay)
                with trio.move_on_after(delay):
                    await stopping.wait()
                if stopping.is_set():
                    break
                delay = min(delay * 2, RESTART_MAX)
                task_status = trio.TASK_STATUS_IGNORED
        self._stopped = True
        self._packer.limit = 0  # what sessions still emit is lost, and counted
        self.pid = None
        if self._packer.entries:  # no accounting process took them (it died, or never started)
            logger.error("accounting: %s not written at shutdown (no accounting "
                         "process)", plural(self._packer.events, "event"))

    async def _one(self, stopping: trio.Event, task_status: trio.TaskStatus[None]) -> bool:
        """One accounting process, from start to end: True when it ended as asked."""
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "moxy.accounting.host"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_environment(),
            )
        except OSError as exc:
            logger.error("accounting: cannot start the accounting process: %s",
                         exc.strerror or exc)
            task_status.started()
            return False
        task_status.started()
        assert process.stdin is not None and process.stdout is not None
        if isinstance(process.stdin, trio.lowlevel.FdStream):
            pipe.widen(process.stdin.fileno())
        self.pid = process.pid
        self._sent = self._received = 0
        self._host = {}
        self._closing = done = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen, process.stdout, nursery.cancel_scope)
                await process.stdin.send_all(self._config_frame)
                while not stopping.is_set():
                    if self._packer.entries < self._wake_at:  # else its wake-up came early
                        await self._look()
                    await self._send(process.stdin)
                    if self._reopen:
                        self._reopen = False
                        await process.stdin.send_all(pipe.frame(pipe.REOPEN))
                await self._send(process.stdin)
                self._closing = True
                await process.stdin.aclose()
                await process.wait()
                done = True
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died: said below
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
            self._end(process.returncode, done)
        return done

    def _end(self, status: int | None, done: bool) -> None:
        """Its stats become history: what it dropped, and (unless it finished as asked) what
        it still held, and what it never confirmed."""
        unconfirmed = self._sent - self._received
        self._sent = self._received = 0
        clean = done and status == 0
        for name, stats in self._host.items():
            self._ended[name] = (self._ended.get(name, 0) + stats.dropped
                                 + (0 if clean else stats.backlog))
        self._host = {}
        if clean:
            return
        self._gone += unconfirmed
        how = f"exit status {status}" if status is None or status >= 0 else f"signal {-status}"
        lost = f"; up to {plural(unconfirmed, 'event')} sent to it may be lost"
        logger.error("accounting: the accounting process ended (%s)%s", how,
                     lost if unconfirmed else "")

    async def _send(self, stdin: trio.abc.SendStream) -> None:
        """What has gathered, in one write (as many as the pipe takes at a time). Counted as
        sent first: should the accounting process die meanwhile, they count as lost."""
        if self._packer.entries:
            self._sent += self._packer.events
            await _write(stdin, self._packer.take())

    async def _listen(self, stdout: trio.abc.ReceiveStream, scope: trio.CancelScope) -> None:
        """The accounting process's reports; when it ends (or talks nonsense), the end of
        this one."""
        try:
            async for kind, payload in pipe.frames(stdout):
                if kind == pipe.STATS:
                    received, stats = marshal.loads(payload)
                    self._received = received
                    self._host = {name: SinkStats(backlog=backlog, dropped=dropped)
                                  for name, (backlog, dropped) in stats.items()}
        except pipe.FrameError as exc:
            logger.error("accounting: the accounting process %s", exc)
        else:
            if self._closing:
                return  # it is writing what is queued: its exit is awaited
        scope.cancel()


async def _write(stdin: trio.abc.SendStream, data: bytes) -> None:
    """`data` into the pipe: straight into its non-blocking descriptor, which takes a batch at
    once unless the accounting process is far behind (it holds 1 MiB); `send_all` for what it
    did not take, and for the errors, which it turns into trio's (BrokenResourceError when the
    accounting process is gone). The clock's task is the pipe's only writer."""
    done = 0
    if isinstance(stdin, trio.lowlevel.FdStream):
        try:
            done = os.write(stdin.fileno(), data)
        except OSError:  # full (BlockingIOError), or broken: send_all says which
            done = 0
    if done < len(data):
        await stdin.send_all(memoryview(data)[done:] if done else data)


def _environment() -> dict[str, str]:
    """This process's environment, with the directory Moxy was imported from first on the
    path: the accounting process runs the same Moxy, however this one found it. Not when that
    is a site-packages directory, which the same interpreter finds anyway (first on the path,
    it could shadow the standard library)."""
    env = dict(os.environ)
    home = str(Path(moxy.__file__).resolve().parent.parent)
    installed = {str(Path(d).resolve()) for d in [*site.getsitepackages(),
                                                  site.getusersitepackages()]}
    if home not in installed:
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = home if not path else home + os.pathsep + path
    return env


def accounting_for(config: Config) -> Accounting | RemoteAccounting:
    """What `moxy serve` runs: the sinks in a process of their own, or (`[accounting] process
    = false`) in this one."""
    if config.accounting.process and config.accounting.sinks:
        try:
            return RemoteAccounting(config)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # Nothing a configuration file can express should get here; a configuration
            # built in code might. Mail does not depend on it: the sinks run here instead.
            logger.warning("accounting: the configuration cannot be passed to an accounting "
                           "process (%s); the sinks run in this process", exc)
    return Accounting.from_config(config)
