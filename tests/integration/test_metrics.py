"""The Prometheus endpoint: scraped over HTTP after real traffic through Moxy."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import trio

from moxy.accounting.base import SinkStats
from moxy.metrics import Prometheus
from moxy.metrics_http import MAX_SCRAPES, REQUEST_LIMIT, REQUEST_TIMEOUT
from peers.client import SmtpClient, smtplib_send
from peers.moxy import MoxyProcess, Routes, RunningMoxy, StartMoxy
from peers.recorder import Recorder
from peers.scrape import Scrape, get, scrape
from peers.sink import free_port
from peers.waiting import eventually

from .helpers import BODY, SENDER, open_session, send_one

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]


async def start(
    moxy: StartMoxy, routes: Routes, metrics: Mapping[str, object] = {}, **sections: object
) -> tuple[RunningMoxy, int]:
    """Moxy in this trio run, with metrics on a free port."""
    port = free_port()
    server = await moxy(routes, metrics={"listen": f"127.0.0.1:{port}", **metrics}, **sections)
    return server, port


async def fetch(port: int, settled: bool = True) -> Scrape:
    """A scrape; `settled`: once every session has ended (a client has its last reply a moment
    before the server has closed the session and its legs, with QUIT upstream)."""
    with trio.fail_after(10):
        while True:
            m = await trio.to_thread.run_sync(scrape, "127.0.0.1", port)
            if not settled or m.value("moxy_connections_open") == 0:
                return m
            await trio.sleep(0.02)


async def test_counters_follow_the_traffic(moxy: StartMoxy, make_recorder: MakeRecorder) -> None:
    upstream = make_recorder(rcpt_script={"nobody@example.org": "550 5.1.1 No such user"})
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    server, port = await start(moxy, {"example.org": upstream, "down.test": down})
    for _ in range(3):
        outcome = await send_one(server, ["user@example.org"])
        assert outcome.final is not None and outcome.final.code == 250
    outcome = await send_one(
        server, ["user@example.org", "nobody@example.org", "x@elsewhere.test", "y@down.test"]
    )
    assert [r.code for r in outcome.rcpt] == [250, 550, 550, 451]
    assert outcome.final is not None and outcome.final.code == 250

    m = await fetch(port)
    assert m.value("moxy_messages_total", result="2xx") == 4
    assert m.total("moxy_messages_total") == 4
    assert m.value("moxy_recipients_total", result="2xx") == 4
    assert m.value("moxy_recipients_total", result="5xx") == 2
    assert m.value("moxy_recipients_total", result="4xx") == 1
    assert m.value("moxy_recipients_refused_total", reason="destination-refused") == 1
    assert m.value("moxy_recipients_refused_total", reason="relay-denied") == 1
    assert m.value("moxy_recipients_refused_total", reason="destination-unavailable") == 1
    assert m.value("moxy_recipients_refused_total", reason="lookup-failed") == 0
    # Octets: what the client sent (BODY, without the final dot line), and what arrived.
    assert m.value("moxy_received_bytes_total") == 4 * len(BODY)
    assert len(upstream.messages) == 4
    sent = sum(len(msg.data or b"") for msg in upstream.messages)
    assert m.value("moxy_sent_bytes_total") == sent > 4 * len(BODY)  # plus Received: headers
    assert m.value("moxy_upstream_messages_total", result="2xx") == 4
    # Four sessions (one per message), all over; the first opened one connection to the
    # recorder, which the upstream pool (on by default) kept for the next three (the attempt
    # at down.test failed before a connection was made).
    assert m.value("moxy_connections_total") == 4
    assert m.value("moxy_connections_open") == 0
    assert m.value("moxy_upstream_connect_seconds_count") == 1
    assert m.value("moxy_upstream_reply_seconds_count", stage="mail") == 4
    assert m.value("moxy_upstream_reply_seconds_count", stage="rcpt") == 5
    assert m.value("moxy_upstream_reply_seconds_count", stage="data") == 4
    assert m.value("moxy_upstream_reply_seconds_count", stage="end-of-data") == 4
    assert m.value("moxy_upstream_reply_seconds_sum", stage="end-of-data") > 0
    assert m.value("moxy_upstream_reply_seconds_bucket", stage="mail", le="+Inf") == 4
    # Every recipient asked the cache; the first lookups went to the routes file, later ones of
    # the same keys were answered from the cache.
    misses = m.value("moxy_route_cache_misses_total")
    assert misses >= 3  # user@example.org, x@elsewhere.test, y@down.test at least
    assert m.value("moxy_route_cache_hits_total") >= 3
    assert m.value("moxy_route_lookup_seconds_count") == misses
    # No destination labels unless asked for, and never a client's address.
    assert "destination" not in m.label_names()
    assert "127.0.0.1" not in "".join(v for ls in m.samples for _, v in ls[1])


async def test_a_verdict_out_of_step_counts_by_its_code(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """A 250 at the end of data followed by more than asked: the destination has the copy
    (the message log keeps its 250); the metric counted it as failed (no final reply)."""
    chatty = make_recorder({"end_of_data": "250 2.0.0 Ok: queued\r\n250 2.0.0 Ok again"})
    server, port = await start(moxy, {"example.org": chatty})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 451, outcome.transcript
    m = await fetch(port)
    assert m.value("moxy_upstream_messages_total", result="2xx") == 1
    assert m.value("moxy_upstream_messages_total", result="failed") == 0


async def test_per_destination_labels(moxy: StartMoxy, make_recorder: MakeRecorder) -> None:
    first, second = make_recorder(), make_recorder()
    server, port = await start(
        moxy, {"a.test": first, "b.test": second}, metrics={"per_destination": True}
    )
    await send_one(server, ["u@a.test"])
    await send_one(server, ["u@b.test"])
    await send_one(server, ["v@b.test"])
    m = await fetch(port)
    for recorder, count in ((first, 1), (second, 2)):
        dest = recorder.address
        sent = sum(len(msg.data or b"") for msg in recorder.messages)
        assert m.value("moxy_sent_bytes_total", destination=dest) == sent
        assert m.value("moxy_upstream_messages_total", result="2xx", destination=dest) == count
        # One connection each: the upstream pool (on by default) serves b.test's second
        # session with the first one's connection.
        assert m.value("moxy_upstream_connect_seconds_count", destination=dest) == 1
        assert m.value(
            "moxy_upstream_reply_seconds_count", stage="end-of-data", destination=dest
        ) == count
    assert {ls["destination"] for ls in m.labels("moxy_sent_bytes_total")} == {
        first.address, second.address
    }
    # Client-side metrics stay without it.
    assert m.labels("moxy_messages_total") == [{"result": "2xx"}, {"result": "4xx"},
                                               {"result": "5xx"}]


async def test_refused_connections_by_reason(moxy: StartMoxy, make_recorder: MakeRecorder) -> None:
    server, port = await start(
        moxy, {"example.org": make_recorder()},
        limits={"connections": 1, "errors": 1}, timeouts={"client_command": 1.0},
    )
    first = await open_session(server)
    async with await SmtpClient.connect(server.host, server.port) as second:
        assert (await second.reply()).code == 421  # connection limit
    await first.command("BOGUS")
    assert (await first.command("BOGUS")).code == 421  # too many errors
    await first.aclose()
    async with await SmtpClient.connect(server.host, server.port) as third:
        await third.reply()
        assert (await third.reply(timeout=10)).code == 421  # idle past client_command
    m = await fetch(port)
    assert m.value("moxy_connections_refused_total", reason="connection-limit") == 1
    assert m.value("moxy_connections_refused_total", reason="protocol-errors") == 1
    assert m.value("moxy_connections_refused_total", reason="timeout") == 1
    assert m.value("moxy_connections_total") == 3


async def test_recipients_refused_by_policy(moxy: StartMoxy, make_recorder: MakeRecorder) -> None:
    first, second = make_recorder(), make_recorder()
    server, port = await start(
        moxy, {"a.test": first, "b.test": second},
        proxy={"split_destinations": True}, limits={"recipients": 2},
    )
    outcome = await send_one(server, ["u@a.test", "u@b.test", "v@a.test", "w@a.test"])
    # b.test has other destinations (split_destinations); w@ is one over limits.recipients.
    assert [r.code for r in outcome.rcpt] == [250, 452, 250, 452]
    m = await fetch(port)
    assert m.value("moxy_recipients_total", result="2xx") == 2
    assert m.value("moxy_recipients_total", result="4xx") == 2
    assert m.value("moxy_recipients_refused_total", reason="policy") == 2
    assert m.total("moxy_recipients_refused_total") == 2


async def test_the_endpoint_answers_only_get_metrics(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    _, port = await start(moxy, {"example.org": make_recorder()})
    status, _, _ = await trio.to_thread.run_sync(get, f"http://127.0.0.1:{port}/")
    assert status == 404

    def post() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"POST /metrics HTTP/1.0\r\n\r\n")
            return raw.recv(100)

    assert (await trio.to_thread.run_sync(post)).startswith(b"HTTP/1.0 405 ")
    m = await fetch(port)  # and it still serves
    assert m.value("moxy_connections_total") == 0


async def test_commands_the_protocol_core_refuses_are_not_counted(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    # docs/metrics.md: RCPT and DATA refused by Moxy's own sequence and syntax checks are in
    # no count (only their protocol errors are); a recipient refused by routing is.
    server, port = await start(moxy, {"example.org": make_recorder()})
    client = await open_session(server)
    assert (await client.command("RCPT TO:<user@example.org>")).code == 503  # before MAIL
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command("RCPT TO:<bad address>")).code == 501
    assert (await client.command("RCPT TO:<user@elsewhere.test>")).code == 550  # relay denied
    assert (await client.command("DATA")).code == 554  # no valid recipients
    assert (await client.command("QUIT")).code == 221
    await client.aclose()
    m = await fetch(port)
    assert m.value("moxy_recipients_total", result="5xx") == 1
    assert m.total("moxy_recipients_total") == 1
    assert m.total("moxy_messages_total") == 0


def test_sink_statistics(tmp_path: Path) -> None:
    metrics = Prometheus()

    def value(name: str, sink: str) -> float | None:
        assert metrics.registry is not None
        return metrics.registry.get_sample_value(name, {"sink": sink})

    metrics.observe_sinks({"file": SinkStats(backlog=3), "redis": SinkStats(dropped=2)})
    metrics.observe_sinks({"file": SinkStats(backlog=1, dropped=5), "redis": SinkStats(dropped=2)})
    assert value("moxy_accounting_backlog", "file") == 1
    assert value("moxy_accounting_dropped_total", "file") == 5
    assert value("moxy_accounting_backlog", "redis") == 0
    assert value("moxy_accounting_dropped_total", "redis") == 2
    # A sink made anew (its running total restarts) adds all of its drops.
    metrics.observe_sinks({"redis": SinkStats(dropped=1)})
    assert value("moxy_accounting_dropped_total", "redis") == 3


# --- as `moxy serve` runs it ----------------------------------------------------------------


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_are_off_by_default(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    moxy = moxy_process({"example.org": make_recorder()})
    assert listening_ports(moxy.process.pid) == {moxy.port}


async def send(moxy: MoxyProcess, n: int) -> None:
    message = f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode()
    refused = await trio.to_thread.run_sync(
        smtplib_send, moxy.host, moxy.port, SENDER, ["user@example.org"], message
    )
    assert refused == {}


async def test_with_workers_the_master_serves_the_sum(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    port = free_port()
    moxy = moxy_process(
        {"example.org": upstream}, server={"workers": 2}, metrics={"listen": f"127.0.0.1:{port}"}
    )
    master = moxy.process.pid
    workers = {int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()}
    assert len(workers) == 2
    # The master listens on the metrics port; the workers only on the SMTP one.
    assert listening_ports(master) == {moxy.port, port}
    assert all(listening_ports(pid) == {moxy.port} for pid in workers)
    directory = Path(re.findall(r"values kept in (\S+)\)", moxy.stderr())[0])
    # The fixture's own connection, waiting for the greeting, may still be open.
    before = await fetch(port, settled=False)
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(send, moxy, n)
    assert len(upstream.messages) == 20
    m = await fetch(port)
    assert m.value("moxy_messages_total", result="2xx") == 20
    assert m.value("moxy_recipients_total", result="2xx") == 20
    assert m.value("moxy_connections_total") - before.value("moxy_connections_total") == 20
    assert m.value("moxy_upstream_reply_seconds_count", stage="end-of-data") == 20
    # Each worker keeps its own values; the master adds them up.
    assert {int(f.stem.rsplit("_", 1)[1]) for f in directory.glob("counter_*.db")} == workers
    # A worker that dies keeps its counts in the sum; its replacement adds to them.
    os.kill(min(workers), signal.SIGKILL)
    await eventually(
        lambda: (directory / f"counter_{min(workers)}.db").exists()
        and len(Path(f"/proc/{master}/task/{master}/children").read_text().split()) == 2,
        timeout=10, what="a replacement worker",
    )
    for n in range(4):
        await send(moxy, n)
    m = await fetch(port)
    assert m.value("moxy_messages_total", result="2xx") == 24
    assert m.value("moxy_connections_open") == 0
    assert moxy.stop() == 0
    assert not directory.exists()  # the master cleans up after itself


def refuse_recipients(moxy: MoxyProcess, count: int) -> None:
    """One session whose `count` recipients are all refused (no route): an event each."""
    with smtplib.SMTP(moxy.host, moxy.port, timeout=10) as smtp:
        smtp.ehlo()
        smtp.mail(SENDER)
        for n in range(count):
            assert smtp.rcpt(f"user{n}@nowhere.test")[0] == 550


def test_with_workers_the_accounting_sinks_are_reported(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    port = free_port()
    moxy = moxy_process(
        {"example.org": make_recorder()}, server={"workers": 2},
        metrics={"listen": f"127.0.0.1:{port}"}, accounting={"sinks": ["redis"]},
        limits={"errors": 100},  # 30 refused recipients in one session
        # No Redis there: the sink holds what fits into its backlog and drops the rest.
        **{"accounting.redis": {"url": f"redis://127.0.0.1:{free_port()}/0", "backlog": 20,
                                "timeout": 0.2}},
    )
    refuse_recipients(moxy, 30)  # one session: one worker's sink overflows
    deadline = time.monotonic() + 10
    while (m := scrape("127.0.0.1", port)).value("moxy_accounting_dropped_total",
                                                   sink="redis") == 0:
        assert time.monotonic() < deadline, f"no drops reported:\n{m.text}"
        time.sleep(0.1)
    assert 0 < m.value("moxy_accounting_backlog", sink="redis") <= 2 * 20


def ask(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` as it is; the response's head and body (up to the close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        response = b""
        while data := conn.recv(65536):
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


def closed(conn: socket.socket, timeout: float) -> bool:
    """Whether the server closes `conn` within `timeout`, with no response."""
    conn.settimeout(timeout)
    try:
        return conn.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("workers", [1, 2])
def test_the_endpoint_keeps_the_same_rules_with_workers(
    moxy_process: StartProcess, make_recorder: MakeRecorder, workers: int
) -> None:
    # With workers the master serves /metrics; it answers as a single process does.
    port = free_port()
    moxy_process({"example.org": make_recorder()}, server={"workers": workers},
                 metrics={"listen": f"127.0.0.1:{port}"})
    head, body = ask(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"moxy_connections_total" in body
    length = f"Content-Length: {len(body)}".encode()
    assert length in head.split(b"\r\n")
    head, body = ask(port, b"HEAD /metrics?x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and body == b""
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head.split(b"\r\n")
    for path in (b"/", b"/not-metrics", b"/metrics/"):
        head, _ = ask(port, b"GET " + path + b" HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 404 "), (path, head)
    for method in (b"POST", b"OPTIONS", b"PUT"):
        head, _ = ask(port, method + b" /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 405 "), (method, head)
    too_long = b"GET /metrics HTTP/1.0\r\nX: ".ljust(REQUEST_LIMIT + 1, b"x")  # all of it read
    head, _ = ask(port, too_long)
    assert head.startswith(b"HTTP/1.0 431 ")
    # At most MAX_SCRAPES at once: one more is closed at once; a request head not finished
    # within REQUEST_TIMEOUT is closed then.
    started = time.monotonic()
    hanging = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_SCRAPES)]
    try:
        for conn in hanging:
            conn.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        time.sleep(0.5)  # all of them taken in
        with socket.create_connection(("127.0.0.1", port)) as extra:
            extra.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert closed(extra, 2)
        for conn in hanging:
            assert closed(conn, REQUEST_TIMEOUT + 3 - (time.monotonic() - started))
        assert time.monotonic() - started > REQUEST_TIMEOUT - 0.5
    finally:
        for conn in hanging:
            conn.close()
    scrape("127.0.0.1", port)  # and it still serves


def test_a_metrics_address_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    for workers in (1, 2):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            (tmp_path / "routes").write_text("example.org 127.0.0.1:2526\n")
            config = tmp_path / "moxy.toml"
            config.write_text(
                f'[server]\nlisten = ["127.0.0.1:0"]\nworkers = {workers}\n'
                f'[routes]\nfile = "routes"\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
            )
            result = subprocess.run(
                [sys.executable, "-m", "moxy", "serve", "--config", str(config)],
                capture_output=True, text=True, timeout=30, check=False,
            )
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"moxy: cannot listen on metrics address 127.0.0.1:{port}: Address already in use"
        )
        assert "Traceback" not in result.stderr


# --- the Grafana dashboard ------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "moxy-dashboard.json"


def _queries(node: object) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            else:
                found += _queries(value)
    elif isinstance(node, list):
        for item in node:
            found += _queries(item)
    return found


async def test_the_dashboard_uses_only_exported_metrics(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = _queries(dashboard)
    assert len(queries) >= 15
    server, port = await start(moxy, {"example.org": make_recorder()})
    await send_one(server, ["user@example.org"])
    m = await fetch(port)
    exported = m.names()
    used = {name for q in queries for name in re.findall(r"\bmoxy_[a-z0-9_]+", q)}
    assert used and used <= exported, used - exported
    # The families the dashboard is meant to show are all there.
    for family in ("moxy_messages_total", "moxy_received_bytes_total", "moxy_sent_bytes_total",
                   "moxy_connections_open", "moxy_upstream_reply_seconds_bucket",
                   "moxy_route_cache_hits_total", "moxy_accounting_backlog",
                   "moxy_accounting_dropped_total"):
        assert family in used
    # Every label it groups by is one Moxy's metrics carry (or the histograms' "le").
    grouped = {label.strip() for q in queries for labels in re.findall(r"by \(([^)]*)\)", q)
               for label in labels.split(",")}
    known = m.label_names() | {"le", "sink"}  # "sink": no accounting sink reports in this test
    assert grouped <= known, grouped - known


async def test_the_dead_set_is_counted(moxy: StartMoxy) -> None:
    down = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    server, port = await start(moxy, {"down.test": down})
    for _ in range(3):
        outcome = await send_one(server, ["user@down.test"])
        assert [r.code for r in outcome.rcpt] == [451]
    m = await fetch(port)
    assert m.value("moxy_destination_marked_down_total") == 1  # the first sender's attempt
    assert m.value("moxy_destination_skipped_total", reason="down") == 2  # not tried again
    assert m.value("moxy_destination_skipped_total", reason="busy") == 0
    assert m.value("moxy_destinations_down") == 1


async def test_upstream_connections_open_and_idle(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """The gauges follow the upstream connections about once a second: one in use while a
    client's transaction holds it, then idle in the pool once its session has ended."""
    server, port = await start(moxy, {"example.org": make_recorder(),
                                      "example.net": make_recorder()})

    async def gauges(expected: tuple[float, float]) -> None:
        with trio.fail_after(10):
            while True:
                m = await fetch(port, settled=False)
                now = (m.value("moxy_upstream_connections"),
                       m.value("moxy_upstream_connections_idle"))
                if now == expected:
                    return
                await trio.sleep(0.1)

    await gauges((0, 0))
    async with await open_session(server) as client:
        await client.command(f"MAIL FROM:<{SENDER}>")
        assert (await client.command("RCPT TO:<a@example.org>")).code == 250
        assert (await client.command("RCPT TO:<b@example.net>")).code == 250
        await gauges((2, 0))  # two destinations, a connection each, both in use
        assert (await client.command("DATA")).code == 354
        await client.send(BODY + b".\r\n")
        assert (await client.reply()).code == 250
        await client.command("QUIT")
    await gauges((2, 2))  # back in the pool when the session ends
