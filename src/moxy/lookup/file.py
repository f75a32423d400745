"""The flat-file DomainDB: a routes file of `key  destinations` lines, reloaded when it changes.

`parse_routes` is the grammar alone (text → table, every bad line reported as FILE:LINE).
`FileSource` answers lookups from the table in memory and, at most once per reload interval,
re-reads the file off the event loop when its stat changed, keeping the old table on any failure.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import attrs
import trio

from moxy.lookup.base import DestinationGroup, parse_group
from moxy.lookup.idn import ascii_domain

log = logging.getLogger("moxy.routes")

RouteTable = Mapping[str, tuple[DestinationGroup, ...]]


class RoutesFileError(Exception):
    """A routes file cannot be used; `errors` holds one "FILE:LINE: message" per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# --- grammar ------------------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LITERAL_RE = re.compile(r"\[[0-9a-f:.]+\]|\[ipv6:[0-9a-f:.]+\]")
_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")


def _domain(text: str) -> str:
    """A key's domain part in the form `lookup_keys` produces: no trailing dot, A-labels."""
    domain = text[:-1] if text.endswith(".") else text
    if not domain.isascii():
        converted = ascii_domain(domain)
        if converted is None:
            raise ValueError(f"bad domain {text!r}: not a valid internationalized domain name")
        domain = converted
    if not (_DOMAIN_RE.fullmatch(domain) or _LITERAL_RE.fullmatch(domain)):
        raise ValueError(f"bad domain {text!r}")
    return domain


def parse_key(text: str) -> str:
    """Normalise one key (`user@domain`, `domain`, `.parent`, `*`, or a bare local part)."""
    key = text.lower()
    if key == "*":
        return key
    if key.startswith("*."):
        raise ValueError(f"bad key {text!r}: a parent domain is written {text[1:]!r}")
    if key.startswith("."):
        return "." + _domain(key[1:])
    if _CONTROL_RE.search(key):
        raise ValueError(f"bad key {text!r}: control character")
    local, at, domain = key.rpartition("@")
    if at:
        if not local:
            raise ValueError(f"bad key {text!r}: empty local part")
        return f"{local}@{_domain(domain)}"
    # No '@': a domain, or a bare local part such as `postmaster`; a dot makes it a domain.
    return _domain(key) if "." in key else key


def parse_routes(text: str, filename: str) -> dict[str, tuple[DestinationGroup, ...]]:
    """Parse a whole routes file; raises `RoutesFileError` naming every bad line. Keys whose
    destinations are written alike share one parsed tuple."""
    parsed = ParsedRoutes()
    # split("\n"), not splitlines(): form feeds and the like must not shift line numbers.
    written = _written_routes(lambda: iter(text.split("\n")), filename)
    return {key: parsed(destinations) for key, destinations in written.items()}


def _written_routes(lines: Callable[[], Iterator[str]], filename: str) -> dict[str, str]:
    """Each key's destinations as written (one space between groups), every one checked to
    parse, from the file's `lines()`; raises `RoutesFileError` naming every bad line.

    The table `FileSource` keeps: text, parsed when a lookup asks (`ParsedRoutes`). A table
    of parsed routes, a million customers each on a server of their own, took 725 MB, and the
    collector walked it while a reload built the next one in a thread, holding the GIL (and
    the event loop) for up to 2 s at a time; strings are no work for the collector, and what
    a line's check parses is freed at once. The lines come one at a time for the same reason:
    splitting a million lines at once is one call that holds the GIL throughout. Only if a key
    comes twice are they read again (`lines()` once more), for the line each was first on."""
    table: dict[str, str] = {}
    errors: list[tuple[int, str]] = []
    duplicates: dict[int, str] = {}  # line number: key
    # Destinations as written, checked once: the many keys routed alike (an ISP's domains on a
    # few mail hosts) share the one string.
    checked: dict[str, str] = {}
    for lineno, line in enumerate(lines(), start=1):
        words = line.partition("#")[0].split()
        if not words:
            continue
        try:
            key, written = _parse_route(words, checked)
        except ValueError as exc:
            errors.append((lineno, str(exc)))
            continue
        if key in table:
            duplicates[lineno] = key
        else:
            table[key] = written
    if duplicates:
        first = _first_lines(lines(), set(duplicates.values()))
        errors += [(lineno, f"duplicate key {key!r} (first at line {first[key]})")
                   for lineno, key in duplicates.items()]
        errors.sort()
    if errors:
        raise RoutesFileError([f"{filename}:{lineno}: {message}" for lineno, message in errors])
    return table


def _first_lines(lines: Iterator[str], keys: set[str]) -> dict[str, int]:
    """The line number of the first good line of each of `keys`."""
    first: dict[str, int] = {}
    checked: dict[str, str] = {}
    for lineno, line in enumerate(lines, start=1):
        words = line.partition("#")[0].split()
        if words:
            with contextlib.suppress(ValueError):
                key = _parse_route(words, checked)[0]
                if key in keys and key not in first:
                    first[key] = lineno
                    if len(first) == len(keys):
                        break
    return first


def _parse_route(words: list[str], checked: dict[str, str]) -> tuple[str, str]:
    """The key and its destinations as written, the same string for destinations written
    alike (`checked`: those parsed before)."""
    key = parse_key(words[0])
    if len(words) == 1:
        raise ValueError(f"key {key!r} has no destinations")
    written = " ".join(words[1:])
    known = checked.get(written)
    if known is not None:
        return key, known
    groups = _groups(written)
    seen: set[DestinationGroup] = set()
    for group in groups:
        if group in seen:
            raise ValueError(f"destination {str(group)!r} listed twice")
        seen.add(group)
    checked[written] = written
    return key, written


def _groups(written: str) -> tuple[DestinationGroup, ...]:
    return tuple(parse_group(word) for word in written.split(" "))


class ParsedRoutes:
    """Destinations as written → parsed, remembered: keys routed alike share one tuple, and a
    route looked up again is not parsed again. At most `limit` are kept (all forgotten at
    once beyond), so that a million distinct routes are never all held parsed."""

    def __init__(self, limit: int = sys.maxsize) -> None:
        self.limit = limit
        self._known: dict[str, tuple[DestinationGroup, ...]] = {}

    def __call__(self, written: str) -> tuple[DestinationGroup, ...]:
        groups = self._known.get(written)
        if groups is None:
            if len(self._known) >= self.limit:
                self._known.clear()
            groups = self._known[written] = _groups(written)
        return groups


class _ParsedView(Mapping[str, tuple[DestinationGroup, ...]]):
    """A table of written routes, read as parsed ones (`FileSource.routes`)."""

    def __init__(self, written: Mapping[str, str], parsed: ParsedRoutes) -> None:
        self._written = written
        self._parsed = parsed

    def __getitem__(self, key: str) -> tuple[DestinationGroup, ...]:
        return self._parsed(self._written[key])

    def __contains__(self, key: object) -> bool:
        return key in self._written  # not parsed to be found

    def __iter__(self) -> Iterator[str]:
        return iter(self._written)

    def __len__(self) -> int:
        return len(self._written)


# --- the source ---------------------------------------------------------------------------


@attrs.frozen
class _Signature:
    """What identifies one version of the file: a rename, rewrite or truncation changes it."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> _Signature:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@attrs.frozen
class _Snapshot:
    """One successfully parsed version of the file: each key's destinations as written."""

    routes: dict[str, str] = attrs.field(repr=False, eq=False)
    signature: _Signature


class _Unsettled(Exception):
    """The file changed while it was being read; try again at the next check."""


def _read(path: Path) -> _Snapshot:
    """Read and parse the file (blocking); the signature is that of the bytes actually read."""
    try:
        with path.open("rb") as f:
            signature = _Signature.of(os.fstat(f.fileno()))
            data = f.read()
        if _Signature.of(path.stat()) != signature:
            raise _Unsettled
    except OSError as exc:
        raise RoutesFileError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    return _Snapshot(_written_routes(lambda: _lines(data, path), str(path)), signature)


def _lines(data: bytes, path: Path) -> Iterator[str]:
    """The lines of `data` (split at LF only), decoded one at a time."""
    for lineno, line in enumerate(io.BytesIO(data), start=1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            raise RoutesFileError([f"{path}:{lineno}: not UTF-8 text"]) from None


# Parsed routes a FileSource keeps (ParsedRoutes): far more than the distinct destinations of
# a table routed to a few hosts; a table of customers each on a server of their own is parsed
# per lookup (the route cache keeps what lookups found).
PARSED_KEPT = 10_000
RELEASE_SLICE = 20_000  # routes of a replaced table freed between two checkpoints


async def _release(routes: dict[str, str]) -> None:
    """Empty `routes` (the table of a version of the routes file that a reload replaced)
    RELEASE_SLICE routes at a time, with a checkpoint in between."""
    while routes:
        for _ in range(min(RELEASE_SLICE, len(routes))):
            routes.popitem()
        await trio.sleep(0)


def _stat(path: Path) -> _Signature | None:
    try:
        return _Signature.of(path.stat())
    except OSError:
        return None


class FileSource:
    """A `RouteSource` over a routes file, kept in memory and reloaded when the file changes.

    Lookups never wait for a reload: the check runs in the lookup that finds the interval
    elapsed, and concurrent lookups meanwhile answer from the current table. A new version that
    is broken, missing or still being written leaves the current table in place; each such
    version is logged once. After a new version was loaded, `on_change()` is called (if set):
    answers cached from the old one are void.
    """

    name = "file"

    def __init__(self, path: Path, reload_interval: float, snapshot: _Snapshot) -> None:
        self.path = path
        self.reload_interval = reload_interval
        self._snapshot = snapshot
        self._parsed = ParsedRoutes(PARSED_KEPT)
        self._seen: _Signature | None = snapshot.signature  # last version looked at
        self._next_check = -math.inf
        self._checking = False
        self.on_change: Callable[[], object] | None = None

    @classmethod
    def open(cls, path: str | Path, reload_interval: float = 1.0) -> FileSource:
        """Load the file now (blocking, before serving); raises `RoutesFileError`."""
        path = Path(path)
        for _attempt in range(5):
            try:
                return cls(path, reload_interval, _read(path))
            except _Unsettled:
                continue
        raise RoutesFileError([f"{path}: keeps changing while being read"])

    @property
    def routes(self) -> RouteTable:
        """The table currently served (read-only; each route parsed when read)."""
        return _ParsedView(self._snapshot.routes, self._parsed)

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        await self._maybe_reload()
        written = self._snapshot.routes.get(key.lower())
        return None if written is None else self._parsed(written)

    async def _maybe_reload(self) -> None:
        if trio.current_time() >= self._next_check:
            await self.check()

    async def check(self) -> None:
        """Look at the file now and reload it if it changed, as a lookup does once per
        `reload_interval`; for a task that watches the file while no lookup reaches it."""
        if self._checking:
            return
        self._checking = True
        try:
            await self._check()
        finally:
            self._next_check = trio.current_time() + self.reload_interval
            self._checking = False

    async def _check(self) -> None:
        signature = await trio.to_thread.run_sync(_stat, self.path)
        if signature == self._seen:
            return
        if signature is None:
            self._seen = None
            log.error("routes file %s is missing; keeping the %d routes loaded before",
                      self.path, len(self.routes))
            return
        try:
            snapshot = await trio.to_thread.run_sync(_read, self.path)
        except _Unsettled:
            return  # being written: look again at the next check
        except RoutesFileError as exc:
            self._seen = signature
            log.error("routes file %s not reloaded, keeping the %d routes loaded before: %s",
                      self.path, len(self.routes), "; ".join(exc.errors))
            return
        self._seen = snapshot.signature
        if not snapshot.routes and self.routes and snapshot.signature.size == 0:
            # An editor or `>` truncates before writing; serving that instant would refuse all mail.
            log.warning("routes file %s is empty; keeping the %d routes loaded before",
                        self.path, len(self.routes))
            return
        old, self._snapshot = self._snapshot, snapshot
        # Freed at once, the table replaced held the event loop for as long as freeing a
        # million routes takes; a system task frees it a slice at a time instead.
        trio.lowlevel.spawn_system_task(_release, old.routes, name="routes file: old table")
        del old
        log.info("routes file %s reloaded: %d routes", self.path, len(snapshot.routes))
        if self.on_change is not None:
            self.on_change()
