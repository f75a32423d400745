"""The per-message/per-leg text log, written by one task so sessions never wait on the disk.

Sessions hand events over with `emit()` (never blocks); a writer task drains the channel and
writes batches from a worker thread. If the disk stalls long enough to fill the buffer, events
are counted as dropped and reported, rather than stalling mail.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

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
        path = self.path
        stream: TextIO = sys.stderr
        if path is not None:
            stream = await trio.to_thread.run_sync(_open_append, path)
        try:
            async for event in self._receive:
                batch = [event.to_log_line()]
                while len(batch) < 512:
                    try:
                        batch.append(self._receive.receive_nowait().to_log_line())
                    except trio.WouldBlock:
                        break
                text = "\n".join(batch) + "\n"
                await trio.to_thread.run_sync(_write, stream, text)
        finally:
            with trio.CancelScope(shield=True):
                rest = []
                while True:
                    try:
                        rest.append(self._receive.receive_nowait().to_log_line())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if rest:
                    await trio.to_thread.run_sync(_write, stream, "\n".join(rest) + "\n")
                if stream is not sys.stderr:
                    await trio.to_thread.run_sync(stream.close)


def _open_append(path: Path) -> TextIO:
    return open(path, "a", encoding="utf-8", buffering=1 << 16)


def _write(stream: TextIO, text: str) -> None:
    stream.write(text)
    stream.flush()
