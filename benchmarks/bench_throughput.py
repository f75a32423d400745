#!/usr/bin/env python3
"""Messages per second through Moxy against direct delivery, and Moxy's memory.

Load generator: Postfix's `smtp-source`; destination: Postfix's `smtp-sink` (package `postfix`).
Moxy runs as a subprocess (`python -m moxy serve`) with a route to the sink. Prints a table of
msgs/s direct vs through Moxy and their ratio, then Moxy's resident memory idle, with many idle
client connections, and after a large message.

    .venv/bin/python benchmarks/bench_throughput.py [--messages 3000] [--sessions 20] ...

`--accounting` adds Moxy's Redis counters (`[accounting] sinks = ["file", "redis"]`) on a
throwaway redis-server, so that a run with and one without it show what accounting costs; the
run ends by reading the counters back (copies counted against messages sent).

Everything binds 127.0.0.1 and stops by itself. Results and how to read them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from proxies import accounting_toml, free_port, redis_server
from proxies import need as _need
from proxies import smtp_sink as sink


def need(tool: str) -> str:
    return _need(tool, "postfix")


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def counted_copies(redis_url: str) -> tuple[int, int]:
    """Copies and bytes the Redis counters hold, summed over nodes (what every node counted)."""
    import redis  # Moxy's own dependency; only --accounting needs it

    client = redis.Redis.from_url(redis_url, socket_timeout=5)

    def total(key: str) -> int:
        scored = cast(list[tuple[bytes, float]], client.zrange(key, 0, -1, withscores=True))
        return int(sum(score for _, score in scored))

    return total("moxy:acct:total:node:msgs"), total("moxy:acct:total:node:bytes")


def moxy_extra(metrics: bool, redis_url: str | None) -> str:
    """The configuration tables this benchmark adds to proxies.moxy's."""
    extra = f'[metrics]\nlisten = "127.0.0.1:{free_port()}"\n' if metrics else ""
    # Every session goes to the one sink: without lifting the per-destination cap (20 by
    # default), --sessions above 20 would measure 451 4.4.5 replies, not throughput.
    extra += "[destinations]\nconcurrency = 0\n"
    # The message log is written either way (the "file" sink is the default); this adds the
    # Redis counters every node of a cluster would keep.
    return extra + (accounting_toml(redis_url) if redis_url else "")


def source(port: int, messages: int, sessions: int, size: int, reuse: bool, rcpts: int) -> float:
    args = [need("smtp-source"), "-m", str(messages), "-s", str(sessions), "-l", str(size),
            "-r", str(rcpts), "-f", "bench@client.test", "-t", "user@bench.test"]
    if reuse:
        args.append("-d")
    started = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def idle_connections(port: int, count: int) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.recv(512)  # the greeting: the session exists
        conns.append(s)
    return conns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--sizes", default="1024,10240,102400", help="message sizes in bytes")
    ap.add_argument("--recipients", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="Moxy's [server] workers")
    ap.add_argument("--idle-upstreams", type=int, default=None,
                    help="Moxy's limits.idle_upstreams (default: Moxy's default, 20)")
    ap.add_argument("--metrics", action="store_true", help="Moxy's Prometheus endpoint on")
    ap.add_argument("--accounting", action="store_true",
                    help='Redis counters on ([accounting] sinks = ["file", "redis"], '
                         "a throwaway redis-server)")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections for the memory test")
    ap.add_argument("--large", type=int, default=50_000_000, help="bytes of the large message")
    args = ap.parse_args()

    sink_port = free_port()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        redis_url = stack.enter_context(redis_server(tmp)) if args.accounting else None
        stack.enter_context(sink(sink_port))
        proc = stack.enter_context(proxies.moxy(
            tmp, f"bench.test  127.0.0.1:{sink_port}\n", workers=args.workers,
            idle_upstreams=args.idle_upstreams, extra=moxy_extra(args.metrics, redis_url),
        ))
        moxy_port = proc.port
        if redis_url:
            print(f"accounting: message log and Redis counters ({redis_url})")
        print(f"{'size':>8} {'conn':>6} {'direct msg/s':>13} {'moxy msg/s':>11} {'ratio':>6}")
        sent = 0
        for size in (int(s) for s in args.sizes.split(",")):
            for reuse in (False, True):
                common = (args.messages, args.sessions, size, reuse, args.recipients)
                direct = args.messages / source(sink_port, *common)
                proxied = args.messages / source(moxy_port, *common)
                sent += args.messages
                print(f"{size:>8} {'reuse' if reuse else 'new':>6} {direct:>13.0f}"
                      f" {proxied:>11.0f} {proxied / direct:>6.2f}")
        if redis_url:
            time.sleep(2.5)  # a flush every second ([accounting.redis] flush_interval)
            copies, size_counted = counted_copies(redis_url)
            print(f"\naccounting: {copies} of {sent} copies counted in Redis"
                  f" ({size_counted / 1e6:.1f} MB)")

        if args.workers > 1:
            return  # the memory figures below are for one process
        base = rss_kib(proc.pid)
        print(f"\nmoxy RSS after the runs: {base / 1024:.1f} MiB")
        conns = idle_connections(moxy_port, args.idle)
        time.sleep(0.5)
        with_idle = rss_kib(proc.pid)
        per = (with_idle - base) / max(args.idle, 1)
        print(f"with {args.idle} idle connections: {with_idle / 1024:.1f} MiB"
              f" ({per:.1f} KiB per connection)")
        for c in conns:
            c.close()

        before = rss_kib(proc.pid, "VmHWM")
        body = b"Subject: large\r\n\r\n" + (b"x" * 76 + b"\r\n") * (args.large // 78)
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", moxy_port) as client:
            client.sendmail("bench@client.test", ["user@bench.test"], body)
        took = time.perf_counter() - started
        after = rss_kib(proc.pid, "VmHWM")
        print(f"{len(body) / 1e6:.0f} MB message: {len(body) / took / 1e6:.0f} MB/s;"
              f" peak RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
