"""What the accounting tests share: reading log lines back, and sinks written for tests."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from moxy.accounting.base import SinkStats
from moxy.accounting.events import DeliveryEvent


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Writes past `size` bytes fail with EFBIG, as on a full disk with ENOSPC (what fits of
    a write goes out first). For the whole process while it lasts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


_FIELD_RE = re.compile(r" (?=[a-z]+=)")


def parse_text_line(line: str) -> dict[str, Any]:
    """A text log line as the JSON record of the same event (to_dict's names and types)."""
    head, sep, reply = line.partition(' reply="')
    assert sep and reply.endswith('"'), line
    stamp, kind, fields = head.split(" ", 2)
    values = dict(part.split("=", 1) for part in _FIELD_RE.split(" " + fields)[1:])

    def text(key: str) -> str:
        return "" if values[key] == "-" else values[key]

    to = values["to"]
    return {
        "time": stamp,
        "kind": kind,
        "node": text("node"),
        "session": values["session"],
        "id": text("id"),
        "client": values["client"],
        "helo": text("helo"),
        "from": values["from"].removeprefix("<").removesuffix(">"),
        "to": [] if to == "-" else [t.strip("<>") for t in to.split(",")],
        "dest": values["dest"],
        "route": text("route"),
        "size": int(values["size"]),
        "code": int(values["code"]),
        "stage": values["stage"],
        "reason": text("reason"),
        "tls": text("tls"),
        "duration": float(values["duration"]),
        "reply": reply[:-1],
    }


def text_records(path: Path) -> list[dict[str, Any]]:
    try:
        return [parse_text_line(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


def json_records(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


class GatedSink:
    """A sink whose writes wait until the test opens the gate: a stuck disk or backend."""

    def __init__(self, name: str = "gated", delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay  # seconds each write takes once the gate is open
        self.gate = trio.Event()
        self.written: list[DeliveryEvent] = []
        self.writes = 0
        self.closed = False

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        self.writes += 1
        await self.gate.wait()
        await trio.sleep(self.delay)
        self.written.extend(batch)

    async def tick(self) -> None:
        pass

    async def reopen(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True

    def stats(self) -> SinkStats:
        return SinkStats()
