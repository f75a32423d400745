"""The per-message/per-leg text log, written by one task so sessions never wait on the disk.

Sessions hand events over with `emit()` (never blocks); a writer task drains the channel and
writes batches from a worker thread. If the disk stalls long enough to fill the buffer, events
are counted as dropped and reported, rather than stalling mail.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import trio

from moxy.accounting.events import DeliveryEvent

logger = logging.getLogger("moxy.log")


class TextLog:
    def __init__(self, path: Path | None, buffer: int = 10000) -> None:
        self.path = path
        self._send, self._receive = trio.open_memory_channel[DeliveryEvent](buffer)
        self.dropped = 0

    def emit(self, event: DeliveryEvent) -> None:
        try:
            self._send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.error("text log is not keeping up: %d events dropped", self.dropped)

    async def run(self) -> None:
        """Write events until cancelled; flushes what it has before returning."""
        fd = None if self.path is None else await trio.to_thread.run_sync(_open_append, self.path)
        try:
            async for event in self._receive:
                batch = [event.to_log_line()]
                while len(batch) < 512:
                    try:
                        batch.append(self._receive.receive_nowait().to_log_line())
                    except trio.WouldBlock:
                        break
                await trio.to_thread.run_sync(_write, fd, "\n".join(batch) + "\n")
        finally:
            with trio.CancelScope(shield=True):
                rest = []
                while True:
                    try:
                        rest.append(self._receive.receive_nowait().to_log_line())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if rest:
                    await trio.to_thread.run_sync(_write, fd, "\n".join(rest) + "\n")
                if fd is not None:
                    os.close(fd)


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def _write(fd: int | None, text: str) -> None:
    """One write() per batch on an O_APPEND file: batches of several worker processes sharing
    the file never interleave inside a line."""
    if fd is None:
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = memoryview(text.encode("utf-8", "replace"))
    while data:
        data = data[os.write(fd, data) :]
