"""The daemon's own log (not the message log): standard error, one format, for the serving
processes and the accounting process alike."""

from __future__ import annotations

import logging
import sys


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
