"""GDBM routes (`dbm.gnu`): key = lookup key, value = destinations in the routes-file syntax.

`make_db` builds the database from a routes file the way Postfix's postmap does: validate every
line, write a temporary file beside the target, fsync, rename over it; it records its count of
routes. `GdbmSource` reads a private copy of it (`open_private`: a file changed in place under
GDBM's memory map would kill the process), checked (not truncated, every route readable), and
copies it again when it has been replaced, so a running Moxy follows `moxy makedb` without a
restart; its `on_change` hook tells the route cache to forget what the old file said.
"""

from __future__ import annotations

import dbm.gnu
import functools
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from moxy.lookup.base import BadRouteData, DestinationGroup, LookupFailed, parse_destinations
from moxy.lookup.blocking import run_blocking
from moxy.lookup.file import FileSource, RoutesFileError

log = logging.getLogger("moxy.lookup")

T = TypeVar("T")

# What identifies one version of the file: a rename gives a new inode, an in-place rewrite a new
# mtime or size.
_FileIdentity = tuple[int, int, int, int]

# The number of routes, as `make_db` wrote it: a key no lookup can ask for (lookup keys never
# hold a NUL). A file that has it must hold that many routes, readable.
COUNT_KEY = b"\x00moxy:routes"

# GDBM's file header: its magic numbers (native byte order), and where the end of the space the
# database uses (`next_block`) is in the header of each. A file shorter than that is truncated.
_NEXT_BLOCK = {0x13579ACE: ("<i", 28), 0x13579ACD: ("<i", 28),  # 32-bit offsets
               0x13579ACF: ("<q", 32), 0x13579AD0: ("<i", 28),  # 64-bit; numsync 32-bit
               0x13579AD1: ("<q", 32)}  # numsync, 64-bit offsets
_PRIVATE = Path("/proc/self/fd")


class DamagedFile(Exception):
    """A GDBM file that opens but is truncated, or whose routes are not all readable."""


class _Changing(Exception):
    """The file changed while it was being copied: being written, try again later."""


def _identity(st: os.stat_result) -> _FileIdentity:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _check_header(head: bytes, size: int) -> None:
    if len(head) < 40:
        return  # not GDBM: dbm.gnu.open says so
    magic = struct.unpack_from("<I", head)[0]
    where = _NEXT_BLOCK.get(magic)
    if where is None:
        return
    next_block = struct.unpack_from(where[0], head, where[1])[0]
    if size < next_block:
        raise DamagedFile(f"truncated: {size} of its {next_block} bytes")


def _check_count(db: Any) -> None:
    """A file `make_db` wrote names its count of routes: walk them (every bucket is read)."""
    recorded = db.get(COUNT_KEY)
    if recorded is None:
        return  # written by another tool: nothing to check against
    try:
        expected = int(recorded)
    except ValueError:
        raise DamagedFile(f"damaged: a route count of {recorded[:20]!r}") from None
    found, key = 0, db.firstkey()
    while key is not None:
        found += 1
        key = db.nextkey(key)
    if found - 1 != expected:
        raise DamagedFile(f"damaged: {max(found - 1, 0)} of its {expected} routes readable")


def reason(exc: BaseException) -> str:
    """Why opening a GDBM file failed, for a message: an OSError's strerror; dbm.gnu.error is
    an OSError whose strerror is None and whose message is its argument ('Unexpected end of
    file' for a file that is not GDBM)."""
    strerror = getattr(exc, "strerror", None)
    return str(strerror or (exc.args[-1] if exc.args else exc))


def check_db(path: str | os.PathLike[str]) -> None:
    """Open and check the GDBM file at `path`, as a running Moxy does before it uses one:
    dbm.gnu.error or OSError (not GDBM, unreadable), DamagedFile (truncated, or fewer routes
    readable than `make_db` wrote)."""
    open_private(Path(path))[0].close()


def open_private(path: Path) -> tuple[Any, _FileIdentity]:
    """A read-only handle on a private copy of the GDBM file at `path`, checked, and the
    identity of the version copied.

    GDBM maps its file into memory: a file rewritten or truncated in place (`cp new.db
    routes.db`, an interrupted write, a full disk) under an open handle kills the process with
    SIGBUS at the next lookup. A copy nobody else can reach (an unlinked temporary file, opened
    through /proc/self/fd) cannot be changed under Moxy; a new version is copied again."""
    with open(path, "rb") as original:
        st = os.fstat(original.fileno())
        if not _PRIVATE.is_dir():  # no /proc: the file itself, as before
            _check_header(original.read(64), st.st_size)
            db = dbm.gnu.open(str(path), "ru")  # noqa: SIM115 (the caller keeps it)
            _verified(db)
            return db, _identity(st)
        with tempfile.TemporaryFile(prefix="moxy-routes.") as copy:
            shutil.copyfileobj(original, copy, 1 << 20)
            copy.flush()
            after = os.fstat(original.fileno())
            if (after.st_mtime_ns, after.st_size) != (st.st_mtime_ns, st.st_size):
                raise _Changing(f"{path} changed while it was read")
            copy.seek(0)
            _check_header(copy.read(64), after.st_size)
            db = dbm.gnu.open(f"{_PRIVATE}/{copy.fileno()}", "ru")  # noqa: SIM115 (kept)
    _verified(db)
    return db, _identity(st)


def _verified(db: Any) -> None:
    try:
        _check_count(db)
    except BaseException:
        db.close()
        raise


class GdbmSource:
    """A `RouteSource` reading a GDBM file opened read-only.

    At most every `reload_interval` seconds a lookup first stats the path; when the file was
    replaced (inode, mtime or size changed) the new one is copied, checked and opened, and the
    old handle closed. If the new file cannot be opened, or is damaged, the old one keeps
    serving (and that is logged); one still being written is tried again at the next look. A
    missing or unreadable file with nothing open makes lookups fail (`LookupFailed`). After a
    replaced file was opened, `on_change()` is called (if set): answers cached from the old
    file are void.

    Every dbm call runs in a worker thread. The default limiter has one token: a gdbm handle is
    not safe to share between threads, and closing it under a reader would crash.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str = "gdbm",
        reload_interval: float = 1.0,
        timeout: float = 5.0,
        limiter: trio.CapacityLimiter | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.name = name
        self.path = Path(path)
        self.reload_interval = reload_interval
        self.timeout = timeout
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        self._clock = clock
        self._next_check = float("-inf")
        # Touched only in worker threads, one at a time (see the limiter above).
        self._db: Any = None  # dbm.gnu's handle type is private (_gdbm.gdbm)
        self._identity: _FileIdentity | None = None
        self._rejected: _FileIdentity | None = None
        self.on_change: Callable[[], object] | None = None

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        now = self._clock()
        check = now >= self._next_check
        if check:
            self._next_check = now + self.reload_interval
        raw, replaced = await self._in_thread(functools.partial(self._fetch, key, check))
        if replaced:
            self._changed()
        if raw is None:
            return None
        try:
            return parse_destinations(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise BadRouteData(f"{self.path}: value {raw!r}: {exc}") from None

    async def check(self) -> None:
        """Look for a replaced file now, as a lookup does once per `reload_interval`.

        For a task that watches the file while no lookup reaches it (the cache answers them).
        A file that cannot be opened is not reported here: the lookups that need it fail.
        """
        self._next_check = self._clock() + self.reload_interval
        try:
            replaced = await self._in_thread(self._reopen_if_replaced)
        except LookupFailed:
            return
        if replaced:
            self._changed()

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close, limiter=self._limiter)

    async def _in_thread(self, call: Callable[[], T]) -> T:
        return await run_blocking(
            call, limiter=self._limiter, timeout=self.timeout, what=f"GDBM file {self.path}"
        )

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # --- in worker threads --------------------------------------------------------------------

    def _fetch(self, key: str, check: bool) -> tuple[bytes | None, bool]:
        """The stored value, and whether a replaced file was opened first."""
        replaced = False
        if check or self._db is None:
            replaced = self._reopen_if_replaced()
        value: bytes | None = self._db.get(key.encode("utf-8"))
        return value, replaced

    def _reopen_if_replaced(self) -> bool:
        """Open the file if it is new; True when it replaced one that was open."""
        try:
            before = _identity(os.stat(self.path))
        except OSError as exc:
            if self._db is None:
                raise LookupFailed(f"cannot open {self.path}: {reason(exc)}") from None
            return False  # keep what is open: the file is being replaced, or removed by mistake
        if before == self._identity or before == self._rejected:
            if self._db is None:
                raise LookupFailed(f"cannot open {self.path}: not a usable GDBM file")
            return False
        try:
            db, before = open_private(self.path)
        except _Changing as exc:  # being written: the next look tries again
            if self._db is None:
                raise LookupFailed(f"cannot open {self.path}: {exc}") from None
            return False
        except (dbm.gnu.error, OSError, DamagedFile) as exc:
            self._rejected = before
            if self._db is None:
                raise LookupFailed(f"cannot open {self.path}: {reason(exc)}") from None
            log.error("cannot open replaced %s, still using the previous file: %s", self.path,
                      reason(exc))
            return False
        old, self._db, self._identity = self._db, db, before
        # A file replaced again between the stat and the open shows up as changed next time.
        if old is None:
            return False
        old.close()
        log.info("reopened replaced GDBM file %s", self.path)
        return True

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._identity = None


def make_db(routes_path: str | os.PathLike[str], db_path: str | os.PathLike[str]) -> int:
    """Build the GDBM file `db_path` from the routes file `routes_path`; return the entry count.

    The routes file is read and validated first (`RoutesFileError` names every bad line, or the
    file that cannot be read; nothing is written then). The database is written to a temporary
    file in the target's directory, flushed to disk and renamed over `db_path`, so readers see
    the old file or the new one, never a partial one. Values are stored in canonical form
    (`host:port`, groups separated by spaces); the file is made mode 0644.
    """
    db_path = Path(db_path)
    routes = FileSource.open(Path(routes_path)).routes
    if not routes and os.path.getsize(routes_path) == 0:
        # An editor or `>` truncates before writing: that instant must not empty the database.
        held = _routes_in(db_path)
        if held:
            raise RoutesFileError([
                f"{routes_path}: empty (0 bytes), and {db_path} holds {held} routes: not "
                f"replaced by none (remove {db_path} first to build an empty database)"
            ])
    directory = db_path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{db_path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # "n": a new, empty database over the placeholder; "f": no sync per write (done below).
        with dbm.gnu.open(tmp_name, "nf") as db:
            for key, groups in routes.items():
                db[key.encode("utf-8")] = " ".join(str(g) for g in groups).encode("utf-8")
            db[COUNT_KEY] = str(len(routes)).encode("ascii")  # what a reader checks
            db.sync()
        _fsync_path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, db_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(directory)  # make the rename itself durable
    return len(routes)


def _routes_in(db_path: Path) -> int:
    """How many routes the GDBM file at `db_path` holds (0 if it cannot be read)."""
    try:
        db = dbm.gnu.open(str(db_path), "ru")  # noqa: SIM115 (closed below)
    except (dbm.gnu.error, OSError):
        return 0
    with db:
        recorded = db.get(COUNT_KEY)
        if recorded is not None and recorded.isdigit():
            return int(recorded)
        return len(db.keys())


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
