"""The "file" accounting sink: the message log, one line per event, text or JSON.

Lines are formatted and written by the sink's own writer thread, so the event loop never
waits for the disk, and a batch costs no trio thread round trip. `write` holds each batch; what
is held goes to the thread as one job (`_hand_over`) when the last job is HAND_EVERY old, when
HAND_EVENTS are held, at `tick` (about once a second), and before a reopen or the close. Under
load the thread is so woken a few times a second rather than for every batch (see
HAND_EVERY); a quiet server's lines go at once.

Each job is one writev() of whole lines on an O_APPEND file, so that the lines of several
worker processes sharing the file never interleave inside a line. `reopen` (SIGUSR1) opens
the path again, after logrotate has moved the old file away, in order with the writes.
Without a path it writes to standard error.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from moxy.accounting.base import SinkStats
from moxy.accounting.events import DeliveryEvent, json_lines, log_lines
from moxy.accounting.settings import FileSinkSettings
from moxy.logsetup import plural

try:  # the native build's formatter of the text lines (C): log_lines, a tenth of the cost
    from moxy.accounting._loglines import encode_lines as _encode_lines
except ImportError:  # pure Python
    def _encode_lines(batch: Sequence[DeliveryEvent], /) -> bytes | None:
        return None

logger = logging.getLogger("moxy.accounting.file")

IN_FLIGHT = 4096  # events handed to the writer thread and not yet written: `write` waits beyond
# Batches are held in the event loop and handed to the writer thread at most every
# HAND_EVERY seconds (or once HAND_EVENTS are held; `tick` hands over what is left). Each
# hand-over wakes the thread, which then needs the GIL twice, and while a thread waits for
# the GIL each system call of a busy event loop costs a futex wake-up (moxy.gil): handed
# every batch (about 50 a second at full load), the writer cost the serving process 4-5 µs
# of CPU a message with `process = false` (docs/accounting.md).
HAND_EVERY = 0.25
HAND_EVENTS = 2048
OPEN_RETRY = 1.0  # seconds between attempts to open a path that could not be opened
_WAIT = 0.05  # seconds between looks while the thread is behind (a stuck disk)
_IOV_MAX = 1024  # buffers per writev() (Linux's IOV_MAX)

# (what, batches, events): ("write", batches of events, their number), ("reopen", [], 0),
# ("close", [], 0).
_Job = tuple[str, list[Sequence[DeliveryEvent]], int]


class FileSink:
    def __init__(self, settings: FileSinkSettings, name: str = "file") -> None:
        self.name = name
        self.path = settings.path
        self.json = settings.format == "json"
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_pid = 0  # a thread started before a fork does not run in the child
        # Events handed over (event loop only) and finished with (writer only): a counter
        # each with one writer, so neither needs a lock.
        self._handed = 0
        self._finished = 0
        # Batches not yet handed over (event loop only), and their events.
        self._held: list[Sequence[DeliveryEvent]] = []
        self._held_events = 0
        self._hand_at = -math.inf
        # The writer thread's own state.
        self._fd: int | None = None
        self._opened = False
        self._last_open = -OPEN_RETRY
        self._failing = False  # in a write outage (disk full, ...): logged once
        self._open_failing = False
        self._dropped = 0
        self._dropped_before = 0  # self._dropped when the outage began
        self._torn = False  # a failed write left a line without its end: ended at the next

    # --- the Sink interface (event loop) ----------------------------------------------------

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        while self._handed + self._held_events - self._finished >= IN_FLIGHT:
            self._hand_over()
            await trio.sleep(_WAIT)  # the disk is stuck: let the dispatcher's queue fill
        self._held.append(batch)
        self._held_events += len(batch)
        if self._held_events >= HAND_EVENTS or trio.current_time() >= self._hand_at:
            self._hand_over()

    async def tick(self) -> None:
        """What is held goes to the writer (which retries opening a path with its next
        batch)."""
        self._hand_over()

    async def reopen(self) -> None:
        if self.path is None:
            return
        logger.info("reopening the message log %s", self.path)
        self._hand_over()
        self._send(("reopen", [], 0))

    async def aclose(self) -> None:
        """Write what was handed over and close; the caller bounds the time (a stuck disk:
        the thread is left behind, a daemon thread that does not hold up the exit)."""
        self._hand_over()
        writer = self._writer
        if writer is None or self._writer_pid != os.getpid():
            return
        self._jobs.put(("close", [], 0))
        await trio.to_thread.run_sync(writer.join, abandon_on_cancel=True)

    def stats(self) -> SinkStats:
        return SinkStats(backlog=self._handed - self._finished + self._held_events,
                         dropped=self._dropped)

    def _hand_over(self) -> None:
        """The batches held, to the writer thread as one job; the next ones are held for
        HAND_EVERY (a quiet server's next line is handed over at once)."""
        if not self._held:
            return
        self._hand_at = trio.current_time() + HAND_EVERY
        batches, events = self._held, self._held_events
        self._held, self._held_events = [], 0
        self._handed += events
        self._send(("write", batches, events))

    def _send(self, job: _Job) -> None:
        if self._writer is None or self._writer_pid != os.getpid():
            self._writer = threading.Thread(target=self._run, name=f"moxy-{self.name}-log",
                                            daemon=True)
            self._writer_pid = os.getpid()
            self._writer.start()
        self._jobs.put(job)

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            what, batches, count = self._jobs.get()
            try:
                if what == "write":
                    self._write(batches, count)
                elif what == "reopen":
                    self._open()
                else:
                    if self._fd is not None:
                        os.close(self._fd)
                        self._fd = None
                    return
            except Exception:  # a bug: it must not stop the thread (nor mail)
                self._dropped += count
                logger.exception("message log %s: %s failed", self.path or "(stderr)", what)
            finally:
                self._finished += count

    def _write(self, batches: list[Sequence[DeliveryEvent]], count: int) -> None:
        data = [self._lines(batch) for batch in batches]
        if not self._opened or (
            self.path is not None and self._fd is None
            and time.monotonic() - self._last_open >= OPEN_RETRY
        ):
            self._open()
        torn = self._torn
        if torn:  # end the line a failed write cut short: the next does not run into it
            data.insert(0, b"\n")
        try:
            if self.path is not None and self._fd is None:
                raise _Unwritten(0, OSError("the file could not be opened"))
            _write(self._fd, data)
        except _Unwritten as failed:
            # What went out counts as written, line by line (one event a line); a line cut
            # short is ended by the next write.
            out = b"".join(data)[: failed.written]
            lines = out.count(b"\n") - (1 if torn and out else 0)
            self._torn = (not out.endswith(b"\n")) if out else torn
            if not self._failing:
                self._failing = True
                self._dropped_before = self._dropped
                error = failed.error
                logger.error("cannot write the message log %s: %s; dropping events until "
                             "it works again", self.path or "(stderr)", error.strerror or error)
            self._dropped += max(count - lines, 0)
            return
        self._torn = False
        if self._failing:
            self._failing = False
            logger.warning("message log %s is written again; %s dropped meanwhile",
                           self.path or "(stderr)",
                           plural(self._dropped - self._dropped_before, "event"))

    def _lines(self, batch: Sequence[DeliveryEvent]) -> bytes:
        data = None if self.json else _encode_lines(batch)
        if data is None:  # JSON, pure Python, or a batch the C formatter leaves to Python
            text = json_lines(batch) if self.json else log_lines(batch)
            data = text.encode("utf-8", "replace")
        return data

    def _open(self) -> None:
        """Open (or reopen) the path; on failure keep the old file, if any, and say so."""
        self._opened = True
        if self.path is None:
            return
        self._last_open = time.monotonic()
        try:
            fd = _open_append(self.path)
        except OSError as exc:
            if not self._open_failing:  # once per outage: retried at most once a second
                self._open_failing = True
                logger.error("cannot open the message log %s: %s", self.path,
                             exc.strerror or exc)
            return
        self._open_failing = False
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


class _Unwritten(Exception):
    """A write failed (`error`) after `written` bytes had gone out."""

    def __init__(self, written: int, error: OSError) -> None:
        super().__init__(written, error)
        self.written = written
        self.error = error


def _write(fd: int | None, data: list[bytes]) -> None:
    """One writev() per job (looping only on a short write); _Unwritten if one fails."""
    if fd is None:
        try:
            sys.stderr.write(b"".join(data).decode("utf-8", "replace"))
            sys.stderr.flush()
        except OSError as exc:
            raise _Unwritten(0, exc) from None
        return
    parts = [memoryview(part) for part in data if part]
    total = 0
    while parts:
        try:
            written = os.writev(fd, parts[:_IOV_MAX])
        except OSError as exc:
            raise _Unwritten(total, exc) from None
        total += written
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if written:
            parts[0] = parts[0][written:]
