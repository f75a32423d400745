"""The chain built from [routes], and the tasks that keep its cache current while Moxy runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from moxy.config import Config, ConfigError, RoutesSettings
from moxy.lookup.build import Routing
from moxy.lookup.file import RoutesFileError
from moxy.lookup.gdbm import GdbmSource, make_db
from moxy.lookup.redis import route_set
from moxy.lookup.settings import CacheSettings, GdbmSettings, RedisSettings
from peers.redis_server import RedisServer


def config(**routes: object) -> Config:
    return Config(routes=RoutesSettings(**routes))  # type: ignore[arg-type]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """tmp_path with a routes file and the GDBM file made from it."""
    (tmp_path / "routes").write_text("example.org  old.example\n")
    make_db(tmp_path / "routes", tmp_path / "routes.db")
    return tmp_path


async def where(routing: Routing, recipient: str = "user@example.org") -> str:
    route = await routing.router.route(recipient)
    return f"{route.source} {route}" if route else "no route"


def test_sources_are_made_in_chain_order_behind_the_configured_cache(files: Path) -> None:
    routing = Routing.build(
        config(
            chain=("gdbm", "file"),
            file=files / "routes",
            gdbm=GdbmSettings(files / "routes.db"),
            cache=CacheSettings(ttl=5),
        )
    )
    assert [source.name for source in routing.router.sources] == ["gdbm", "file"]
    assert routing.router.settings == CacheSettings(ttl=5)
    assert routing.changes is None


def test_without_a_chain_the_routes_file_is_the_source(files: Path) -> None:
    routing = Routing.build(config(file=files / "routes"))
    assert [source.name for source in routing.router.sources] == ["file"]


def test_a_broken_routes_file_or_missing_gdbm_file_stops_the_build(files: Path) -> None:
    (files / "broken").write_text("example.org\n")
    with pytest.raises(RoutesFileError):
        Routing.build(config(file=files / "broken"))
    with pytest.raises(ConfigError, match=r"routes\.gdbm\.path: cannot open .*nope\.db"):
        Routing.build(config(chain=("gdbm",), gdbm=GdbmSettings(files / "nope.db")))


# Each answer below is cached for a minute: only the task that keeps the cache current can make
# the next lookup see a change within the test.


async def test_an_edited_routes_file_clears_the_cache(files: Path) -> None:
    routing = Routing.build(config(file=files / "routes", reload_interval=0.05))
    async with trio.open_nursery() as nursery:
        await nursery.start(routing.run)
        assert await where(routing) == "file old.example:25"  # cached for a minute
        (files / "routes").write_text("example.org  new.example\n")
        with trio.fail_after(5):
            while await where(routing) != "file new.example:25":
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_a_rebuilt_gdbm_file_clears_the_cache_and_is_closed_at_the_end(files: Path) -> None:
    routing = Routing.build(
        config(chain=("gdbm",), gdbm=GdbmSettings(files / "routes.db", reload_interval=0.05))
    )
    [source] = routing.router.sources
    assert isinstance(source, GdbmSource)
    async with trio.open_nursery() as nursery:
        await nursery.start(routing.run)
        assert await where(routing) == "gdbm old.example:25"
        (files / "routes").write_text("example.org  new.example\n")
        make_db(files / "routes", files / "routes.db")
        with trio.fail_after(5):
            while await where(routing) != "gdbm new.example:25":
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert source._db is None  # closed when run() ended


async def test_announced_redis_changes_drop_the_key(redis_server: RedisServer) -> None:
    settings = RedisSettings(url=redis_server.url)
    route_set(redis_server.client(), settings, "example.org", "old.example")
    routing = Routing.build(config(chain=("redis",), redis=settings))
    assert routing.changes == settings
    async with trio.open_nursery() as nursery:
        await nursery.start(routing.run)  # subscribed once this returns
        assert await where(routing) == "redis old.example:25"
        route_set(redis_server.client(), settings, "example.org", "new.example")
        with trio.fail_after(5):
            while await where(routing) != "redis new.example:25":
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
