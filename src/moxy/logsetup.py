"""The daemon's own log (not the message log): standard error, one format, for the serving
processes and the accounting process alike."""

from __future__ import annotations

import logging
import math
import sys
import time


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s moxy[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


def plural(count: int, noun: str) -> str:
    """"1 event", "3 events": a count and its noun for the daemon's log and the tools'
    messages (every noun used takes a plain -s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class Throttle:
    """Something that may happen many times a second, said in the log at most once every
    `interval` seconds: `due()` counts one occurrence and returns how many there were since it
    was last said when it is time to say it again, else 0. A flood must not flood the log."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.count = 0
        self.last = -math.inf

    def due(self) -> int:
        self.count += 1
        now = time.monotonic()
        if now - self.last < self.interval:
            return 0
        count, self.count, self.last = self.count, 0, now
        return count
