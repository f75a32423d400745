"""The Redis counters sink against a real redis-server: exact counts per dimension, several
nodes adding up, expiry of buckets, and an outage of Redis in the middle of a run."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import trio

from moxy.accounting.counters import DIMENSIONS, day_period, minute_period
from moxy.accounting.dispatch import _Lane
from moxy.accounting.events import LOOKUP_FAILED, RELAY_DENIED
from moxy.accounting.redis import RedisSink
from moxy.accounting.settings import RedisSinkSettings
from peers.redis_server import RedisSentinel, RedisServer

from .events import CLIENT, SENDER, leg, message, refused

PREFIX = "moxy:acct:"


def sink_for(server: RedisServer | str, **options: object) -> RedisSink:
    url = server if isinstance(server, str) else server.url
    options.setdefault("flush_interval", 0.0)
    return RedisSink(RedisSinkSettings(url=url, **options))  # type: ignore[arg-type]


def scores(client: redis.Redis, period: str, dimension: str, metric: str) -> dict[str, int]:
    pairs = client.zrange(f"{PREFIX}{period}:{dimension}:{metric}", 0, -1, withscores=True)
    result = {}
    for member, score in pairs:
        assert score == int(score), (member, score)
        result[member.decode()] = int(score)
    return result


def table(client: redis.Redis, dimension: str, period: str = "total") -> dict[str, tuple[int, ...]]:
    """member -> (messages, bytes, refused) in one period."""
    metrics = [scores(client, period, dimension, m) for m in ("msgs", "bytes", "refused")]
    members = set().union(*metrics)
    return {m: tuple(metric.get(m, 0) for metric in metrics) for m in members}


async def flushed(sink: RedisSink) -> None:
    """A tick after flush_interval (0 in these tests) writes everything pending."""
    await sink.tick()
    assert sink.stats().backlog == 0


def every_period(when: float) -> list[str]:
    return ["total", day_period(when), minute_period(when)]


async def test_one_delivered_leg_counts_one_copy_everywhere(redis_server: RedisServer) -> None:
    now = time.time()
    sink = sink_for(redis_server)
    await sink.write([leg("mx1.example.org:25", ("bob@Example.ORG",), 1234, when=now)])
    await flushed(sink)
    client = redis_server.client()
    for period in every_period(now):
        assert table(client, "dest", period) == {"mx1.example.org:25": (1, 1234, 0)}
        assert table(client, "rcpt", period) == {"bob@example.org": (1, 1234, 0)}
        assert table(client, "domain", period) == {"example.org": (1, 1234, 0)}
        assert table(client, "sender", period) == {SENDER: (1, 1234, 0)}
        assert table(client, "ip", period) == {CLIENT: (1, 1234, 0)}
        assert table(client, "node", period) == {"n1": (1, 1234, 0)}
    await sink.aclose()


async def test_message_events_count_nothing(redis_server: RedisServer) -> None:
    sink = sink_for(redis_server)
    await sink.write([message(("bob@example.org",), 999)])
    assert sink.stats().backlog == 0
    await sink.aclose()
    assert redis_server.client().dbsize() == 0


async def test_a_mirror_counts_two_copies(redis_server: RedisServer) -> None:
    """A mirrored route sends two legs: each destination one copy, everything else two."""
    sink = sink_for(redis_server)
    rcpt = ("bob@example.org",)
    await sink.write([leg("a.example:25", rcpt, 1000), leg("b.example:2525", rcpt, 1010)])
    await flushed(sink)
    client = redis_server.client()
    assert table(client, "dest") == {"a.example:25": (1, 1000, 0), "b.example:2525": (1, 1010, 0)}
    assert table(client, "rcpt") == {"bob@example.org": (2, 2010, 0)}
    assert table(client, "domain") == {"example.org": (2, 2010, 0)}
    for dimension, member in (("sender", SENDER), ("ip", CLIENT), ("node", "n1")):
        assert table(client, dimension) == {member: (2, 2010, 0)}
    await sink.aclose()


async def test_domains_sharing_a_destination_are_one_copy_for_it(
    redis_server: RedisServer,
) -> None:
    """One leg carrying three recipients of two domains: one copy for the destination, the
    sender and the node; one per address; one per domain (not one per recipient)."""
    sink = sink_for(redis_server)
    recipients = ("a@one.example", "b@one.example", "c@two.example", "a@one.example")
    await sink.write([leg("shared.example:25", recipients, 500)])
    await flushed(sink)
    client = redis_server.client()
    assert table(client, "dest") == {"shared.example:25": (1, 500, 0)}
    assert table(client, "rcpt") == {
        "a@one.example": (1, 500, 0), "b@one.example": (1, 500, 0), "c@two.example": (1, 500, 0)
    }
    assert table(client, "domain") == {"one.example": (1, 500, 0), "two.example": (1, 500, 0)}
    assert table(client, "sender") == {SENDER: (1, 500, 0)}
    assert table(client, "node") == {"n1": (1, 500, 0)}
    await sink.aclose()


async def test_refusals_and_failed_legs_count_only_as_refused(redis_server: RedisServer) -> None:
    sink = sink_for(redis_server)
    await sink.write([
        refused("nobody@elsewhere.example", reason=RELAY_DENIED),
        refused("x@example.org", destination="mx1.example.org:25"),
        refused("y@example.org", reason=LOOKUP_FAILED),
        leg("mx1.example.org:25", ("bob@example.org", "carol@example.org"), 700, code=451),
        leg("mx1.example.org:25", ("bob@example.org",), 300),
    ])
    await flushed(sink)
    client = redis_server.client()
    assert table(client, "dest") == {"mx1.example.org:25": (1, 300, 2)}
    assert table(client, "rcpt") == {
        "nobody@elsewhere.example": (0, 0, 1),
        "x@example.org": (0, 0, 1),
        "y@example.org": (0, 0, 1),
        "bob@example.org": (1, 300, 1),
        "carol@example.org": (0, 0, 1),
    }
    # The failed leg is one refused copy for example.org, each refused RCPT one more.
    assert table(client, "domain") == {"elsewhere.example": (0, 0, 1), "example.org": (1, 300, 3)}
    assert table(client, "sender") == {SENDER: (1, 300, 4)}
    assert table(client, "node") == {"n1": (1, 300, 4)}
    await sink.aclose()


async def test_two_nodes_on_one_redis_add_up(redis_server: RedisServer) -> None:
    now = time.time()
    one, two = sink_for(redis_server), sink_for(redis_server)
    for i in range(10):
        await one.write([leg("mx.example:25", ("a@example.org",), 100 + i, node="n1", when=now)])
        await two.write([leg("mx.example:25", ("a@example.org",), 200 + i, node="n2", when=now)])
        if i % 3 == 0:
            await one.tick()
    await flushed(one)
    await flushed(two)
    client = redis_server.client()
    both = (20, sum(range(100, 110)) + sum(range(200, 210)), 0)
    for period in every_period(now):
        assert table(client, "dest", period) == {"mx.example:25": both}
        assert table(client, "rcpt", period) == {"a@example.org": both}
        assert table(client, "node", period) == {
            "n1": (10, sum(range(100, 110)), 0), "n2": (10, sum(range(200, 210)), 0)
        }
    await one.aclose()
    await two.aclose()


async def test_increments_wait_for_flush_interval_or_batch_size(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    sink = sink_for(redis_server, flush_interval=3600.0, batch_size=1000)
    await sink.tick()
    await sink.write([leg("mx.example:25", ("a@example.org",), 10)])
    await sink.tick()
    assert client.dbsize() == 0  # summed in memory: 18 members x 2 metrics x 3 periods
    assert sink.stats().backlog == 36
    small = sink_for(redis_server, flush_interval=3600.0, batch_size=30)
    await small.write([leg("mx.example:25", ("a@example.org",), 10)])
    assert small.stats().backlog == 0
    assert table(client, "dest") == {"mx.example:25": (1, 10, 0)}
    await sink.aclose()  # aclose flushes
    assert table(client, "dest") == {"mx.example:25": (2, 20, 0)}
    await small.aclose()


async def test_events_of_one_tally_are_summed_first_and_count_exactly(
    redis_server: RedisServer,
) -> None:
    """Many copies with the same destination, recipients, sender, client and node are summed
    per minute before they are spread over counters: they hold no more counters than one, and
    every one of them is counted."""
    client = redis_server.client()
    sink = sink_for(redis_server, flush_interval=3600.0)
    when = time.time()
    same = [leg("mx.example:25", ("a@example.org",), 10 + i, when=when) for i in range(1000)]
    failed = [leg("mx.example:25", ("a@example.org",), 5, code=451, when=when)] * 3
    await sink.write(same[:500] + failed + same[500:] + [refused("a@example.org")] * 2)
    # 6 members x (msgs, bytes) x 3 periods, plus refused: the same 6 members and 3 periods.
    assert sink.stats().backlog == 36 + 18
    await sink.aclose()
    sizes = sum(10 + i for i in range(1000))
    for period in every_period(when):
        assert table(client, "dest", period) == {"mx.example:25": (1000, sizes, 3)}
        assert table(client, "rcpt", period) == {"a@example.org": (1000, sizes, 5)}
        assert table(client, "sender", period) == {SENDER: (1000, sizes, 5)}


async def test_buckets_expire_and_totals_do_not(redis_server: RedisServer) -> None:
    sink = sink_for(redis_server, retention_days=3, minute_retention=90)
    now = time.time()
    await sink.write([leg("mx.example:25", ("a@example.org",), 10, when=now)])
    await flushed(sink)
    client = redis_server.client()
    for dimension in DIMENSIONS:
        for metric in ("msgs", "bytes"):
            assert client.ttl(f"{PREFIX}total:{dimension}:{metric}") == -1
            day_ttl = client.ttl(f"{PREFIX}{day_period(now)}:{dimension}:{metric}")
            assert 3 * 86400 - 5 < day_ttl <= 4 * 86400  # until 3 days after the day ends
            minute_ttl = client.ttl(f"{PREFIX}{minute_period(now)}:{dimension}:{metric}")
            assert 90 * 60 - 5 < minute_ttl <= 91 * 60
    # An event older than the retention only adds to the totals.
    old = now - 5 * 86400
    await sink.write([leg("old.example:25", ("a@example.org",), 7, when=old)])
    await flushed(sink)
    assert table(client, "dest")["old.example:25"] == (1, 7, 0)
    assert client.exists(f"{PREFIX}{day_period(old)}:dest:msgs") == 0
    assert client.exists(f"{PREFIX}{minute_period(old)}:dest:msgs") == 0
    await sink.aclose()


async def test_both_spellings_of_an_internationalized_domain_are_one_member(
    redis_server: RedisServer,
) -> None:
    """Recipients at `bücher.example` (SMTPUTF8) and at its A-label count under one domain and,
    for the same local part, one address: as routing sees them."""
    client = redis_server.client()
    sink = sink_for(redis_server)
    await sink.write([leg("mx.example:25", ("leser@Bücher.example",), 10),
                      leg("mx.example:25", ("leser@xn--bcher-kva.example",), 20)])
    await flushed(sink)
    assert table(client, "domain") == {"xn--bcher-kva.example": (2, 30, 0)}
    assert table(client, "rcpt") == {"leser@xn--bcher-kva.example": (2, 30, 0)}
    await sink.aclose()


# --- outages -----------------------------------------------------------------------------


async def test_an_outage_keeps_counts_and_recovers_them(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "moxy.accounting")
    now = time.time()
    sink = sink_for(redis_server, timeout=1.0)
    await sink.write([leg("mx.example:25", ("a@example.org",), 100, when=now)])
    await flushed(sink)
    redis_server.stop()
    for i in range(50):  # never raises; ticks retry and fail
        await sink.write([leg("mx.example:25", ("a@example.org",), 1000 + i, when=now)])
        await sink.tick()
    assert sink.stats().backlog == 36
    assert sink.stats().dropped == 0
    redis_server.start()
    await flushed(sink)
    client = redis_server.client()
    expected = (51, 100 + sum(range(1000, 1050)), 0)
    for period in every_period(now):
        assert table(client, "dest", period)["mx.example:25"] == expected
    messages = [r.getMessage() for r in caplog.records]
    down = [m for m in messages if "redis unreachable, keeping" in m]
    back = [m for m in messages if "redis reachable again" in m]
    assert len(down) == 1 and len(back) == 1, messages
    await sink.aclose()


async def test_beyond_the_backlog_events_are_dropped_and_counted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "moxy.accounting")
    # Each recipient address adds 6 new counters (rcpt msgs+bytes x 3 periods); the first
    # event 36. A backlog of 60 holds the first event and four more recipients.
    sink = sink_for(redis_server, backlog=60, timeout=1.0)
    redis_server.stop()
    now = time.time()  # one minute's buckets, even if the run straddles a minute
    await sink.write([leg("mx.example:25", ("r0@example.org",), 10, when=now)])
    await sink.tick()
    for i in range(1, 10):
        await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 10, when=now)])
        await sink.tick()
    assert sink.stats().backlog == 60
    assert sink.stats().dropped == 5
    redis_server.start()
    await flushed(sink)
    client = redis_server.client()
    assert table(client, "dest") == {"mx.example:25": (5, 50, 0)}
    assert sorted(table(client, "rcpt")) == [f"r{i}@example.org" for i in range(5)]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "backlog full" in m]) == 1, messages
    assert any("5 events dropped during the outage" in m for m in messages), messages
    assert sink.stats().dropped == 5
    await sink.aclose()


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A port that accepts TCP connections and never answers: a hung Redis."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    listener.close()


async def test_a_hung_redis_costs_one_timeout_not_one_per_write(black_hole: str) -> None:
    sink = sink_for(black_hole, timeout=0.5, batch_size=10)
    now = time.time()  # one minute's buckets, even if the run straddles a minute
    await sink.write([leg("mx.example:25", ("a@example.org",), 1, when=now)])  # hung: 0.5 s
    assert sink.stats().backlog == 36
    started = trio.current_time()
    for i in range(200):  # each would flush (batch_size 10) if Redis were up
        await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 1, when=now)])
    assert trio.current_time() - started < 5  # 200 timeouts would take 100 s
    assert sink.stats().backlog == 36 + 200 * 6
    with trio.fail_after(10):  # aclose gives up after its timeout
        await sink.aclose()


async def test_password_and_sentinel_forms_of_the_url(
    make_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """The sink connects as `[routes.redis]` does: a password in the URL, or via Sentinel."""
    server = make_redis_server(password="s3cret")
    sink = sink_for(server)
    await sink.write([leg("mx.example:25", ("a@example.org",), 10)])
    await flushed(sink)
    await sink.aclose()
    sentinel = RedisSentinel(tmp_path / "sentinel", server)
    sentinel.start()
    try:
        via_sentinel = RedisSink(RedisSinkSettings(
            url="redis://:s3cret@ignored.invalid/0", flush_interval=0.0,
            sentinel_master=sentinel.master_name, sentinels=(sentinel.address,),
        ))
        await via_sentinel.write([leg("mx.example:25", ("a@example.org",), 5)])
        await flushed(via_sentinel)
        await via_sentinel.aclose()
    finally:
        sentinel.stop()
    assert table(server.client(), "dest") == {"mx.example:25": (2, 15, 0)}


async def test_a_backlog_no_larger_than_batch_size_flushes_instead_of_dropping(
    redis_server: RedisServer,
) -> None:
    """`backlog` bounds what is kept while Redis is down: with Redis up, a backlog that
    fills is written, not a reason to drop events."""
    sink = sink_for(redis_server, flush_interval=3600.0, backlog=100, batch_size=1000)
    await sink.tick()
    now = time.time()
    await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 10, when=now)
                      for i in range(50)])
    await sink.aclose()
    assert sink.stats().dropped == 0
    client = redis_server.client()
    assert table(client, "dest") == {"mx.example:25": (50, 500, 0)}
    assert len(table(client, "rcpt")) == 50


async def test_the_outage_summary_counts_the_dispatchers_drops_too(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A hung Redis holds the sink's task while its queue overflows: those events are
    dropped during the outage as much as the backlog's would be."""
    caplog.set_level(logging.INFO, "moxy.accounting")
    sink = sink_for(redis_server, timeout=0.3)
    now = time.time()
    await sink.write([leg("mx.example:25", ("a@example.org",), 10, when=now)])
    await flushed(sink)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        lane = _Lane(sink, 4, 0.5)
        lane.add([leg("mx.example:25", ("a@example.org",), 10, when=now)] * 10)  # 6 dropped
        await sink.write(lane.take())
        await sink.tick()  # hung: a timeout, then down
    finally:
        os.kill(pid, signal.SIGCONT)
    await flushed(sink)
    assert table(redis_server.client(), "dest") == {"mx.example:25": (5, 50, 0)}
    back = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(back) == 1 and "6 events dropped during the outage" in back[0], back
    await sink.aclose()
