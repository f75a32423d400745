#!/usr/bin/env python3
"""Threads beside a busy event loop: what the message log's writer thread costs in the
serving process, per GIL switch interval (`[server] gil_switch_interval`).

Moxy runs with its message log in the serving process (`[accounting] sinks = ["file"]`,
`process = false`), loaded by Postfix's `smtp-source` over reused connections (20 sessions,
100-byte messages) into `smtp-sink`, once per interval given, one after the other, `--runs`
times. For each run it prints the throughput and, per thread of the serving process
(/proc/PID/task), its voluntary and involuntary context switches and its CPU per message. A
thread that waits for the GIL while the event loop is busy is woken at each of the loop's
system calls: its voluntary switches show it (docs/accounting.md, "Threads beside a busy
event loop").

    .venv/bin/python benchmarks/bench_threads.py [--intervals 0.005,0.0001] [--messages 30000]
                                                 [--runs 2]

CPU is counted in clock ticks (10 ms): over 30,000 messages a third of a µs a message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from bench_compare import smtp_source
from bench_cost import ROUTE

SETTLE = 1.2  # seconds after a burst: the writer writes the last lines
CLK_TCK = os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> dict[str, tuple[str, int, int, int]]:
    """Per thread id: name, voluntary and involuntary switches, CPU clock ticks."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            base = f"/proc/{pid}/task/{task}"
            name = Path(f"{base}/comm").read_text().strip()
            status = dict(line.split(":", 1) for line in Path(f"{base}/status").read_text()
                          .splitlines() if ":" in line)
            stat = Path(f"{base}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            out[task] = (name, int(status["voluntary_ctxt_switches"]),
                         int(status["nonvoluntary_ctxt_switches"]),
                         int(fields[11]) + int(fields[12]))
    return out


def one_run(interval: float, messages: int, sink: int) -> None:
    with tempfile.TemporaryDirectory() as workdir, proxies.moxy(
        Path(workdir), f"{ROUTE}  127.0.0.1:{sink}\n", server=f"gil_switch_interval = {interval}\n",
        extra='[accounting]\nsinks = ["file"]\nprocess = false\n',
    ) as moxy:
        to = f"u@{ROUTE}"
        smtp_source(moxy.port, 3000, 100, True, to)
        time.sleep(SETTLE)
        before = threads(moxy.pid)
        took = smtp_source(moxy.port, messages, 100, True, to)
        time.sleep(SETTLE)
        after = threads(moxy.pid)
    print(f"gil_switch_interval {interval:g} s: {messages / took:,.0f} msg/s", flush=True)
    for task, (name, voluntary, involuntary, ticks) in sorted(after.items()):
        _, v0, i0, t0 = before.get(task, (name, 0, 0, 0))
        cpu = (ticks - t0) / CLK_TCK * 1e6 / messages
        label = "event loop" if int(task) == moxy.pid else name
        print(f"  {label:<16} voluntary {voluntary - v0:6d}  involuntary {involuntary - i0:6d}"
              f"  CPU {cpu:6.1f} µs/msg", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="0.005,0.0001",
                        help="comma-separated gil_switch_interval values (seconds)")
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    intervals = [float(value) for value in args.intervals.split(",")]
    sink = proxies.free_port()
    with proxies.smtp_sink(sink):
        for _ in range(args.runs):
            for interval in intervals:
                one_run(interval, args.messages, sink)


if __name__ == "__main__":
    main()
