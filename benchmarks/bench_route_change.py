#!/usr/bin/env python3
"""How long a route change in Redis takes to reach a second Moxy node (target: < 100 ms).

Starts a redis-server, two recording upstreams ("A" and "B", whose RCPT replies name them) and
two `moxy serve` nodes sharing the Redis, routes `user@bench.test` to A, then changes the route
again and again, alternating A and B. Each change is made with `route_set()`, Moxy's library
call behind `moxy route set` (`--via cli` runs `moxy route set` itself), as if on node 1. The
clock starts when that call returns and stops when node 2 routes to the new upstream: a client
holds an SMTP session to node 2 and repeats MAIL, RCPT, RSET; the RCPT reply comes from the
upstream node 2 chose. This goes through node 2's route cache exactly as mail does (the cache
TTL is an hour, so only the change announcement can explain a new answer), and includes one
probe round trip, measured separately as the resolution.

    .venv/bin/python benchmarks/bench_route_change.py [--changes 200] [--via function|cli]

Everything binds 127.0.0.1 and stops by itself. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test suite's recording SMTP server

from moxy.lookup.redis import RedisSettings, connect, route_set  # noqa: E402
from peers.recorder import Recorder  # type: ignore[import-not-found]  # noqa: E402

KEY = "bench.test"
RCPT = "user@bench.test"
TARGET = 0.100  # seconds
GIVE_UP = 5.0  # seconds to wait for one change before counting it as lost


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ready: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not come up within {timeout:g}s")


def greets(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), 1) as s:
        return s.recv(512).startswith(b"220")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
    if binary is None:
        raise SystemExit("bench: redis-server not found; install it with: apt-get install "
                         "redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for("redis-server", lambda: bool(socket.create_connection(("127.0.0.1", port), 1)))
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def moxy_node(name: str, redis_url: str, workdir: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    directory = workdir / name
    directory.mkdir()
    config = directory / "moxy.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "{name}.bench.test"\n'
        '[routes]\nchain = ["redis"]\n'
        f'[routes.redis]\nurl = "{redis_url}"\n'
        "[routes.cache]\nttl = 3600\nnegative_ttl = 3600\n"
        '[log]\nfile = "moxy.log"\nlevel = "warning"\n'
    )
    with open(directory / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moxy", "serve", "-c", str(config)],
            stdout=stderr, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(f"moxy serve ({name})", lambda: greets(port))
        yield port, config
    finally:
        proc.terminate()
        proc.wait(10)


class Probe:
    """One SMTP session to a node; `where()` is the name of the upstream the RCPT went to."""

    def __init__(self, port: int) -> None:
        self.smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
        self.smtp.ehlo("probe.bench.test")

    def where(self) -> str:
        self.smtp.mail("probe@client.bench.test")
        code, text = self.smtp.rcpt(RCPT)
        self.smtp.rset()
        if code != 250:
            raise SystemExit(f"bench: RCPT answered {code} {text.decode()}")
        return text.decode().split()[-1]

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.smtp.quit()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--changes", type=int, default=200, help="route changes to time")
    ap.add_argument(
        "--via", choices=("function", "cli"), default="function",
        help="make each change with route_set() or with `moxy route set` (a process each)",
    )  # fmt: skip
    args = ap.parse_args()

    upstreams = {
        name: Recorder({"rcpt": f"250 2.1.5 {name}"}, keep_data=False, name=name)
        for name in ("A", "B")
    }
    with contextlib.ExitStack() as stack:
        for upstream in upstreams.values():
            stack.callback(upstream.stop)
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis_url = stack.enter_context(redis_server(workdir))
        settings = RedisSettings(url=redis_url)
        client = connect(settings)
        stack.callback(client.close)
        route_set(client, settings, KEY, upstreams["A"].address)
        _, node1_config = stack.enter_context(moxy_node("node1", redis_url, workdir))
        node2_port, _ = stack.enter_context(moxy_node("node2", redis_url, workdir))
        probe = Probe(node2_port)
        stack.callback(probe.close)

        def change(to: str) -> None:
            if args.via == "function":
                route_set(client, settings, KEY, upstreams[to].address)
                return
            subprocess.run(
                [sys.executable, "-m", "moxy", "route", "set", "-c", str(node1_config), KEY,
                 upstreams[to].address],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip

        # The resolution: probes while nothing changes (both upstream legs open by now).
        change("B")
        wait_for("the first change", lambda: probe.where() == "B", GIVE_UP)
        change("A")
        wait_for("the second change", lambda: probe.where() == "A", GIVE_UP)
        round_trips = []
        for _ in range(200):
            started = time.perf_counter()
            probe.where()
            round_trips.append(time.perf_counter() - started)

        delays: list[float] = []
        lost = 0
        current = "A"
        for _ in range(args.changes):
            time.sleep(random.uniform(0.005, 0.03))  # not in step with the node's listener
            current = "B" if current == "A" else "A"
            change(current)
            started = time.perf_counter()
            while probe.where() != current:
                if time.perf_counter() - started > GIVE_UP:
                    lost += 1
                    break
            else:
                delays.append(time.perf_counter() - started)

    print(f"route change propagation: {args.changes} changes made with "
          f"{'route_set()' if args.via == 'function' else '`moxy route set`'}, "
          "node 2 probed with MAIL/RCPT/RSET")
    print(f"  probe round trip (resolution): median {ms(statistics.median(round_trips))}, "
          f"p95 {ms(percentile(round_trips, 0.95))}")
    if delays:
        print(f"  change -> node 2 routes to the new upstream: median "
              f"{ms(statistics.median(delays))}, p95 {ms(percentile(delays, 0.95))}, "
              f"max {ms(max(delays))}")
    if lost:
        print(f"  {lost} changes not seen within {GIVE_UP:g}s")
    met = not lost and bool(delays) and max(delays) < TARGET
    print(f"  target < {TARGET * 1000:.0f} ms for every change: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
