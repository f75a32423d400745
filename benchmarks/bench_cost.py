#!/usr/bin/env python3
"""CPU cost per proxied message of Moxy alone, in the three modes of issue 13: a new client
connection per message, the same with the upstream pool, and a client reusing its connection.

Load: Postfix's `smtp-source` (20 sessions, 100-byte messages) into Moxy, Postfix's `smtp-sink`
behind it. By default it reports the user and system CPU time of Moxy's process per message
(from /proc; noisy on a shared machine: compare runs made back to back). With `--callgrind`
Moxy runs under valgrind and the figure is user-space instructions per message, which do not
depend on the machine's load (5 sessions; slow, so use a few hundred messages).

    .venv/bin/python benchmarks/bench_cost.py [--messages 3000] [--callgrind] [--size 102400]

`--size` sets the message size in bytes (default 100); `--modes` picks some of the three modes.

To compare two versions, run it with PYTHONPATH pointing at the other version's `src`.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from bench_compare import CLK_TCK, free_port, smtp_source

MODES = {"new": (False, 0), "new+pool": (False, 64), "reuse": (True, 0)}
ROUTE = "bench.test"


def process_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


@contextlib.contextmanager
def under_callgrind(workdir: Path) -> Iterator[None]:
    """Start Moxy under callgrind (only Moxy: the sink and the load run natively)."""
    original = proxies._process

    def wrapped(args: list[str], cwd: Path | None = None, **env: str) -> object:
        if args[1:3] == ["-m", "moxy"]:
            args = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.%p",
                    *args]
        return original(args, cwd, **env)

    proxies._process = wrapped  # type: ignore[assignment]
    try:
        yield
    finally:
        proxies._process = original


def instructions(pid: int, workdir: Path) -> int:
    """Instructions counted since the last zeroing, dumped now."""
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
    time.sleep(1)
    newest = max(workdir.glob("cg.*"), key=lambda p: p.stat().st_mtime)
    out = subprocess.run(["callgrind_annotate", str(newest)], check=True, capture_output=True,
                         text=True).stdout
    line = next(line for line in out.splitlines() if "PROGRAM TOTALS" in line)
    return int(line.split()[0].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--size", type=int, default=100,
                        help="message size in bytes, smtp-source -l (default 100)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes to run (default: all three)")
    parser.add_argument("--accounting", action="store_true",
                        help="with the Redis counters (a throwaway redis-server) and the log")
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    sessions = 5 if args.callgrind else 20
    sink_port = free_port()
    with contextlib.ExitStack() as stack:
        stack.enter_context(proxies.smtp_sink(sink_port))
        extra = ""
        if args.accounting:
            cache = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            # Under callgrind Moxy runs ~50 times slower: flushing every 30 s instead of every
            # second spreads a flush over about as many messages as at full speed.
            url = stack.enter_context(proxies.redis_server(cache))
            extra = proxies.accounting_toml(url, 30.0 if args.callgrind else 1.0)
        for name in args.modes.split(","):
            reuse, pool = MODES[name]
            with tempfile.TemporaryDirectory() as tmp:
                workdir = Path(tmp)
                runner = under_callgrind(workdir) if args.callgrind else contextlib.nullcontext()
                with runner, proxies.moxy(workdir, f"{ROUTE}  127.0.0.1:{sink_port}\n",
                                          idle_upstreams=pool, extra=extra) as moxy:
                    warm = min(300, args.messages)
                    smtp_source(moxy.port, warm, args.size, reuse, f"u@{ROUTE}", sessions=sessions)
                    if args.callgrind:
                        subprocess.run(["callgrind_control", "-z", str(moxy.pid)], check=True,
                                       stdout=subprocess.DEVNULL)
                        smtp_source(moxy.port, args.messages, args.size, reuse,
                                    f"u@{ROUTE}", sessions=sessions)
                        count = instructions(moxy.pid, workdir)
                        print(f"{name:9s} {count / args.messages / 1e6:6.2f} M instructions/msg")
                        continue
                    user0, sys0 = process_cpu(moxy.pid)
                    took = smtp_source(moxy.port, args.messages, args.size, reuse, f"u@{ROUTE}")
                    user1, sys1 = process_cpu(moxy.pid)
                    per = 1e6 / args.messages
                    print(f"{name:9s} {(user1 - user0 + sys1 - sys0) * per:5.0f} µs/msg "
                          f"(user {(user1 - user0) * per:4.0f}, system {(sys1 - sys0) * per:4.0f})"
                          f"  {args.messages / took:5.0f} msg/s", flush=True)


if __name__ == "__main__":
    main()
