#!/usr/bin/env python3
"""What accounting costs in throughput: Moxys up together, loaded in turn with the order
rotating every round, so that the VM's drift falls on all of them alike.

- "none": this tree, `sinks = []` (no accounting at all);
- "this": this tree, message log + Redis counters;
- "other" (with SRC): the Moxy whose `src` directory is SRC, message log + Redis counters;
- "inline" (with --inline): this tree, message log + Redis counters in the serving process
  (`[accounting] process = false`);
- "bystander" (with --bystander): the "none" Moxy again, while a process that has nothing to
  do with mail burns CPU the way the accounting process does (a burst every 0.1 s, as much CPU
  per second as "this" one's accounting process used in the round before). It measures what
  any process that takes that much CPU costs this machine's throughput.

Per round and contender: throughput, the serving process's CPU per message and its accounting
process's (or the bystander's), settled: each burst is followed by 1.2 s in which the
accounting process writes the last events. At the end, per contender, the median of the
rounds' throughput ratios to "none" with a 95 % confidence interval for it (distribution-free:
from the ranks of the rounds' ratios, so the VM's wild rounds do not widen it more than their
count), and for each Moxy with accounting the message log's line count against what was sent
(nothing may be lost).

    .venv/bin/python benchmarks/bench_accounting_trees.py [SRC] [--bystander] [--inline]
                                                          [--mode reuse] [--pinned]
                                                          [--rounds 12]

--pinned runs each Moxy's serving process on a CPU of its own and everything else (the load
generator, the sink, Redis, the accounting processes) on the other CPUs, as bench_cost.py
does when it measures CPU: as when the load comes from the network, not from processes
sharing Moxy's CPU. Without it, everything shares every CPU, as under `make bench`.

SRC is a copy of an older `src` (e.g. from `git worktree`, with its own native build, or this
tree's compiled modules copied in when they did not change).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from bench_compare import smtp_source
from bench_cost import MODES, ROUTE, _children_runtime, _cpus, _pin, _runtime
from proxies import free_port

SETTLE = 1.2  # seconds after a burst for the accounting process to write its last events
EVERY = 0.1  # seconds between the bystander's bursts (the accounting process's pace)
# The bystander: a burst of BUSY seconds of pure computation every EVERY seconds.
_BYSTANDER = """
import sys, time
busy, every = float(sys.argv[1]), float(sys.argv[2])
while True:
    time.sleep(every)
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
"""


@contextlib.contextmanager
def bystander(busy: float) -> Iterator[int]:
    process = subprocess.Popen([sys.executable, "-c", _BYSTANDER, str(busy), str(EVERY)])
    try:
        yield process.pid
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free confidence interval for the median of `values`: between the k-th
    smallest and the k-th largest, k the largest for which a fair coin tossed len(values)
    times comes up heads fewer than k times with a probability of at most (1 - level) / 2.
    None when there are too few values for that level (fewer than 6 at 95 %)."""
    n = len(values)
    ordered = sorted(values)
    tail, below, k = (1 - level) / 2, 0.0, 0
    while k < n // 2:  # below: the chance of fewer than k+1 heads
        below += math.comb(n, k) / 2 ** n
        if below > tail:
            break
        k += 1
    return None if k == 0 else (ordered[k - 1], ordered[n - k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC", nargs="?", help="the other Moxy's src directory")
    parser.add_argument("--bystander", action="store_true",
                        help="also the Moxy without accounting beside a CPU-burning process")
    parser.add_argument("--inline", action="store_true",
                        help="also this tree with the sinks in the serving process")
    parser.add_argument("--mode", choices=sorted(MODES), default="reuse")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--pinned", action="store_true",
                        help="each Moxy's serving process on a CPU of its own, everything else "
                             "(load, sink, Redis, accounting processes) on the others, as "
                             "bench_cost.py measures CPU")
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    if args.src is not None and not (Path(args.src) / "moxy").is_dir():
        parser.error(f"no moxy package in {args.src}")
    reuse, pool = MODES[args.mode]
    to = f"u@{ROUTE}"
    counted = ["this"] if args.src is None else ["other", "this"]
    if args.inline:
        counted.append("inline")
    cpus = _cpus() if args.pinned else None
    if args.pinned and cpus is None:
        parser.error("--pinned needs two CPUs or more")
    if cpus is not None:
        os.sched_setaffinity(0, cpus[1])  # inherited by the load, the sink, Redis and Moxy
    with contextlib.ExitStack() as stack:
        sink = free_port()
        stack.enter_context(proxies.smtp_sink(sink))
        url = stack.enter_context(proxies.redis_server(
            Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        moxies, logs = {}, {}
        for name in ("none", *counted):
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            if name == "other":
                os.environ["PYTHONPATH"] = str(Path(args.src).resolve())
            try:
                moxies[name] = stack.enter_context(proxies.moxy(
                    workdir, f"{ROUTE}  127.0.0.1:{sink}\n", idle_upstreams=pool,
                    extra=proxies.accounting_toml(None if name == "none" else url,
                                                  process=name != "inline")))
            finally:
                os.environ.pop("PYTHONPATH", None)
            logs[name] = workdir / "moxy.log"
            if cpus is not None:  # its accounting process, started already, stays with the others
                _pin(moxies[name].pid, cpus[0])
        warm = min(1000, args.messages)
        for moxy in moxies.values():
            smtp_source(moxy.port, warm, 100, reuse, to)
        time.sleep(SETTLE)
        names = [*moxies, *(["bystander"] if args.bystander else [])]
        rates: dict[str, list[float]] = {name: [] for name in names}
        serving: dict[str, list[float]] = {name: [] for name in names}
        aside: dict[str, list[float]] = {name: [] for name in names}
        burn = 0.005  # seconds per bystander burst, until "this" has run a round
        for n in range(args.rounds):
            order = names[n % len(names):] + names[:n % len(names)]
            for name in order[::-1] if n % 2 else order:
                moxy = moxies["none" if name == "bystander" else name]
                with contextlib.ExitStack() as burning:
                    other = (burning.enter_context(bystander(burn)) if name == "bystander"
                             else None)
                    before, before_aside = _runtime(moxy.pid), _children_runtime(moxy.pid)
                    before_other = 0.0 if other is None else _runtime(other)
                    took = smtp_source(moxy.port, args.messages, 100, reuse, to)
                    time.sleep(SETTLE)
                    serving[name].append((_runtime(moxy.pid) - before) * 1e6 / args.messages)
                    spent = (_children_runtime(moxy.pid) - before_aside if other is None
                             else _runtime(other) - before_other)
                aside[name].append(spent * 1e6 / args.messages)
                rates[name].append(args.messages / took)
                if name == "this":  # the bystander burns at the accounting process's rate
                    burn = spent / (took + SETTLE) * EVERY
            print(f"round {n + 1:2d}: " + "  ".join(
                f"{name} {rates[name][-1]:5.0f} msg/s {serving[name][-1]:4.0f}"
                f"+{aside[name][-1]:.1f} µs" for name in names), flush=True)
        time.sleep(SETTLE)
        lines = {}
        for name in counted:
            with open(logs[name], "rb") as log:
                lines[name] = sum(1 for _ in log)
    sent = 2 * (warm + args.rounds * args.messages)  # two log lines a message
    for name in names[1:]:
        ratios = sorted(b / a for a, b in zip(rates["none"], rates[name], strict=True))
        interval = median_interval(ratios)
        within = "" if interval is None else (f", 95 % interval {100 * (interval[0] - 1):+.1f} "
                                              f"to {100 * (interval[1] - 1):+.1f} %")
        rounds = " ".join(f"{100 * (r - 1):+.0f}" for r in ratios)
        print(f"{args.mode} {name}: throughput {100 * (statistics.median(ratios) - 1):+.1f} % "
              f"against none{within} (rounds: {rounds}); "
              f"serving process {statistics.median(serving[name]):.1f} µs/msg (none "
              f"{statistics.median(serving['none']):.1f}), "
              f"{'bystander' if name == 'bystander' else 'accounting process'} "
              f"{statistics.median(aside[name]):.2f} µs/msg"
              + (f"; log lines {lines[name]} of {sent}" if name in lines else ""), flush=True)


if __name__ == "__main__":
    main()
