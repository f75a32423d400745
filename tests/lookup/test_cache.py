"""The cached chain: key-major order, TTLs, LRU bound, single flight, stale grace, outage logs.

Most tests run the router over `TableSource`, an in-memory source that counts the questions it
gets and can be told to fail or to hold its answer; time is trio's MockClock, jumped by hand.
The last test runs the chain over every real source at once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from moxy.lookup.base import (
    BadRouteData,
    DestinationGroup,
    LookupFailed,
    Route,
    RouteSource,
    parse_destinations,
)
from moxy.lookup.cache import CachedRouter, CacheSettings
from moxy.lookup.file import FileSource
from moxy.lookup.gdbm import GdbmSource, make_db
from moxy.lookup.ldap import LdapSettings, LdapSource
from moxy.lookup.redis import RedisSettings, RedisSource, route_set
from peers.redis_server import RedisServer
from peers.slapd import ROUTES_BASE, Slapd


class TableSource:
    """A RouteSource over a dict of key → destination text ("!bad" values fail to parse)."""

    def __init__(self, name: str, table: Mapping[str, str]) -> None:
        self.name = name
        self.table = dict(table)
        self.calls: list[str] = []
        self.down = False
        self.gate: trio.Event | None = None  # when set, lookups wait for it

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise LookupFailed(f"{self.name} is down")
        text = self.table.get(key)
        if text is None:
            return None
        try:
            return parse_destinations(text)
        except ValueError as exc:
            raise BadRouteData(str(exc)) from None


def groups(text: str) -> tuple[DestinationGroup, ...]:
    return parse_destinations(text)


SETTINGS = CacheSettings(ttl=60, negative_ttl=30, stale_grace=300, max_entries=1000)


def router(*sources: RouteSource, **settings: Any) -> CachedRouter:
    return CachedRouter(list(sources), attrs.evolve(SETTINGS, **settings))


# --- chain order -------------------------------------------------------------------------------


async def test_the_most_specific_key_wins_even_from_a_later_source() -> None:
    first = TableSource("first", {"*": "catchall.example:25"})
    second = TableSource("second", {"example.org": "mx.example.org:2525"})
    route = await router(first, second).route("user@example.org")
    assert route == Route(groups("mx.example.org:2525"), key="example.org", source="second")


async def test_for_the_same_key_the_earlier_source_wins() -> None:
    first = TableSource("first", {"example.org": "one.example:25"})
    second = TableSource("second", {"example.org": "two.example:25"})
    route = await router(first, second).route("user@example.org")
    assert route == Route(groups("one.example:25"), key="example.org", source="first")
    assert "example.org" not in second.calls


async def test_no_key_in_any_source_is_no_route() -> None:
    assert await router(TableSource("a", {}), TableSource("b", {})).route("x@example.org") is None


async def test_a_failing_source_fails_the_key_even_if_a_later_source_has_it() -> None:
    # The failed source might have held a route that overrides the later one.
    first = TableSource("first", {})
    first.down = True
    second = TableSource("second", {"user@example.org": "mx.example:25"})
    with pytest.raises(LookupFailed, match="first"):
        await router(first, second).route("user@example.org")


async def test_route_keys_asks_the_given_keys_in_order() -> None:
    source = TableSource("t", {".example.org": "relay.example:587", "*": "catchall.example:25"})
    route = await router(source).route_keys(["sub.example.org", ".example.org", "*"])
    assert route == Route(groups("relay.example:587"), key=".example.org", source="t")
    assert source.calls == ["sub.example.org", ".example.org"]


# --- cache hits, TTLs, LRU ---------------------------------------------------------------------


async def test_a_cached_route_is_not_asked_again_within_its_ttl(
    mock_clock: trio.testing.MockClock,
) -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    chain = router(source)
    for _ in range(5):
        assert await chain.route("user@example.org") is not None
        mock_clock.jump(5)  # 25 s in all: within ttl and negative_ttl
    assert source.calls == ["user@example.org", "example.org"]


async def test_a_route_is_asked_again_after_its_ttl(mock_clock: trio.testing.MockClock) -> None:
    source = TableSource("t", {"example.org": "old.example:25"})
    chain = router(source, ttl=60, negative_ttl=1000)
    await chain.route("user@example.org")
    source.table["example.org"] = "new.example:25"
    mock_clock.jump(59)
    assert str(await chain.route("user@example.org")) == "old.example:25"
    mock_clock.jump(1)
    assert str(await chain.route("user@example.org")) == "new.example:25"
    assert source.calls.count("example.org") == 2


async def test_no_route_is_cached_for_negative_ttl(mock_clock: trio.testing.MockClock) -> None:
    source = TableSource("t", {})
    chain = router(source, ttl=1000, negative_ttl=30)
    assert await chain.route("user@example.org") is None
    source.table["example.org"] = "mx.example:25"
    mock_clock.jump(29)
    assert await chain.route("user@example.org") is None
    mock_clock.jump(1)
    assert str(await chain.route("user@example.org")) == "mx.example:25"


async def test_least_recently_used_keys_are_dropped_beyond_max_entries() -> None:
    source = TableSource("t", {"a.example": "mx.example:25"})
    chain = router(source, max_entries=2)
    await chain.route("a.example")  # keys: a.example, *
    await chain.route("b.example")  # keys: b.example, *  → "a.example" is least recent
    assert len(chain) == 2
    source.calls.clear()
    await chain.route("b.example")
    assert source.calls == []
    await chain.route("a.example")
    assert source.calls == ["a.example"]


# --- single flight -----------------------------------------------------------------------------


async def test_concurrent_lookups_of_a_key_share_one_backend_call() -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    source.gate = trio.Event()
    chain = router(source)
    routes: list[Route | None] = []

    async def ask() -> None:
        routes.append(await chain.route("user@example.org"))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        source.gate.set()
    assert len(routes) == 10 and len(set(routes)) == 1
    assert source.calls == ["user@example.org", "example.org"]


async def test_waiters_take_over_when_the_first_caller_is_cancelled() -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    source.gate = trio.Event()
    chain = router(source)
    routes: list[Route | None] = []

    async def ask() -> None:
        routes.append(await chain.route("example.org"))

    async with trio.open_nursery() as nursery:
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await chain.route("example.org")

        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        leader_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        source.gate.set()
    assert [str(r) for r in routes] == ["mx.example:25"]
    assert source.calls == ["example.org", "example.org"]


# --- invalidation ------------------------------------------------------------------------------


async def test_invalidate_makes_the_next_lookup_ask_the_chain() -> None:
    source = TableSource("t", {"example.org": "old.example:25"})
    chain = router(source)
    await chain.route("user@example.org")
    source.table["example.org"] = "new.example:25"
    chain.invalidate("example.org")
    assert str(await chain.route("user@example.org")) == "new.example:25"
    assert source.calls == ["user@example.org", "example.org", "example.org"]


async def test_clear_forgets_every_key() -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    chain = router(source)
    await chain.route("user@example.org")
    chain.clear()
    assert len(chain) == 0
    await chain.route("user@example.org")
    assert len(source.calls) == 4


async def test_an_answer_invalidated_while_in_flight_is_not_cached() -> None:
    source = TableSource("t", {"example.org": "old.example:25"})
    source.gate = trio.Event()
    chain = router(source)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chain.route, "example.org")
        await trio.testing.wait_all_tasks_blocked()
        chain.invalidate("example.org")  # the change notice overtakes the answer
        source.table["example.org"] = "new.example:25"
        source.gate.set()
    assert str(await chain.route("example.org")) == "new.example:25"


# --- failures ----------------------------------------------------------------------------------


async def test_a_stale_route_is_served_within_grace_while_the_backend_fails(
    mock_clock: trio.testing.MockClock,
) -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    chain = router(source, ttl=60, negative_ttl=60, stale_grace=300)
    await chain.route("user@example.org")
    source.down = True
    mock_clock.jump(60 + 299)
    assert str(await chain.route("user@example.org")) == "mx.example:25"
    mock_clock.jump(1)
    with pytest.raises(LookupFailed, match="t is down"):
        await chain.route("user@example.org")


async def test_an_expired_no_route_is_not_an_answer_while_the_backend_fails(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Within its negative TTL, "no route" is the answer (a 550 for the recipient); past it,
    with the source down, the lookup fails (451), however recent the absence was."""
    source = TableSource("t", {"example.org": "mx.example:25"})
    chain = router(source, ttl=60, negative_ttl=3, stale_grace=300)
    assert await chain.route("user@unknown.example") is None
    source.down = True
    mock_clock.jump(2)
    assert await chain.route("user@unknown.example") is None  # still fresh
    mock_clock.jump(4)
    with pytest.raises(LookupFailed, match="t is down"):
        await chain.route("user@unknown.example")


async def test_backend_failure_without_a_cached_answer_raises_lookup_failed() -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    source.down = True
    with pytest.raises(LookupFailed, match=r"route source t failed for 'user@example.org'"):
        await router(source).route("user@example.org")


async def test_an_outage_is_logged_once_and_its_end_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="moxy.lookup")
    source = TableSource("backend", {"example.org": "mx.example:25"})
    chain = router(source)
    source.down = True
    for n in range(20):
        with pytest.raises(LookupFailed):
            await chain.route(f"user{n}@example{n}.org")
    source.down = False
    for n in range(20, 40):
        await chain.route(f"user{n}@example.org")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "route source backend is failing" in messages[0]
    assert "route source backend answers again" in messages[1]


async def test_bad_data_names_source_and_key_and_spares_other_recipients(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="moxy.lookup")
    source = TableSource("t", {"bad.example": "mx.example:99999", "good.example": "mx:25"})
    chain = router(source)
    for _ in range(3):
        with pytest.raises(BadRouteData, match=r"source t for 'bad.example'.*99999"):
            await chain.route("user@bad.example")
        assert str(await chain.route("user@good.example")) == "mx:25"
    assert [r.getMessage() for r in caplog.records] == [
        "bad route data in source t for 'bad.example': 'mx.example:99999': port 99999 out of "
        "range 1-65535"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a b c", r"3 destination groups, more than \[routes\] max_groups \(2\)"),
        ("a b|c|d|e", r"a group of 4 alternatives, more than \[routes\] max_alternatives \(3\)"),
    ],
)
async def test_a_route_larger_than_the_limits_is_bad_data(text: str, problem: str) -> None:
    source = TableSource("t", {"big.example": text, "fits.example": "a|b|c d"})
    chain = CachedRouter([source], SETTINGS, max_size=(2, 3))
    with pytest.raises(BadRouteData, match=r"source t for 'big.example': " + problem):
        await chain.route("user@big.example")
    assert str(await chain.route("user@fits.example")) == "a:25|b:25|c:25 d:25"


async def test_an_inherited_cache_asks_again_but_stands_in_while_the_source_fails(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A reload that keeps [routes] as it was: the new cache starts with the old answers,
    expired (the sources are asked again), usable as stale ones during an outage."""
    source = TableSource("t", {"example.org": "old.example:25"})
    old = router(source)
    assert str(await old.route("u@example.org")) == "old.example:25"
    new = router(source)
    new.inherit(old)
    source.down = True
    assert str(await new.route("u@example.org")) == "old.example:25"  # stale, while down
    source.down = False
    source.table["example.org"] = "new.example:25"
    mock_clock.jump(SETTINGS.stale_grace / 2)
    assert str(await new.route("u@example.org")) == "new.example:25"  # asked again, not cached


# --- every real source in one chain -------------------------------------------------------------


async def test_a_chain_of_every_real_source_routes_key_major(
    tmp_path: Path, routes_file: Path, redis_server: RedisServer, slapd: Slapd
) -> None:
    # redis: a catch-all; ldap: example.ldif; gdbm: one address; file: everything else.
    redis_settings = RedisSettings(url=redis_server.url)
    route_set(redis_server.client(), redis_settings, "*", "catchall.example.net:2525")
    route_set(redis_server.client(), redis_settings, "example.com", "redis.example.net")
    db = tmp_path / "routes.db"
    (tmp_path / "gdbm-routes").write_text("anyone@example.org  gdbm.example.net\n")
    make_db(tmp_path / "gdbm-routes", db)
    (tmp_path / "file-routes").write_text("info@example.com  file.example.net\n")
    sources: list[RouteSource] = [
        RedisSource(redis_settings),
        LdapSource(LdapSettings(uri=(slapd.uri,), base=ROUTES_BASE)),
        GdbmSource(db),
        FileSource.open(tmp_path / "file-routes"),
    ]
    chain = CachedRouter(sources)

    async def where(recipient: str) -> tuple[str, str, str]:
        route = await chain.route(recipient)
        assert route is not None
        return route.source, route.key, str(route)

    assert await where("info@example.com") == ("file", "info@example.com", "file.example.net:25")
    assert await where("anyone@example.org") == (
        "gdbm",
        "anyone@example.org",
        "gdbm.example.net:25",
    )
    assert await where("boss@example.org") == ("ldap", "boss@example.org", "[2001:db8::25]:25")
    assert await where("sales@example.com") == ("redis", "example.com", "redis.example.net:25")
    assert await where("x@unknown.example") == ("redis", "*", "catchall.example.net:2525")


# --- the hit path of every RCPT ----------------------------------------------------------------


class CountingObserver:
    def __init__(self) -> None:
        self.hits = self.misses = 0

    def cache_hit(self) -> None:
        self.hits += 1

    def cache_miss(self) -> None:
        self.misses += 1

    def route_lookup(self, seconds: float) -> None:
        pass


async def test_a_cache_hit_counts_per_key_and_gives_the_same_route(
    mock_clock: trio.testing.MockClock,
) -> None:
    source = TableSource("t", {"example.org": "mx.example:25"})
    chain = router(source)
    chain.observer = observer = CountingObserver()
    first = await chain.route("user@example.org")  # two keys asked: the address, the domain
    assert (observer.hits, observer.misses) == (0, 2)
    again = await chain.route("user@example.org")
    assert (observer.hits, observer.misses) == (2, 2)  # a hit for each key, as on a miss
    assert again is not None and again == first
    assert again is await chain.route("other@example.org")  # the domain key's Route, kept
    assert source.calls == ["user@example.org", "example.org", "other@example.org"]


async def test_a_cached_route_is_forgotten_when_its_key_is_invalidated() -> None:
    source = TableSource("t", {"example.org": "old.example:25"})
    chain = router(source)
    assert str(await chain.route("user@example.org")) == "old.example:25"
    source.table["example.org"] = "new.example:25"
    chain.invalidate("example.org")
    assert str(await chain.route("user@example.org")) == "new.example:25"


async def test_a_cached_bad_value_fails_every_hit() -> None:
    source = TableSource("t", {"example.org": "!bad"})
    chain = router(source)
    for _ in range(3):
        with pytest.raises(BadRouteData, match=r"source t for 'example\.org'"):
            await chain.route("user@example.org")
    assert source.calls == ["user@example.org", "example.org"]
