"""The frames on the pipes between the serving process and its accounting process
(moxy.accounting.remote and moxy.accounting.host).

A frame is one kind byte, a 4-byte big-endian payload length and the payload:

- to the accounting process: CONFIG (the pickled `Config`, first and once), EVENTS (a marshalled
  list of events as plain tuples, at most `FRAME_EVENTS` of them), REOPEN (SIGUSR1; empty);
- back, about once a second: STATS (marshalled: the number of events received so far, and per
  sink its backlog and drops).

The serving process ends the conversation by closing the accounting process's standard input.
"""

from __future__ import annotations

import contextlib
import fcntl
import marshal
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import trio

CONFIG = b"C"
EVENTS = b"E"
REOPEN = b"R"
STATS = b"S"

MAX_FRAME = 64 << 20  # bytes: a longer frame is a bug on the other side, not data
# Events per EVENTS frame. marshal keeps a table of the objects it has written (the events of a
# message share most of theirs); past a few hundred events that table outgrows the CPU's
# caches: 512 events per call cost twice the time per event of 128.
FRAME_EVENTS = 128
_HEAD = struct.Struct(">cI")
# Bytes the pipe to the accounting process is asked to hold (F_SETPIPE_SZ; 1 MiB is Linux's
# default ceiling for an unprivileged process): at about 160 bytes per event, over half a
# second of a busy server's events, so that the accounting process can read it a few times a
# second instead of being woken by every write (see moxy.accounting.host).
PIPE_SIZE = 1 << 20


class FrameError(Exception):
    """The other side sent something that is not a frame."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def events_frames(events: Sequence[tuple[Any, ...]]) -> bytes:
    """EVENTS frames of up to FRAME_EVENTS events each, as plain tuples (marshal refuses
    tuple subclasses such as DeliveryEvent; `tuple()` of a plain tuple is that tuple)."""
    return b"".join([
        frame(EVENTS, marshal.dumps(list(map(tuple, events[start:start + FRAME_EVENTS]))))
        for start in range(0, len(events), FRAME_EVENTS)
    ])


def widen(fd: int) -> None:
    """Ask the pipe `fd` to hold PIPE_SIZE bytes (the system may refuse: a user's pipes beyond
    /proc/sys/fs/pipe-user-pages-soft get the default size; `capacity` tells)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def capacity(fd: int) -> int:
    """What the pipe `fd` holds (0 when `fd` is not a pipe)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except OSError:
        return 0


async def frames(stream: trio.abc.ReceiveStream) -> AsyncIterator[tuple[bytes, bytes]]:
    """(kind, payload) of each frame until the other side closes; FrameError for garbage or
    a frame cut short."""
    buffer = bytearray()
    while True:
        # The frames of one read (the accounting process reads many at a time) are cut out
        # by offset, and what they took is removed from the buffer once, after them.
        start = 0
        while len(buffer) - start >= _HEAD.size:
            kind, size = _HEAD.unpack_from(buffer, start)
            if kind not in (CONFIG, EVENTS, REOPEN, STATS) or size > MAX_FRAME:
                raise FrameError(f"not a frame: kind {kind!r}, {size} bytes")
            end = start + _HEAD.size + size
            if len(buffer) < end:
                break
            with memoryview(buffer) as view:
                payload = bytes(view[start + _HEAD.size:end])
            start = end
            yield kind, payload
        del buffer[:start]
        data = await stream.receive_some(1 << 16)
        if not data:
            if buffer:
                raise FrameError(f"the stream ended inside a frame ({len(buffer)} bytes)")
            return
        buffer += data
