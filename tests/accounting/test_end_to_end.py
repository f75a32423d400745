"""Accounting through a real server: messages sent to a running Moxy (in-process `serve`) whose
[accounting] writes the message log and Redis counters (or a GDBM log), compared with what the
recording destinations actually received. Redis stopped and restarted in the middle of a run;
`moxystats` run as a command over what the server wrote."""

from __future__ import annotations

import calendar
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from integration.helpers import SENDER, send_one
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import DISCONNECT, Message, Recorder
from peers.redis_server import RedisServer
from peers.sink import free_port
from peers.waiting import eventually

from .helpers import text_records

MakeRecorder = Callable[..., Recorder]
PREFIX = "moxy:acct:"
CLIENT_IP = "127.0.0.1"
MOXYSTATS = str(Path(sys.executable).parent / "moxystats")
Table = dict[str, tuple[int, int, int]]  # member -> (msgs, bytes, refused)


def accounting(redis_server: RedisServer, node: str = "mx-e2e", **redis: object) -> Any:
    """The sections of a server that counts in `redis_server` (flushing every 0.1 s)."""
    return {
        "server": {"node": node},
        "accounting": {"sinks": ["file", "redis"]},
        "accounting.redis": {"url": redis_server.url, "flush_interval": 0.1, **redis},
    }


def table(client: redis.Redis, dimension: str, period: str = "total") -> Table:
    metrics = []
    for metric in ("msgs", "bytes", "refused"):
        pairs = client.zrange(f"{PREFIX}{period}:{dimension}:{metric}", 0, -1, withscores=True)
        metrics.append({member.decode(): int(score) for member, score in pairs})
    members = set().union(*metrics)
    return {m: (metrics[0].get(m, 0), metrics[1].get(m, 0), metrics[2].get(m, 0)) for m in members}


def tables(client: redis.Redis) -> dict[str, Table]:
    dimensions = ("dest", "rcpt", "domain", "sender", "ip", "node")
    return {dimension: table(client, dimension) for dimension in dimensions}


async def counters_become(
    redis_server: RedisServer, expected: dict[str, Table], timeout: float = 10.0
) -> None:
    """Poll Redis until every dimension's totals are `expected`; fail showing the difference."""
    client = redis_server.client()
    seen: dict[str, Table] = {}

    def matches() -> bool:
        nonlocal seen
        seen = tables(client)
        return seen == expected

    deadline = trio.current_time() + timeout
    while not await trio.to_thread.run_sync(matches):
        if trio.current_time() > deadline:
            assert seen == expected
        await trio.sleep(0.05)


def copy(size: int, msgs: int = 1) -> tuple[int, int, int]:
    return (msgs, size, 0)


def sizes(messages: Sequence[Message]) -> int:
    """The bytes the destinations received: the data as sent after DATA, dot-stuffed and with
    Moxy's Received header, without the final ".\\r\\n" (what a leg's `size` counts)."""
    total = 0
    for message in messages:
        assert message.data is not None
        total += len(message.data)
    return total


def origin(node: str, msgs: int, size: int, refused: int = 0) -> dict[str, Table]:
    return {
        "sender": {SENDER: (msgs, size, refused)},
        "ip": {CLIENT_IP: (msgs, size, refused)},
        "node": {node: (msgs, size, refused)},
    }


async def legs_logged(moxy: RunningMoxy, count: int) -> list[dict[str, Any]]:
    """The leg events of the message log (the file sink), once `count` of them are there."""
    await eventually(
        lambda: len([r for r in text_records(moxy.log_file) if r["kind"] == "leg"]) >= count,
        what=f"{count} leg events in {moxy.log_file}",
    )
    return [r for r in text_records(moxy.log_file) if r["kind"] == "leg"]


# --- what each leg counts -----------------------------------------------------------------


async def test_one_destination(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    dest = make_recorder()
    server = await moxy({"example.org": dest}, **accounting(redis_server))
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250
    [message] = dest.delivered
    size = sizes([message])
    await counters_become(redis_server, {
        "dest": {dest.address: copy(size)},
        "rcpt": {"user@example.org": copy(size)},
        "domain": {"example.org": copy(size)},
        **origin("mx-e2e", 1, size),
    })
    # The message log and the counters agree on the leg's size.
    [logged] = await legs_logged(server, 1)
    assert (logged["dest"], logged["size"], logged["code"]) == (dest.address, size, 250)


async def test_a_mirror_counts_both_copies(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    first, second = make_recorder(), make_recorder()
    server = await moxy({"example.net": [first, second]}, **accounting(redis_server))
    outcome = await send_one(server, ["Info@Example.NET"])
    assert outcome.final is not None and outcome.final.code == 250
    one, two = sizes(first.delivered), sizes(second.delivered)
    assert len(first.delivered) == len(second.delivered) == 1
    await counters_become(redis_server, {
        "dest": {first.address: copy(one), second.address: copy(two)},
        "rcpt": {"Info@example.net": copy(one + two, 2)},
        "domain": {"example.net": copy(one + two, 2)},
        **origin("mx-e2e", 2, one + two),
    })
    logged = await legs_logged(server, 2)
    assert sorted((r["dest"], r["size"]) for r in logged) == sorted(
        [(first.address, one), (second.address, two)]
    )


async def test_two_domains_sharing_a_destination_are_one_copy_for_it(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    dest = make_recorder()
    server = await moxy({"example.org": dest, "example.com": dest}, **accounting(redis_server))
    rcpts = ["ann@example.org", "bob@example.com", "cid@example.com"]
    outcome = await send_one(server, rcpts)
    assert outcome.final is not None and outcome.final.code == 250
    [message] = dest.delivered
    assert message.rcpts == rcpts
    size = sizes([message])
    await counters_become(redis_server, {
        "dest": {dest.address: copy(size)},
        "rcpt": {rcpt: copy(size) for rcpt in rcpts},
        "domain": {"example.org": copy(size), "example.com": copy(size)},
        **origin("mx-e2e", 1, size),
    })


async def test_a_refused_recipient_counts_refused_and_is_not_delivered(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    dest = make_recorder()
    server = await moxy({"example.org": dest}, **accounting(redis_server))
    outcome = await send_one(server, ["ann@example.org", "x@Unrouted.test"])
    assert [r.code for r in outcome.rcpt] == [250, 550]
    assert outcome.final is not None and outcome.final.code == 250
    [message] = dest.delivered
    assert message.rcpts == ["ann@example.org"]
    size = sizes([message])
    await counters_become(redis_server, {
        "dest": {dest.address: copy(size)},
        "rcpt": {"ann@example.org": copy(size), "x@unrouted.test": (0, 0, 1)},
        "domain": {"example.org": copy(size), "unrouted.test": (0, 0, 1)},
        **origin("mx-e2e", 1, size, refused=1),
    })
    refused = [r for r in text_records(server.log_file) if r["kind"] == "refused"]
    assert [(r["to"], r["reason"]) for r in refused] == [(["x@Unrouted.test"], "relay-denied")]


async def test_failed_legs_count_refused_not_delivered(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    refusing = make_recorder({"end_of_data": "554 5.7.1 Rejected by policy"})
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    server = await moxy(
        {"example.org": refusing, "example.com": dead}, **accounting(redis_server)
    )
    rejected = await send_one(server, ["ann@example.org"])
    assert rejected.final is not None and rejected.final.code == 554
    [message] = refusing.messages  # it got the data, then refused it: no copy delivered
    assert not message.accepted and refusing.delivered == []
    unreachable = await send_one(server, ["bob@example.com"])
    assert [r.code for r in unreachable.rcpt] == [451] and unreachable.final is None
    await counters_become(redis_server, {
        "dest": {refusing.address: (0, 0, 1), dead: (0, 0, 1)},
        "rcpt": {"ann@example.org": (0, 0, 1), "bob@example.com": (0, 0, 1)},
        "domain": {"example.org": (0, 0, 1), "example.com": (0, 0, 1)},
        **origin("mx-e2e", 0, 0, refused=2),
    })
    [leg] = await legs_logged(server, 1)
    assert (leg["dest"], leg["code"], leg["size"]) == (refusing.address, 554, sizes([message]))


async def test_two_nodes_on_one_redis_add_up(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    dest = make_recorder()
    routes = {"example.org": dest}
    node_a = await moxy(routes, **accounting(redis_server, node="mx-a"))
    node_b = await moxy(routes, **accounting(redis_server, node="mx-b"))
    via = [node_a, node_b, node_a]
    for n, node in enumerate(via):
        body = f"Subject: {n}\r\n\r\n{'x' * 100 * (n + 1)}\r\n".encode()
        outcome = await send_one(node, ["user@example.org"], body)
        assert outcome.final is not None and outcome.final.code == 250
    delivered = dest.delivered
    assert len(delivered) == 3
    on_a = sizes([delivered[0], delivered[2]])
    on_b = sizes([delivered[1]])
    total = on_a + on_b
    await counters_become(redis_server, {
        "dest": {dest.address: copy(total, 3)},
        "rcpt": {"user@example.org": copy(total, 3)},
        "domain": {"example.org": copy(total, 3)},
        "sender": {SENDER: copy(total, 3)},
        "ip": {CLIENT_IP: copy(total, 3)},
        "node": {"mx-a": copy(on_a, 2), "mx-b": copy(on_b, 1)},
    })


# --- Redis down in the middle of a run ----------------------------------------------------

REDIS_TIMEOUT = 4.0


async def test_redis_stopped_and_restarted_delays_nothing_and_loses_nothing(
    moxy: StartMoxy,
    make_recorder: MakeRecorder,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dest = make_recorder()
    server = await moxy(
        {"example.org": dest}, **accounting(redis_server, timeout=REDIS_TIMEOUT)
    )

    async def send(count: int) -> list[float]:
        took = []
        for _ in range(count):
            start = trio.current_time()
            outcome = await send_one(server, ["user@example.org"])
            took.append(trio.current_time() - start)
            assert outcome.final is not None and outcome.final.code == 250
        return took

    def expected() -> dict[str, Table]:
        size, msgs = sizes(dest.delivered), len(dest.delivered)
        return {
            "dest": {dest.address: copy(size, msgs)},
            "rcpt": {"user@example.org": copy(size, msgs)},
            "domain": {"example.org": copy(size, msgs)},
            **origin("mx-e2e", msgs, size),
        }

    await send(2)
    await counters_become(redis_server, expected())
    await trio.to_thread.run_sync(redis_server.stop)
    took = await send(3)
    # The sink has tried to flush those, and found Redis gone; mail goes on all the same.
    await eventually(lambda: "accounting: redis unreachable" in caplog.text, timeout=10)
    took += await send(3)
    assert len(dest.delivered) == 8
    # Generous margin on a loaded machine: a send that waited for Redis would take its timeout.
    assert max(took) < REDIS_TIMEOUT / 2, took
    await trio.to_thread.run_sync(redis_server.start)
    # Retries back off from flush_interval up to 30 s: the outage here lasts a few seconds.
    await counters_become(redis_server, expected(), timeout=40.0)
    assert "0 events dropped during the outage" in caplog.text


# --- GDBM log and moxystats over a running server -----------------------------------------


async def moxystats(*args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    done = await trio.run_process(
        [MOXYSTATS, *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""
    return done


async def json_rows_become(
    args: Sequence[str], expected: list[tuple[object, ...]], fields: Sequence[str]
) -> list[dict[str, Any]]:
    """Run `moxystats ARGS --once --json` until its rows (those fields) are `expected` (a GDBM
    log does not exist before the sink's first flush: moxystats fails until then)."""
    deadline = trio.current_time() + 15
    while True:
        done = await moxystats(*args, "--once", "--json", check=False)
        rows: list[dict[str, Any]] = json.loads(done.stdout) if done.returncode == 0 else []
        if [tuple(row[f] for f in fields) for row in rows] == expected:
            assert done.stderr == b""
            return rows
        assert trio.current_time() < deadline, (rows, expected, done.stderr.decode())
        await trio.sleep(0.2)


async def test_moxystats_reads_the_gdbm_log_a_running_server_writes(
    moxy: StartMoxy, make_recorder: MakeRecorder, tmp_path: Path
) -> None:
    plain, mirror = make_recorder(), make_recorder()
    path = tmp_path / "accounting.db"
    server = await moxy(
        {"example.org": plain, "example.net": [plain, mirror]},
        server={"node": "mx-e2e"},
        accounting={"sinks": ["file", "gdbm"]},
        **{"accounting.gdbm": {"path": str(path), "flush_interval": 0.1}},
    )
    before = time.time()
    for rcpts in (["ann@example.org"], ["bob@example.net"], ["ann@example.org"]):
        outcome = await send_one(server, rcpts)
        assert outcome.final is not None and outcome.final.code == 250
    assert len(plain.delivered) == 3 and len(mirror.delivered) == 1
    on_plain, on_mirror = sizes(plain.delivered), sizes(mirror.delivered)
    fields = ("key", "messages", "bytes")
    rows = await json_rows_become(
        ["--gdbm", str(path)],
        sorted([(plain.address, 3, on_plain), (mirror.address, 1, on_mirror)],
               key=lambda row: -row[2]),
        fields,
    )  # fmt: skip
    for row in rows:
        first = calendar.timegm(time.strptime(row["first_seen"], "%Y-%m-%dT%H:%M:%SZ"))
        assert before - 1 <= first <= time.time() + 1, row
    ann = [m for m in plain.delivered if m.rcpts == ["ann@example.org"]]
    await json_rows_become(
        ["--gdbm", str(path), "--by", "rcpt"],
        sorted([("ann@example.org", 2, sizes(ann)),
                ("bob@example.net", 2, on_plain + on_mirror - sizes(ann))],
               key=lambda row: -row[2]),
        fields,
    )  # fmt: skip
    assert server.log_file.exists()


async def test_moxystats_reads_the_config_of_the_running_server(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    plain, mirror = make_recorder(), make_recorder()
    server = await moxy(
        {"example.org": plain, "example.net": [plain, mirror]}, **accounting(redis_server)
    )
    for rcpts in (["ann@example.org", "x@unrouted.test"], ["bob@example.net"]):
        outcome = await send_one(server, rcpts)
        assert outcome.final is not None and outcome.final.code == 250
    on_plain, on_mirror = sizes(plain.delivered), sizes(mirror.delivered)
    config = str(server.config_path)
    fields = ("key", "messages", "bytes", "refused")
    await json_rows_become(
        ["--config", config],
        sorted([(plain.address, 2, on_plain, 0), (mirror.address, 1, on_mirror, 0)],
               key=lambda row: -row[2]),
        fields,
    )  # fmt: skip
    await json_rows_become(
        ["--config", config, "--by", "domain"],
        [("example.net", 2, on_mirror + sizes(plain.delivered[1:]), 0),
         ("example.org", 1, sizes(plain.delivered[:1]), 0),
         ("unrouted.test", 0, 0, 1)],
        fields,
    )  # fmt: skip
    [node] = await json_rows_become(
        ["--config", config, "--by", "node"], [("mx-e2e", 3, on_plain + on_mirror, 1)], fields
    )
    assert node["messages_per_min_1m"] > 0
    # The table a person reads: one row per destination, with the same counts.
    table = (await moxystats("--config", config, "--once")).stdout.decode().splitlines()
    assert table[0].startswith(f"moxystats: Redis {redis_server.url}, by dest, totals, ")
    rows = {line.split()[0]: line.split()[1:5] for line in table[2:]}
    assert rows[plain.address][0] == "2" and rows[mirror.address][0] == "1"
    assert rows[mirror.address][1:3] == [str(on_mirror), "B"]


async def test_a_mirror_with_a_dead_group_and_a_leg_cut_at_end_of_data(
    moxy: StartMoxy, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    """A mirror's second group refuses connections: the recipient is refused (all of its groups
    or none), and the live group delivers nothing. A destination that drops the connection
    after the data (no reply): a failed leg, code 0, counted refused."""
    live = make_recorder()
    dropping = make_recorder({"end_of_data": DISCONNECT})
    dead = f"127.0.0.1:{free_port()}"
    server = await moxy(
        {"example.net": [live, dead], "example.com": dropping}, **accounting(redis_server)
    )
    mirrored = await send_one(server, ["ann@example.net"])
    assert [r.code for r in mirrored.rcpt] == [451] and mirrored.final is None
    cut = await send_one(server, ["bob@example.com"])
    assert cut.final is not None and cut.final.klass == 4
    [message] = dropping.messages
    assert live.messages == [] and dropping.delivered == []
    await counters_become(redis_server, {
        "dest": {dead: (0, 0, 1), dropping.address: (0, 0, 1)},
        "rcpt": {"ann@example.net": (0, 0, 1), "bob@example.com": (0, 0, 1)},
        "domain": {"example.net": (0, 0, 1), "example.com": (0, 0, 1)},
        **origin("mx-e2e", 0, 0, refused=2),
    })
    [leg] = await legs_logged(server, 1)
    assert (leg["dest"], leg["code"], leg["size"]) == (dropping.address, 0, sizes([message]))
