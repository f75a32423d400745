"""The GDBM accounting log (the original Moxy's): running totals per destination and per
recipient address, and the reader `moxystats --gdbm` uses while Moxy keeps writing the file.

Key `dest:<host:port>` or `rcpt:<address>`; value ASCII `"<messages> <bytes> <first> <last>"`
(first and last seen as Unix seconds). Only delivered copies (2xx legs) are counted.
"""

from __future__ import annotations

import dbm.gnu
import errno
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from moxy.accounting.base import SinkStats
from moxy.accounting.counters import normal_address
from moxy.accounting.events import DeliveryEvent
from moxy.accounting.settings import GdbmSinkSettings
from moxy.logsetup import plural

log = logging.getLogger("moxy.accounting")

MAX_PENDING = 100_000  # distinct keys held while the file cannot be written
_BUSY_TRIES = 20  # another writer (a second worker process) holds the lock: wait a little
_BUSY_WAIT = 0.02


@attrs.frozen
class Totals:
    """One key's running totals."""

    messages: int
    size: int  # bytes
    first_seen: int  # Unix seconds
    last_seen: int

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.messages + other.messages,
            self.size + other.size,
            min(self.first_seen, other.first_seen),
            max(self.last_seen, other.last_seen),
        )

    def encode(self) -> bytes:
        return f"{self.messages} {self.size} {self.first_seen} {self.last_seen}".encode()

    @classmethod
    def decode(cls, raw: bytes) -> Totals:
        """ValueError unless `raw` is four non-negative decimal integers."""
        parts = raw.split()
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not '<messages> <bytes> <first> <last>': {raw[:80]!r}")
        return cls(*(int(p) for p in parts))


class GdbmSink:
    """A `Sink` keeping the GDBM log's totals.

    The file is opened, updated and closed on each flush (every `flush_interval`), so it is
    locked only for those milliseconds; readers open it without a lock (`read_log`). Totals
    are summed in memory meanwhile; a file that cannot be written is logged once, retried on
    each later flush, and at most `MAX_PENDING` keys are held (events beyond are dropped and
    counted).
    """

    name = "gdbm"

    def __init__(self, settings: GdbmSinkSettings) -> None:
        self.settings = settings
        self.gather = settings.flush_interval / 20  # as RedisSink.gather
        self._limiter = trio.CapacityLimiter(1)
        # Per key, [messages, bytes, first, last], added to in place (one list per key, not a
        # Totals per event); made Totals when written.
        self._pending: dict[bytes, list[int]] = {}
        # The encoded keys of a (destination, recipients): the same few, event after event.
        self._keys: dict[tuple[str, tuple[str, ...]], list[bytes]] = {}
        self._dropped = 0
        self._failing = False
        self._unwritable = False  # a write failed (logged once), the sums are kept
        self._damaged = False  # GDBM said the file is malformed (logged once), sums dropped
        self._dropped_before = 0  # self._dropped when the failure began
        self._next_flush: float | None = None

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        pending, known = self._pending, self._keys
        for event in batch:
            if event.kind != "leg" or not 200 <= event.code < 300:  # event.delivered
                continue
            where = (event.destination, event.recipients)
            encoded = known.get(where)
            if encoded is None:
                encoded = self._encoded(where)
            if len(pending) + len(encoded) > MAX_PENDING and (
                len(pending) + sum(1 for k in encoded if k not in pending) > MAX_PENDING
            ):
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.error("accounting: GDBM log %s not writable, %s dropped",
                              self.settings.path, plural(self._dropped, "event"))
                continue
            when, size = int(event.time), event.size
            for key in encoded:
                entry = pending.get(key)
                if entry is None:
                    pending[key] = [1, size, when, when]
                    continue
                entry[0] += 1
                entry[1] += size
                if when < entry[2]:
                    entry[2] = when
                if when > entry[3]:
                    entry[3] = when

    def _encoded(self, where: tuple[str, tuple[str, ...]]) -> list[bytes]:
        destination, recipients = where
        if len(self._keys) >= 4096:
            self._keys.clear()
        addresses = dict.fromkeys(normal_address(r) for r in recipients)
        keys = [f"dest:{destination}", *(f"rcpt:{r}" for r in addresses)]
        encoded = self._keys[where] = [k.encode("utf-8", "surrogateescape") for k in keys]
        return encoded

    async def tick(self) -> None:
        now = trio.current_time()
        if self._next_flush is None:
            self._next_flush = now + self.settings.flush_interval
        if self._pending and now >= self._next_flush:
            await self._flush()

    async def reopen(self) -> None:
        """Nothing held open: each flush opens the file by name, so a moved file is left be."""

    async def aclose(self) -> None:
        if self._pending:
            await self._flush()
        if self._pending:
            log.error("accounting: GDBM log %s: %d totals not written at shutdown",
                      self.settings.path, len(self._pending))

    def stats(self) -> SinkStats:
        return SinkStats(backlog=len(self._pending), dropped=self._dropped)

    async def _flush(self) -> None:
        self._next_flush = trio.current_time() + self.settings.flush_interval
        pending, self._pending = self._pending, {}
        try:
            # _merge removes each key from `pending` once stored: what is left was not written.
            await trio.to_thread.run_sync(self._merge, pending, limiter=self._limiter)
        except (OSError, dbm.gnu.error) as exc:
            if not self._failing:
                self._failing = True
                self._dropped_before = self._dropped
            if _damaged(exc):
                # Retrying cannot help, and holding the sums would only hide it: drop them,
                # counted; later flushes try again (the file may be repaired or moved away).
                lost = _events_in(pending)
                self._dropped += lost
                if not self._damaged:
                    self._damaged = True
                    log.error("accounting: GDBM log %s is damaged (%s): totals are dropped "
                              "until it is repaired or moved away (%d now, of %s)",
                              self.settings.path, exc, len(pending), plural(lost, "event"))
                return
            for key, entry in pending.items():  # not written: keep them for next time
                old = self._pending.get(key)
                if old is not None:
                    entry = [entry[0] + old[0], entry[1] + old[1], min(entry[2], old[2]),
                             max(entry[3], old[3])]
                self._pending[key] = entry
            if not self._unwritable:
                self._unwritable = True
                log.error("accounting: cannot write GDBM log %s, keeping %d totals: %s",
                          self.settings.path, len(self._pending), exc)
            return
        if self._failing:
            self._failing = self._damaged = self._unwritable = False
            log.warning("accounting: GDBM log %s writable again, %s dropped meanwhile",
                        self.settings.path, plural(self._dropped - self._dropped_before, "event"))

    def _merge(self, pending: dict[bytes, list[int]]) -> None:
        """In the worker thread: add `pending` to the file in one open-update-close, removing
        each key from `pending` once stored, so that a flush failing part-way (a full disk)
        leaves only what was not written, and nothing is added twice. A key whose store
        succeeded counts as written even if the sync after it fails: a total may then fall
        short, never grow beyond what was delivered."""
        db = _open_for_writing(self.settings.path)
        try:
            for key, entry in list(pending.items()):
                totals = Totals(*entry)
                raw = db.get(key)
                if raw is not None:
                    try:
                        totals = Totals.decode(raw) + totals
                    except ValueError as exc:
                        log.error("accounting: GDBM log %s: %s replaced: %s",
                                  self.settings.path, key.decode("utf-8", "replace"), exc)
                db[key] = totals.encode()
                del pending[key]
            db.sync()
        finally:
            db.close()


def _damaged(exc: BaseException) -> bool:
    """A GDBM error of its own (a malformed file, a foreign one), not a system call's (no
    space, permissions, the lock): GDBM's errors about the file carry no errno."""
    return isinstance(exc, dbm.gnu.error) and not exc.errno


def _events_in(pending: dict[bytes, list[int]]) -> int:
    """How many events the sums are of: each has one `dest:` key (when only recipients'
    sums are left, the events of the largest)."""
    dests = sum(entry[0] for key, entry in pending.items() if key.startswith(b"dest:"))
    return dests or max((entry[0] for entry in pending.values()), default=0)


def _open_for_writing(path: Path) -> Any:  # dbm.gnu's handle type is private
    """Open (creating) with the writer's lock, waiting briefly while another writer holds it.
    "f": no sync per store; the one sync before close makes the flush durable."""
    for attempt in range(_BUSY_TRIES):
        try:
            return dbm.gnu.open(str(path), "cf", 0o644)
        except dbm.gnu.error as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES) or attempt == _BUSY_TRIES - 1:
                raise
            time.sleep(_BUSY_WAIT)
    raise AssertionError("unreachable")


# --- reading, while Moxy writes ----------------------------------------------------------


class GdbmLogError(Exception):
    """The log cannot be read (missing, not GDBM, malformed after retries)."""


def read_log(path: Path, *, tries: int = 10, wait: float = 0.05) -> dict[str, Totals]:
    """Every key's totals. The file is opened read-only without a lock ("ru"), so a reader
    never stops Moxy from writing; a read that meets a half-written update (a GDBM error or a
    malformed value) is retried up to `tries` times, `wait` seconds apart."""
    if not path.is_file():
        raise GdbmLogError(f"{path}: no such file")
    problem = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(wait)
        try:
            with dbm.gnu.open(str(path), "ru") as db:
                result: dict[str, Totals] = {}
                key = db.firstkey()
                while key is not None:
                    result[key.decode("utf-8", "surrogateescape")] = Totals.decode(db[key])
                    key = db.nextkey(key)
                return result
        except (dbm.gnu.error, OSError, KeyError, ValueError) as exc:
            problem = str(exc) or type(exc).__name__
    raise GdbmLogError(f"{path}: cannot read GDBM log: {problem}")
