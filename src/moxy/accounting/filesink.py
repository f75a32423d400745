"""The "file" accounting sink: the message log, one line per event, text or JSON.

Each batch is one write() on an O_APPEND file, from a worker thread, so that the batches of
several worker processes sharing the file never interleave inside a line. `reopen` (SIGUSR1)
opens the path again, after logrotate has moved the old file away. Without a path it writes to
standard error.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from moxy.accounting.base import SinkStats
from moxy.accounting.events import DeliveryEvent
from moxy.accounting.settings import FileSinkSettings

logger = logging.getLogger("moxy.accounting.file")


class FileSink:
    def __init__(self, settings: FileSinkSettings, name: str = "file") -> None:
        self.name = name
        self.path = settings.path
        self.json = settings.format == "json"
        self._fd: int | None = None
        self._opened = False
        self._failing = False  # in a write outage (disk full, ...): logged once
        self._open_failing = False
        self._dropped = 0
        # One thread at a time; a thread abandoned at shutdown still holds it until it returns.
        self._limiter = trio.CapacityLimiter(1)

    def _line(self, event: DeliveryEvent) -> str:
        return event.to_json() if self.json else event.to_log_line()

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        text = "".join(self._line(event) + "\n" for event in batch)
        if not self._opened:
            await self._open()
        try:
            if self.path is not None and self._fd is None:
                raise OSError("the file could not be opened")
            await self._thread(_write, self._fd, text)
        except OSError as exc:
            self._dropped += len(batch)
            if not self._failing:
                self._failing = True
                logger.error("cannot write the message log %s: %s; dropping events until "
                             "it works again", self.path or "(stderr)", exc.strerror or exc)
            return
        if self._failing:
            self._failing = False
            logger.warning("message log %s is written again; %d events were dropped",
                           self.path or "(stderr)", self._dropped)

    async def tick(self) -> None:
        if self.path is not None and self._fd is None:
            await self._open()  # the path could not be opened: try again

    async def reopen(self) -> None:
        if self.path is None:
            return
        logger.info("reopening the message log %s", self.path)
        await self._open()

    async def aclose(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            await self._thread(_close, fd)

    def stats(self) -> SinkStats:
        return SinkStats(backlog=0, dropped=self._dropped)

    async def _open(self) -> None:
        """Open (or reopen) the path; on failure keep the old file, if any, and say so."""
        self._opened = True
        if self.path is None:
            return
        try:
            fd = await trio.to_thread.run_sync(
                _open_append, self.path, limiter=self._limiter, abandon_on_cancel=True
            )
        except OSError as exc:
            if not self._open_failing:  # once per outage: tick tries again every second
                self._open_failing = True
                logger.error("cannot open the message log %s: %s", self.path,
                             exc.strerror or exc)
            return
        self._open_failing = False
        old, self._fd = self._fd, fd
        if old is not None:
            await self._thread(_close, old)

    async def _thread(self, function: Callable[[int | None, str], None] | Callable[[int], None],
                      *args: object) -> None:
        # Abandoned on cancellation (shutdown, bounded): a stuck disk must not hang the exit.
        await trio.to_thread.run_sync(
            function, *args, limiter=self._limiter, abandon_on_cancel=True  # type: ignore[arg-type]
        )


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def _close(fd: int) -> None:
    os.close(fd)


def _write(fd: int | None, text: str) -> None:
    """One write() per batch (looping only on a short write)."""
    if fd is None:
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = memoryview(text.encode("utf-8", "replace"))
    while data:
        data = data[os.write(fd, data) :]
