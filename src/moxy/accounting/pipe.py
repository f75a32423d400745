"""The frames on the pipes between the serving process and its accounting process
(moxy.accounting.remote and moxy.accounting.host).

A frame is one kind byte, a 4-byte big-endian payload length and the payload:

- to the accounting process: CONFIG (the pickled `Config`, first and once), EVENTS (events,
  at most `FRAME_EVENTS` of them, packed as they came by a `packer`: moxy.accounting.packing),
  REOPEN (SIGUSR1; empty);
- back, about once a second: STATS (marshalled: the number of events received so far, and per
  sink its backlog and drops).

The serving process ends the conversation by closing the accounting process's standard input.
"""

from __future__ import annotations

import contextlib
import fcntl
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from moxy.accounting import packing
from moxy.accounting.events import LEG_AND_MESSAGE

# The native build's packing (C, moxy.accounting._packer and _frames): the same bytes, a
# fraction of the cost.
_Packer: type[packing.Packer]
_UNPACK: Callable[[bytes], list[tuple[Any, ...]]]
try:
    from moxy.accounting._packer import Packer as _Packer  # type: ignore[assignment]
except ImportError:  # pure Python
    _Packer = packing.Packer
try:
    from moxy.accounting._frames import unpack as _UNPACK
except ImportError:  # pure Python
    _UNPACK = packing.unpack

CONFIG = b"C"
EVENTS = b"E"
REOPEN = b"R"
STATS = b"S"

MAX_FRAME = 64 << 20  # bytes: a longer frame is a bug on the other side, not data
# Entries (events, or a message's LEG_AND_MESSAGE pair) gathered that make the serving process
# send them, sooner than `[accounting] interval`: sent while they are still in the CPU's caches.
SEND_AT = 128
# Entries per EVENTS frame at most, and bytes after which a frame ends, which bound a frame's
# size (a few hundred KiB, far below MAX_FRAME): a batch is one frame unless the serving
# process gathered a great many before it could send them.
FRAME_EVENTS = 4096
FRAME_BYTES = 1 << 20
_HEAD = struct.Struct(">cI")
# Bytes the pipe to the accounting process is asked to hold (F_SETPIPE_SZ; 1 MiB is Linux's
# default ceiling for an unprivileged process): at 90 to 200 bytes a packed entry, over half a
# second of a busy server's events, so that the accounting process can read it a few times a
# second instead of being woken by every write (see moxy.accounting.host).
PIPE_SIZE = 1 << 20


class FrameError(Exception):
    """The other side sent something that is not a frame."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def packer(wake_at: int, limit: int, wake: Callable[[], None],
           refuse: Callable[[tuple[Any, ...]], None]) -> packing.Packer:
    """Where the serving process's events go: a Packer of EVENTS frames (in C where built),
    whose `put` packs an entry while fewer than `limit` are packed (`wake()` at the
    `wake_at`-th), and hands it to `refuse` otherwise."""
    return _Packer(EVENTS, wake_at, limit, wake, refuse, LEG_AND_MESSAGE, FRAME_EVENTS,
                   FRAME_BYTES)


def _never(*_: object) -> None:
    raise AssertionError("add() neither wakes nor refuses")


def events_frames(events: list[tuple[Any, ...]]) -> bytes:
    """The EVENTS frames of `events` (for tests and benchmarks)."""
    frames = packer(0, 0, _never, _never)
    for event in events:
        frames.add(tuple(event))
    return frames.take()


def unpack_events(payload: bytes) -> list[tuple[Any, ...]]:
    """The events of an EVENTS frame's payload; FrameError when it is not one."""
    try:
        return _UNPACK(payload)
    except ValueError as exc:
        raise FrameError(f"an EVENTS frame that does not unpack ({exc})") from None


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
