#!/usr/bin/env python3
"""The accounting process's CPU per message, fed frames directly: no SMTP, no load generator.

It starts `python -m moxy.accounting.host` (the process Moxy's serving process starts for its
sinks, docs/accounting.md) on a configuration of its own, with the message log in a temporary
directory and the Redis counters in a throwaway redis-server, and writes into its pipe what a
serving process would: one LEG_AND_MESSAGE entry per message (one sender, one recipient, one
destination, as `smtp-source` sends them; a new session and message id each), 128 entries a
write, at `--rate` messages a second for `--seconds`. It reports that process's CPU (user +
system, from /proc, including the second after the last write in which it writes what came
last) per second and per message, and per thread (the event loop; the message log's writer,
which Linux names "python"; trio's worker thread for Redis).

    .venv/bin/python benchmarks/bench_accounting_process.py [--rate 3000] [--seconds 10]
                                                             [--sinks file,redis] [--runs 2]

The CPU per message falls as the rate rises: about half of it, at a few thousand messages a
second, is a floor per second (its wake-ups and the Redis flush), not per message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies

sys.path.insert(0, str(proxies.ROOT / "src"))
from moxy.accounting import pipe
from moxy.accounting.events import LEG_AND_MESSAGE
from moxy.config import load_config

CLK_TCK = os.sysconf("SC_CLK_TCK")
PER_WRITE = 128  # entries per write, as the serving process sends a frame's worth


def entry(n: int, now: float) -> tuple[object, ...]:
    """What a session emits for a message of one leg that carried every recipient."""
    return (
        LEG_AND_MESSAGE, f"S{n:08x}", f"S{n:08x}.1", "192.0.2.7", "client.example",
        "sender@client.example", ("user@bench.test",), "127.0.0.1:2525", "127.0.0.1:2525",
        100, 250, "250 2.0.0 Ok: queued as 4F2A", "end-of-data", 0.0012, "node1", "", "",
        now, 100, 250, "250 2.0.0 Ok: queued as 4F2A", "",
    )


def cpu_ticks(pid: int) -> dict[str, int]:
    """User + system clock ticks of each thread of `pid`, by thread id and name."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except FileNotFoundError:
            continue
        name = "event loop" if int(task) == pid else stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{task} {name}"] = int(fields[11]) + int(fields[12])
    return out


def one_run(workdir: Path, redis_url: str | None, sinks: list[str], rate: int,
            seconds: float) -> None:
    tables = ""
    if "redis" in sinks:
        tables = f'[accounting.redis]\nurl = "{redis_url}"\n'
    (workdir / "routes").write_text("bench.test  127.0.0.1:2525\n")
    (workdir / "moxy.toml").write_text(
        '[server]\nlisten = ["127.0.0.1:2999"]\n[routes]\nfile = "routes"\n'
        f'[log]\nfile = "{workdir}/moxy.log"\nlevel = "warning"\n'
        f"[accounting]\nsinks = {sinks!r}\n".replace("'", '"') + tables
    )
    config = load_config(workdir / "moxy.toml")
    env = {**os.environ, "PYTHONPATH": str(proxies.ROOT / "src")}
    host = subprocess.Popen([sys.executable, "-m", "moxy.accounting.host"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
    assert host.stdin is not None
    try:
        pipe.widen(host.stdin.fileno())
        host.stdin.write(pipe.frame(pipe.CONFIG, pickle.dumps(config)))
        host.stdin.flush()
        time.sleep(1.0)  # its imports and sinks
        before = cpu_ticks(host.pid)
        start, sent = time.monotonic(), 0
        while time.monotonic() - start < seconds:
            now = time.time()
            host.stdin.write(pipe.events_frames([entry(sent + k, now) for k in range(PER_WRITE)]))
            host.stdin.flush()
            sent += PER_WRITE
            pause = start + sent / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        took = time.monotonic() - start
        time.sleep(1.2)  # the last events written, the last flush made
        after = cpu_ticks(host.pid)
    finally:
        host.stdin.close()
        host.wait(timeout=30)
    ticks = {name: after[name] - before.get(name, 0) for name in after}
    total = sum(ticks.values()) / CLK_TCK
    print(f"{','.join(sinks):12s} {sent / took:7.0f} msgs/s: {total * 1000 / took:5.1f} ms of CPU "
          f"a second, {total * 1e6 / sent:5.2f} µs a message  (threads: "
          + ", ".join(f"{name.split(' ', 1)[1]} {t * 1000 / CLK_TCK:.0f} ms"
                      for name, t in sorted(ticks.items()) if t)
          + ")", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=3000, help="messages a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sinks", default="file,redis", help="comma-separated: file, redis")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    sinks = args.sinks.split(",")
    if not set(sinks) <= {"file", "redis"} or args.rate < 1 or args.seconds <= 0:
        parser.error("--sinks takes file and redis; --rate and --seconds must be positive")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        url = stack.enter_context(proxies.redis_server(workdir)) if "redis" in sinks else None
        for run in range(args.runs):
            rundir = workdir / f"run{run}"
            rundir.mkdir()
            one_run(rundir, url, sinks, args.rate, args.seconds)


if __name__ == "__main__":
    main()
