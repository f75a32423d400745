"""Redis routes against a real redis-server: the source, the operator's commands, and the
change channel that keeps every node's cache current, across restarts of Redis."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType

import pytest
import redis
import trio
import trio.testing

import moxy.lookup.redis
from moxy.lookup.base import BadRouteData, LookupFailed, parse_destinations
from moxy.lookup.cache import CachedRouter, CacheSettings
from moxy.lookup.file import RoutesFileError
from moxy.lookup.redis import (
    RedisSettings,
    RedisSource,
    listen_for_changes,
    route_del,
    route_import,
    route_list,
    route_set,
)
from peers.example_routes import assert_answers_like_the_routes_file
from peers.redis_server import RedisSentinel, RedisServer
from peers.tls import TlsFiles
from peers.waiting import eventually


def settings_for(server: RedisServer, **options: object) -> RedisSettings:
    return RedisSettings(url=server.url, **options)  # type: ignore[arg-type]


# --- the source --------------------------------------------------------------------------------


async def test_redis_answers_like_the_routes_file(
    redis_server: RedisServer, routes_file: Path
) -> None:
    settings = settings_for(redis_server)
    assert route_import(redis_server.client(), settings, routes_file) == 5
    await assert_answers_like_the_routes_file(RedisSource(settings), routes_file)


async def test_keys_live_under_the_prefix(redis_server: RedisServer) -> None:
    settings = settings_for(redis_server, key_prefix="isp1:")
    redis_server.client().set("isp1:route:example.org", "mx.example.net:2525")
    redis_server.client().set("moxy:route:example.org", "elsewhere.example.net")
    assert await RedisSource(settings).lookup("example.org") == parse_destinations(
        "mx.example.net:2525"
    )


@pytest.mark.parametrize(
    ("stored", "problem"),
    [(b"mx.example:0", "out of range"), (b"m\xe4x.example", "decode"), (b"", "no destinations")],
)
async def test_a_malformed_value_is_bad_data_naming_source_and_key(
    redis_server: RedisServer, stored: bytes, problem: str
) -> None:
    redis_server.client().set("moxy:route:bad.example", stored)
    chain = CachedRouter([RedisSource(settings_for(redis_server))])
    with pytest.raises(BadRouteData, match=rf"source redis for 'bad.example'.*{problem}"):
        await chain.route("user@bad.example")


async def test_a_huge_value_is_bad_data_not_parsed(redis_server: RedisServer) -> None:
    """A route of 300,000 destinations (4.8 MB) stalled every session for 1.5 s when it was
    parsed in the event loop. Beyond MAX_VALUE octets it is refused unread, and the log line
    says its size rather than quoting it."""
    from moxy.lookup.redis import MAX_VALUE

    source = RedisSource(settings_for(redis_server))
    fits = " ".join(["127.0.0.1:26001"] * (MAX_VALUE // 16))  # 16 octets each, with the space
    redis_server.client().set("moxy:route:big.example", fits)
    groups = await source.lookup("big.example")
    assert groups is not None and len(groups) == MAX_VALUE // 16  # at the limit: parsed
    redis_server.client().set("moxy:route:huge.example", "127.0.0.1:26001 " * 300_000)
    with pytest.raises(BadRouteData, match=rf"holds 4800000 octets, more than a route may "
                                           rf"\({MAX_VALUE}\)") as caught:
        await source.lookup("huge.example")
    assert len(str(caught.value)) < 200


async def test_values_are_parsed_in_the_worker_thread(
    redis_server: RedisServer, parse_threads: Callable[[ModuleType], list[int]]
) -> None:
    threads = parse_threads(moxy.lookup.redis)
    redis_server.client().set("moxy:route:example.org", "10.0.0.5:2525 mx2.example.org")
    source = RedisSource(settings_for(redis_server))
    assert await source.lookup("example.org") == parse_destinations(
        "10.0.0.5:2525 mx2.example.org"
    )
    assert threads and threading.get_ident() not in threads


async def test_a_key_of_the_wrong_type_is_bad_data(redis_server: RedisServer) -> None:
    redis_server.client().hset("moxy:route:bad.example", "host", "mx.example")
    with pytest.raises(BadRouteData, match="not a string"):
        await RedisSource(settings_for(redis_server)).lookup("bad.example")


async def test_a_password_in_the_url(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(password="s3cret")
    server.client().set("moxy:route:example.org", "mx.example.net")
    assert await RedisSource(settings_for(server)).lookup("example.org") is not None
    wrong = RedisSettings(url=f"redis://:wrong@127.0.0.1:{server.port}/0")
    with pytest.raises(LookupFailed) as caught:
        await RedisSource(wrong).lookup("example.org")
    assert "wrong" not in str(caught.value)  # messages never show the password


async def test_tls_with_a_ca_file_in_the_url(
    make_redis_server: Callable[..., RedisServer], tls_files: TlsFiles
) -> None:
    server = make_redis_server(tls=tls_files, password="s3cret")
    server.client().set("moxy:route:example.org", "mx.example.net")
    assert server.url.startswith("rediss://:s3cret@localhost:")
    assert await RedisSource(settings_for(server)).lookup("example.org") is not None
    untrusted = RedisSettings(url=f"rediss://:s3cret@localhost:{server.port}/0")
    with pytest.raises(LookupFailed, match="certificate verify failed"):
        await RedisSource(untrusted).lookup("example.org")


async def test_the_master_is_found_through_sentinel(
    redis_server: RedisServer, redis_sentinel: RedisSentinel
) -> None:
    redis_server.client().set("moxy:route:example.org", "mx.example.net")
    settings = RedisSettings(
        url="redis://ignored.invalid/0",
        sentinel_master=redis_sentinel.master_name,
        sentinels=(redis_sentinel.address,),
    )
    assert await RedisSource(settings).lookup("example.org") == parse_destinations("mx.example.net")
    route_set(RedisSource(settings).client, settings, "example.com", "mx2.example.net")
    assert redis_server.client().get("moxy:route:example.com") == b"mx2.example.net:25"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "http://127.0.0.1"}, "must start with"),
        ({"sentinels": ("127.0.0.1:26379",)}, "go together"),
        ({"sentinel_master": "moxy"}, "go together"),
        ({"sentinel_master": "moxy", "sentinels": ("sentinel.example",)}, "host:port"),
    ],
)
def test_settings_are_checked(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisSettings(**options)  # type: ignore[arg-type]


# --- the operator's commands -------------------------------------------------------------------


def test_route_set_stores_the_canonical_form_under_the_normalised_key(
    redis_server: RedisServer,
) -> None:
    settings = settings_for(redis_server)
    groups = route_set(redis_server.client(), settings, "Example.ORG.", "MX1.example.net|mx2 b:26")
    assert groups == parse_destinations("mx1.example.net|mx2 b:26")
    assert redis_server.client().get("moxy:route:example.org") == b"mx1.example.net:25|mx2:25 b:26"


@pytest.mark.parametrize(
    ("key", "destinations"),
    [
        ("example.org", "mx.example:0"),
        ("example.org", ""),
        ("", "mx.example"),
        ("exa mple.org", "mx.example"),
        ("*.example.org", "mx.example"),
    ],
)
def test_route_set_refuses_bad_input_and_writes_nothing(
    redis_server: RedisServer, key: str, destinations: str
) -> None:
    with pytest.raises(ValueError):
        route_set(redis_server.client(), settings_for(redis_server), key, destinations)
    assert redis_server.client().dbsize() == 0


def test_route_del_says_whether_there_was_a_route(redis_server: RedisServer) -> None:
    client, settings = redis_server.client(), settings_for(redis_server)
    route_set(client, settings, "example.org", "mx.example")
    assert route_del(client, settings, "EXAMPLE.org") is True
    assert route_del(client, settings, "example.org") is False
    assert client.dbsize() == 0


def test_route_list_scans_with_a_pattern(redis_server: RedisServer, routes_file: Path) -> None:
    # The fixture's redis-server has KEYS disabled: this passes only with SCAN.
    client, settings = redis_server.client(), settings_for(redis_server)
    route_import(client, settings, routes_file)
    with client.pipeline(transaction=False) as pipe:
        for n in range(2500):  # several SCAN batches
            pipe.set(f"moxy:route:user{n}@bulk.example", "bulk.example.net:25")
        pipe.execute()
    client.set("moxy:other:example.org", "not a route")
    everything = dict(route_list(client, settings))
    assert len(everything) == 2505
    assert everything["shop.example"] == "203.0.113.7:2600|198.51.100.9:25"
    assert sorted(route_list(client, settings, "*example.org")) == [
        (".example.org", "relay.example.org:587"),
        ("boss@example.org", "[2001:db8::25]:25"),
        ("example.org", "10.0.0.5:2525 mx2.example.org:25"),
    ]


def test_route_import_refuses_a_bad_file_and_writes_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    bad = tmp_path / "routes"
    bad.write_text("good.example  mx.example\nbad.example  mx.example:0\n")
    with pytest.raises(RoutesFileError, match="routes:2:"):
        route_import(redis_server.client(), settings_for(redis_server), bad)
    assert redis_server.client().dbsize() == 0


def test_every_change_is_announced_on_the_channel(
    redis_server: RedisServer, routes_file: Path
) -> None:
    client, settings = redis_server.client(), settings_for(redis_server, channel="isp1:changes")
    watcher = redis_server.client().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
    watcher.subscribe("isp1:changes")
    watcher.get_message(timeout=1)
    route_set(client, settings, "Example.ORG", "mx.example")
    route_del(client, settings, "gone.example")
    route_import(client, settings, routes_file)
    keys = []
    while (message := watcher.get_message(timeout=0.1)) is not None:
        keys.append(message["data"].decode())
    assert keys == [
        "example.org",
        "gone.example",
        "example.org",
        "shop.example",
        ".example.org",
        "boss@example.org",
        "example.com",
    ]


# --- every node follows changes ----------------------------------------------------------------


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        yield nursery
        nursery.cancel_scope.cancel()


async def routes_to(node: CachedRouter, recipient: str, expected: str) -> None:
    with trio.fail_after(2):
        while str(await node.route(recipient)) != expected:
            await trio.sleep(0.005)


async def test_a_change_reaches_every_router_sharing_the_redis(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    settings = settings_for(redis_server)
    route_set(redis_server.client(), settings, "example.org", "10.0.0.1:2525")
    nodes = [CachedRouter([RedisSource(settings)], CacheSettings(ttl=3600)) for _ in range(2)]
    for node in nodes:
        await nursery.start(listen_for_changes, settings, node.invalidate, node.clear)
        assert str(await node.route("user@example.org")) == "10.0.0.1:2525"  # now cached

    # With an hour's TTL, only the announcement can make a node see the change.
    route_set(redis_server.client(), settings, "example.org", "10.0.0.2:2525")
    for node in nodes:
        await routes_to(node, "user@example.org", "10.0.0.2:2525")

    route_del(redis_server.client(), settings, "example.org")
    for node in nodes:
        await routes_to(node, "user@example.org", "None")


async def test_the_listener_resyncs_after_redis_restarts(
    redis_server: RedisServer, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="moxy.lookup")
    settings = settings_for(redis_server)
    changed: list[str] = []
    resyncs: list[None] = []
    await nursery.start(
        lambda task_status: listen_for_changes(
            settings,
            changed.append,
            lambda: resyncs.append(None),
            retry_interval=0.05,
            poll_interval=0.1,
            task_status=task_status,
        )
    )
    assert len(resyncs) == 1  # the first subscription
    redis_server.stop()
    await trio.sleep(0.3)  # several failed attempts: still one log line
    redis_server.start()
    await eventually(lambda: len(resyncs) == 2, 5, "resubscription")
    route_set(redis_server.client(), settings, "example.org", "mx.example")
    await eventually(lambda: changed == ["example.org"], 2, "the change after the restart")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "route change channel on Redis redis://127.0.0.1" in messages[0]
    assert "unavailable" in messages[0] and "is back; route cache cleared" in messages[1]


async def test_a_listener_started_while_redis_is_down_subscribes_when_it_comes_up(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    redis_server.stop()
    settings = settings_for(redis_server)
    changed: list[str] = []
    await nursery.start(
        lambda task_status: listen_for_changes(
            settings,
            changed.append,
            lambda: None,
            retry_interval=0.05,
            task_status=task_status,
        )
    )
    redis_server.start()

    def announce_and_see() -> bool:
        route_set(redis_server.client(), settings, "example.org", "mx.example")
        return bool(changed)

    await eventually(announce_and_see, 5, "a change seen by the late subscriber")


# --- Redis going away --------------------------------------------------------------------------


async def test_while_redis_is_down_cached_routes_serve_and_others_fail_then_recover(
    redis_server: RedisServer,
    routes_file: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="moxy.lookup")
    settings = settings_for(redis_server)
    route_import(redis_server.client(), settings, routes_file)
    chain = CachedRouter(
        [RedisSource(settings)], CacheSettings(ttl=60, negative_ttl=60, stale_grace=300)
    )
    assert str(await chain.route("info@example.com")) == "mail.example.com:2525"

    redis_server.stop()
    mock_clock.jump(120)  # expired, within grace
    for _ in range(3):
        assert str(await chain.route("info@example.com")) == "mail.example.com:2525"
        with pytest.raises(LookupFailed, match="route source redis failed"):
            await chain.route("sales@shop.example")
    mock_clock.jump(300)  # past grace
    with pytest.raises(LookupFailed):
        await chain.route("info@example.com")

    redis_server.start()
    assert str(await chain.route("sales@shop.example")) == "203.0.113.7:2600|198.51.100.9:25"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith("route source redis is failing: Redis redis://127.0.0.1:")
    assert messages[1] == "route source redis answers again"


async def test_a_restarted_redis_is_reconnected_transparently(redis_server: RedisServer) -> None:
    settings = settings_for(redis_server)
    route_set(redis_server.client(), settings, "example.org", "mx.example")
    source = RedisSource(settings)
    assert await source.lookup("example.org") is not None  # a pooled connection stays open
    redis_server.restart()
    assert await source.lookup("example.org") is not None  # data survive: append-only file


def test_the_fixture_refuses_keys(redis_server: RedisServer) -> None:
    with pytest.raises(redis.ResponseError):
        redis_server.client().keys("*")
