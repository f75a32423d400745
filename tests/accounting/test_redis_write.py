"""How the Redis sink writes its counters, against a real redis-server: one script call per
chunk, chunks that split a key, a Redis that forgot the script or refuses scripts, a key of
another type under the prefix, and flushes brought forward only by counters really held."""

from __future__ import annotations

import logging
import time

import attrs
import pytest

from peers.redis_server import RedisServer

from .events import leg
from .test_redis_sink import PREFIX, every_period, flushed, sink_for, table


def scriptless_user(server: RedisServer) -> str:
    """The URL of an ACL user that may do anything but run scripts."""
    server.client().acl_setuser("counter", enabled=True, passwords=["+pw"], keys=["*"],
                                commands=["+@all", "-@scripting"])
    return server.url.replace("redis://", "redis://counter:pw@", 1)


async def test_a_flush_larger_than_a_chunk_splits_keys_and_counts_exactly(
    redis_server: RedisServer,
) -> None:
    """35 recipients in one flush with batch_size 10: the rcpt keys hold more members than a
    chunk, so they are split over several script calls; every counter arrives once."""
    now = time.time()
    sink = sink_for(redis_server, flush_interval=3600.0, batch_size=10_000)
    await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 10 + i, when=now)
                      for i in range(35)])
    sink.settings = attrs.evolve(sink.settings, batch_size=10)  # writes in chunks of 10
    await sink.aclose()  # flushes
    client = redis_server.client()
    for period in every_period(now):
        rcpt = table(client, "rcpt", period)
        assert rcpt == {f"r{i}@example.org": (1, 10 + i, 0) for i in range(35)}
        assert table(client, "dest", period) == {
            "mx.example:25": (35, sum(10 + i for i in range(35)), 0)}


async def test_a_redis_that_forgot_the_script_gets_it_again(redis_server: RedisServer) -> None:
    """A restarted Redis has no scripts: NOSCRIPT means the call did not run, so the script is
    loaded and the chunk sent again, counted once."""
    client = redis_server.client()
    sink = sink_for(redis_server)
    await sink.write([leg("mx.example:25", ("a@example.org",), 10)])
    await flushed(sink)
    client.script_flush()
    await sink.write([leg("mx.example:25", ("a@example.org",), 20)])
    await flushed(sink)
    assert table(client, "dest") == {"mx.example:25": (2, 30, 0)}
    await sink.aclose()


async def test_a_redis_that_refuses_scripts_gets_pipelined_commands(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without @scripting: the same counters go as pipelined ZINCRBYs, from then
    on, and that is said once."""
    caplog.set_level(logging.INFO, "moxy.accounting")
    admin = redis_server.client()
    sink = sink_for(scriptless_user(redis_server))
    now = time.time()
    for size in (10, 20, 30):
        await sink.write([leg("mx.example:25", ("a@example.org",), size, when=now)])
        await flushed(sink)
    for period in every_period(now):
        assert table(admin, "dest", period) == {"mx.example:25": (3, 60, 0)}
        assert admin.ttl(f"{PREFIX}{period}:dest:msgs") == (
            -1 if period == "total" else pytest.approx(admin.ttl(f"{PREFIX}{period}:dest:bytes")))
    warnings = [r.getMessage() for r in caplog.records if "does not run scripts" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert admin.ttl(f"{PREFIX}{every_period(now)[1]}:dest:msgs") > 0
    await sink.aclose()


async def test_a_key_of_another_type_loses_its_counters_only(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program's string where a sorted set should be: Redis refuses that key's
    counters; the rest of the chunk counts once (not again and again with retries), and the
    refusal is logged once until a write goes through whole."""
    caplog.set_level(logging.INFO, "moxy.accounting")
    client = redis_server.client()
    client.set(f"{PREFIX}total:sender:msgs", "not a sorted set")
    sink = sink_for(redis_server)
    for size in (10, 20):
        await sink.write([leg("mx.example:25", ("a@example.org",), size)])
        await flushed(sink)
    assert table(client, "dest") == {"mx.example:25": (2, 30, 0)}
    assert client.get(f"{PREFIX}total:sender:msgs") == b"not a sorted set"
    errors = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(errors) == 1 and "WRONGTYPE" in errors[0], errors
    client.delete(f"{PREFIX}total:sender:msgs")
    await sink.write([leg("mx.example:25", ("a@example.org",), 5)])
    await flushed(sink)
    assert any("takes every counter again" in r.getMessage() for r in caplog.records)
    assert table(client, "dest") == {"mx.example:25": (3, 35, 0)}
    await sink.aclose()


async def test_tallies_sharing_counters_do_not_bring_a_flush_forward(
    redis_server: RedisServer,
) -> None:
    """40 tallies (2 clients x 20 recipients) share their destination, sender, node and
    domain: 52 counters per period, 156 in all, under batch_size 200; they stay summed until
    flush_interval, however many tallies there are."""
    client = redis_server.client()
    sink = sink_for(redis_server, flush_interval=3600.0, batch_size=200)
    await sink.tick()
    now = time.time()  # one minute's buckets for all 40
    await sink.write([
        leg("mx.example:25", (f"r{i}@example.org",), 10, client_ip=ip, when=now)
        for ip in ("192.0.2.1", "192.0.2.2") for i in range(20)
    ])
    await sink.tick()
    assert client.dbsize() == 0
    assert sink.stats().backlog == 156
    await sink.aclose()
    assert table(client, "dest") == {"mx.example:25": (40, 400, 0)}
    assert len(table(client, "rcpt")) == 20


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipeline"])
async def test_max_members_keeps_the_highest_scores_of_every_set(
    redis_server: RedisServer, scripts: bool
) -> None:
    """Ten recipients of ten sizes with max_members 3: each rcpt set keeps 3 members, the
    bytes set the 3 largest; a set with fewer members (dest) is untouched; by script and, for
    a Redis that refuses scripts, by pipeline."""
    admin = redis_server.client()
    url = redis_server.url if scripts else scriptless_user(redis_server)
    now = time.time()
    sink = sink_for(url, max_members=3)
    await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 100 * (i + 1), when=now)
                      for i in range(10)])
    await flushed(sink)
    for period in every_period(now):
        key = f"{PREFIX}{period}:rcpt:"
        assert admin.zcard(key + "msgs") == 3
        assert admin.zrange(key + "bytes", 0, -1) == [b"r7@example.org", b"r8@example.org",
                                                      b"r9@example.org"]
        assert table(admin, "dest", period) == {"mx.example:25": (10, 5500, 0)}
    await sink.aclose()


@pytest.mark.parametrize("scripts", [True, False], ids=["script", "pipeline"])
async def test_a_full_redis_is_an_outage_that_loses_nothing(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, scripts: bool
) -> None:
    """maxmemory reached with noeviction: Redis answers OOM, the counters are kept as in an
    outage (not taken for refused ones), and written once Redis has room again."""
    caplog.set_level(logging.INFO, "moxy.accounting")
    admin = redis_server.client()
    url = redis_server.url if scripts else scriptless_user(redis_server)
    admin.set("ballast", "x" * 2_000_000)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] - 1_000_000)
    sink = sink_for(url)
    await sink.write([leg("mx.example:25", ("a@example.org",), 10)])
    await sink.tick()
    assert sink.stats().backlog == 36
    assert any("redis unreachable, keeping 36 counters" in r.getMessage() and "maxmemory" in
               r.getMessage() for r in caplog.records)
    admin.config_set("maxmemory", 0)
    await flushed(sink)
    assert table(admin, "dest") == {"mx.example:25": (1, 10, 0)}
    await sink.aclose()

