#!/usr/bin/env python3
"""What accounting costs, for two versions of Moxy at once: three Moxys up together, loaded in
turn with the order rotating every round, so that the VM's drift falls on all three alike.

- "none": this tree, `sinks = []` (no accounting at all);
- "other": the Moxy whose `src` directory is SRC, message log + Redis counters;
- "this": this tree, message log + Redis counters.

Per round and Moxy: throughput, the serving process's CPU per message and its accounting
process's (settled: each burst is followed by 1.2 s in which that process writes the last
events). At the end, per version, the median of the rounds' throughput ratios to "none", and
the message log's line count against what was sent (nothing may be lost).

    .venv/bin/python benchmarks/bench_accounting_trees.py SRC [--mode reuse] [--rounds 12]

SRC is a copy of an older `src` (e.g. from `git worktree`, with its own native build, or this
tree's compiled modules copied in when they did not change).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from bench_compare import smtp_source
from bench_cost import MODES, ROUTE, _children_runtime, _runtime
from proxies import free_port

SETTLE = 1.2  # seconds after a burst for the accounting process to write its last events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", metavar="SRC", help="the other Moxy's src directory")
    parser.add_argument("--mode", choices=sorted(MODES), default="reuse")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    if not (Path(args.src) / "moxy").is_dir():
        parser.error(f"no moxy package in {args.src}")
    reuse, pool = MODES[args.mode]
    to = f"u@{ROUTE}"
    with contextlib.ExitStack() as stack:
        sink = free_port()
        stack.enter_context(proxies.smtp_sink(sink))
        url = stack.enter_context(proxies.redis_server(
            Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        moxies, logs = {}, {}
        for name in ("none", "other", "this"):
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            if name == "other":
                os.environ["PYTHONPATH"] = str(Path(args.src).resolve())
            try:
                moxies[name] = stack.enter_context(proxies.moxy(
                    workdir, f"{ROUTE}  127.0.0.1:{sink}\n", idle_upstreams=pool,
                    extra=proxies.accounting_toml(None if name == "none" else url)))
            finally:
                os.environ.pop("PYTHONPATH", None)
            logs[name] = workdir / "moxy.log"
        warm = min(1000, args.messages)
        for moxy in moxies.values():
            smtp_source(moxy.port, warm, 100, reuse, to)
        time.sleep(SETTLE)
        rates: dict[str, list[float]] = {name: [] for name in moxies}
        serving: dict[str, list[float]] = {name: [] for name in moxies}
        aside: dict[str, list[float]] = {name: [] for name in moxies}
        names = list(moxies)
        for n in range(args.rounds):
            order = names[n % 3:] + names[:n % 3]
            for name in order[::-1] if n % 2 else order:
                moxy = moxies[name]
                before, before_aside = _runtime(moxy.pid), _children_runtime(moxy.pid)
                took = smtp_source(moxy.port, args.messages, 100, reuse, to)
                time.sleep(SETTLE)
                serving[name].append((_runtime(moxy.pid) - before) * 1e6 / args.messages)
                aside[name].append(
                    (_children_runtime(moxy.pid) - before_aside) * 1e6 / args.messages)
                rates[name].append(args.messages / took)
            print(f"round {n + 1:2d}: " + "  ".join(
                f"{name} {rates[name][-1]:5.0f} msg/s {serving[name][-1]:4.0f}"
                f"+{aside[name][-1]:.1f} µs" for name in names), flush=True)
        time.sleep(SETTLE)
        lines = {}
        for name in ("other", "this"):
            with open(logs[name], "rb") as log:
                lines[name] = sum(1 for _ in log)
    sent = 2 * (warm + args.rounds * args.messages)  # two log lines a message
    for name in ("other", "this"):
        ratios = sorted(b / a for a, b in zip(rates["none"], rates[name], strict=True))
        print(f"{args.mode} {name}: throughput {100 * (statistics.median(ratios) - 1):+.1f} % "
              f"against none (rounds: {' '.join(f'{100 * (r - 1):+.0f}' for r in ratios)}); "
              f"serving process {statistics.median(serving[name]):.1f} µs/msg (none "
              f"{statistics.median(serving['none']):.1f}), accounting process "
              f"{statistics.median(aside[name]):.2f} µs/msg; log lines {lines[name]} of {sent}",
              flush=True)


if __name__ == "__main__":
    main()
