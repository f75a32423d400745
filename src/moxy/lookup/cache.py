"""The router a session asks at RCPT: a chain of route sources behind one TTL cache.

The cache holds one answer per lookup key (a route, "no route" or "bad data"), shares one backend
call between concurrent lookups of a key, and keeps routing from stale answers while a backend is
briefly down. It logs a backend's outage once, and its recovery once.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs
import trio

from moxy.lookup.base import (
    BadRouteData,
    DestinationGroup,
    LookupFailed,
    Route,
    RouteSource,
)
from moxy.lookup.keys import lookup_keys
from moxy.lookup.settings import CacheSettings as CacheSettings  # re-exported with its source

log = logging.getLogger("moxy.lookup")


class CacheObserver(Protocol):
    """Who counts the cache's work (moxy.metrics); the router does not depend on it."""

    def cache_hit(self) -> None: ...

    def cache_miss(self) -> None: ...

    def route_lookup(self, seconds: float) -> None: ...


class _Unobserved:
    def cache_hit(self) -> None:
        pass

    def cache_miss(self) -> None:
        pass

    def route_lookup(self, seconds: float) -> None:
        pass


@attrs.frozen
class _Answer:
    """What the chain said about one key: groups and the source that had them, or no route."""

    groups: tuple[DestinationGroup, ...] | None
    source: str = ""
    bad: BadRouteData | None = None
    # An expired "no route" served while a source fails: it lets a less specific key's stale
    # route answer, but is no answer by itself (route_keys raises this instead of None).
    failure: LookupFailed | None = None


@attrs.define
class _Entry:
    answer: _Answer
    expires: float
    route: Route | None = None  # the Route of this answer, made at its first use


@attrs.define
class _Flight:
    """One backend call in progress for a key; later callers wait for it instead of calling."""

    done: trio.Event = attrs.field(factory=trio.Event)
    answer: _Answer | None = None
    failure: LookupFailed | None = None
    # Set when the key is invalidated mid-flight: the answer may predate the change, so it is
    # handed to the callers already waiting but never stored.
    outdated: bool = False


class CachedRouter:
    """A `Router` over an ordered chain of sources, with a per-key cache in front.

    Lookup is key-major: for each key of `lookup_keys(recipient)`, most specific first, the
    sources are asked in chain order and the first that knows the key wins. So an address-level
    entry in a later source beats a `*` in an earlier one: specificity decides, the chain only
    breaks ties between sources holding the same key. This keeps a catch-all in a fast source
    from hiding every specific route kept in a slower one.

    A source that fails (`LookupFailed`) makes the whole key fail, because a source later in the
    chain cannot know whether the failed one would have overridden it. Then a cached answer up to
    `stale_grace` past its expiry is used; without one the lookup raises `LookupFailed` (the
    session answers 451 4.4.3), even when a less specific key is cached: the key that cannot be
    answered might hold an override for this very recipient. A malformed value raises
    `BadRouteData` (451 4.3.0) for the recipients that reach that key, and is logged naming
    source and key.
    """

    def __init__(
        self,
        sources: Sequence[RouteSource],
        settings: CacheSettings | None = None,
        *,
        clock: Callable[[], float] = trio.current_time,
        max_size: tuple[int, int] = (10, 10),
    ) -> None:
        if not sources:
            raise ValueError("CachedRouter needs at least one route source")
        self.sources = tuple(sources)
        self.settings = settings if settings is not None else CacheSettings()
        self._clock = clock
        self.max_groups, self.max_alternatives = max_size  # [routes]: larger routes are bad
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self._failing: set[str] = set()  # names of sources in an outage
        self.observer: CacheObserver = _Unobserved()

    def __len__(self) -> int:
        return len(self._entries)

    async def route(self, recipient: str) -> Route | None:
        return await self.route_keys(lookup_keys(recipient))

    async def route_keys(self, keys: Iterable[str]) -> Route | None:
        """The route of the first of `keys` that has one (e.g. a domain's keys, for `moxy
        lookup example.org`)."""
        entries = self._entries
        now = self._clock()
        failure: LookupFailed | None = None
        for key in keys:
            # A fresh cached answer, inline: what _answer() does for a hit, without its
            # coroutine (this runs for every RCPT).
            entry = entries.get(key)
            if entry is not None and entry.answer.bad is None and now < entry.expires:
                entries.move_to_end(key)
                self.observer.cache_hit()
                if entry.answer.groups is None:
                    continue
                if entry.route is None:
                    entry.route = Route(entry.answer.groups, key=key, source=entry.answer.source)
                return entry.route
            answer = await self._answer(key)
            if answer.groups is not None:
                return Route(answer.groups, key=key, source=answer.source)
            if answer.failure is not None:
                failure = answer.failure
            now = self._clock()  # the lookup took time
        if failure is not None:
            # No route, but only because expired absences stood in for a failing source: the
            # domain may have been added meanwhile, so no 550 for it (451, as without them).
            raise LookupFailed(*failure.args)
        return None

    def invalidate(self, key: str) -> None:
        """Forget `key` at once (e.g. a Redis change notice): the next lookup asks the chain."""
        self._entries.pop(key, None)
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.outdated = True

    def inherit(self, old: CachedRouter) -> None:
        """A reload that left `[routes]` as it was: keep `old`'s answers, as expired ones. Each
        key is asked of the sources again at its next use, but while a source fails its old
        answer still serves for `stale_grace` (a reload during an LDAP outage turned every
        cached route into 451)."""
        now = self._clock()
        entries = self._entries
        for key, entry in old._entries.items():
            if key not in entries:
                entries[key] = _Entry(entry.answer, min(entry.expires, now))
        self._failing |= old._failing  # the outage goes on: not logged again as new

    def clear(self) -> None:
        """Forget every key, e.g. after change notices may have been missed."""
        self._entries.clear()
        for flight in self._flights.values():
            flight.outdated = True
        self._flights.clear()

    # --- one key ------------------------------------------------------------------------------

    async def _answer(self, key: str) -> _Answer:
        while True:
            entry = self._entries.get(key)
            if entry is not None and self._clock() < entry.expires:
                self._entries.move_to_end(key)
                self.observer.cache_hit()
                return _unwrap(entry.answer)
            self.observer.cache_miss()
            flight = self._flights.get(key)
            if flight is None:
                return _unwrap(await self._lead(key))
            await flight.done.wait()
            if flight.failure is not None:
                raise LookupFailed(*flight.failure.args)
            if flight.answer is not None:
                return _unwrap(flight.answer)
            # The leader was cancelled before it had an answer: try again, maybe as leader.

    async def _lead(self, key: str) -> _Answer:
        flight = _Flight()
        self._flights[key] = flight
        try:
            started = time.monotonic()
            try:
                answer = await self._ask_chain(key)
            except LookupFailed as exc:
                self.observer.route_lookup(time.monotonic() - started)
                stale = self._stale(key)
                if stale is None:
                    flight.failure = exc
                    raise
                answer = stale if stale.groups is not None else attrs.evolve(stale, failure=exc)
            else:
                self.observer.route_lookup(time.monotonic() - started)
                if not flight.outdated:
                    self._store(key, answer)
            flight.answer = answer
            return answer
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    async def _ask_chain(self, key: str) -> _Answer:
        for source in self.sources:
            try:
                groups = await source.lookup(key)
            except LookupFailed as exc:
                self._note_failure(source.name, exc)
                raise LookupFailed(f"route source {source.name} failed for {key!r}: {exc}") from exc
            except BadRouteData as exc:
                self._note_success(source.name)
                return self._bad(source.name, key, exc)
            self._note_success(source.name)
            if groups is not None:
                if len(groups) > self.max_groups:
                    return self._bad(source.name, key, BadRouteData(
                        f"{len(groups)} destination groups, more than [routes] max_groups "
                        f"({self.max_groups})"))
                widest = max(len(group.alternatives) for group in groups)
                if widest > self.max_alternatives:
                    return self._bad(source.name, key, BadRouteData(
                        f"a group of {widest} alternatives, more than [routes] "
                        f"max_alternatives ({self.max_alternatives})"))
                return _Answer(groups, source.name)
        return _Answer(None)

    @staticmethod
    def _bad(source: str, key: str, exc: BadRouteData) -> _Answer:
        bad = BadRouteData(f"bad route data in source {source} for {key!r}: {exc}")
        log.warning("%s", bad)
        return _Answer(None, source, bad=bad)

    def _stale(self, key: str) -> _Answer | None:
        entry = self._entries.get(key)
        if entry is None or self._clock() >= entry.expires + self.settings.stale_grace:
            return None
        return entry.answer

    def _store(self, key: str, answer: _Answer) -> None:
        ttl = self.settings.ttl if answer.groups is not None else self.settings.negative_ttl
        if ttl <= 0 or self.settings.max_entries <= 0:
            return
        self._entries[key] = _Entry(answer, self._clock() + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.max_entries:
            self._entries.popitem(last=False)

    # --- outage bookkeeping: one log line when a source goes down, one when it is back -------

    def _note_failure(self, source: str, exc: LookupFailed) -> None:
        if source not in self._failing:
            self._failing.add(source)
            log.error(
                "route source %s is failing: %s (serving cached routes for up to %gs past "
                "expiry, otherwise 451)",
                source,
                exc,
                self.settings.stale_grace,
            )

    def _note_success(self, source: str) -> None:
        if source in self._failing:
            self._failing.discard(source)
            log.warning("route source %s answers again", source)


def _unwrap(answer: _Answer) -> _Answer:
    if answer.bad is not None:
        raise BadRouteData(*answer.bad.args)
    return answer
