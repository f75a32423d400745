#!/usr/bin/env python3
"""CPU cost per proxied message of Moxy alone, in the three modes of issue 13: a new client
connection per message, the same with the upstream pool, and a client reusing its connection.

Load: Postfix's `smtp-source` (20 sessions, 100-byte messages) into Moxy, Postfix's `smtp-sink`
behind it. By default it reports the user and system CPU time of Moxy's process per message
(from /proc; noisy on a shared machine: compare runs made back to back). With `--callgrind`
Moxy runs under valgrind and the figure is user-space instructions per message, which do not
depend on the machine's load (5 sessions; slow, so use a few hundred messages).

    .venv/bin/python benchmarks/bench_cost.py [--messages 3000] [--callgrind] [--accounting]
                                              [--size 102400] [--modes new,new+pool,reuse]
                                              [--pairs 15]

`--size` sets the message size in bytes (default 100); `--modes` picks some of the three modes.

`--accounting` measures what accounting costs (issue 11: at most 5 % of throughput): per mode
it runs Moxy without any accounting (`[accounting] sinks = []`) and with the message log plus
the Redis counters of a throwaway redis-server (`sinks = ["file", "redis"]`), `--pairs N`
times each, alternating which goes first. On a machine with two CPUs or more, Moxy's serving
process (every thread) runs alone on the last CPU and the load, the sink and Redis on the
others, so that its throughput is what its own CPU allows. The sinks run in Moxy's accounting
process (`[accounting] process`, the default), which stays with the load on the other CPUs;
its CPU per message is reported beside. `--in-process` runs the sinks in the serving process
instead (`process = false`), as before that process existed. `--unpinned` pins nothing: every
process shares every CPU, as under `make bench`, so the throughput figure is the benchmark's
(on a 2-CPU machine the accounting process then takes CPU from the load generator).

A pair compares the two runs made one after the other; the median over the pairs is the figure
(a shared VM's speed drifts by more than 5 % from minute to minute, which one run each could
not tell from accounting's cost).

`--against SRC` compares this tree with another version of Moxy (its `src` directory, e.g.
a `git worktree` of an older commit, with its own native build): both run at once, pinned to
the last CPU like `--accounting`'s pair, loaded in turn `--pairs` times; the figure is the
median of the pairs' ratios of CPU time per message (from /proc/<pid>/schedstat).

`--floor` compares Moxy (default configuration) with the trio floor relay the same way
(benchmarks/floor_relay.py: a minimal correct relay on trio, with the upstream pool of the
mode): what Moxy's own work costs above what any trio relay pays on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from bench_compare import CLK_TCK, smtp_source
from proxies import free_port

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

    greeting = proxies.wait_greeting

    def slow_greeting(port: int, timeout: float = 30.0) -> None:
        greeting(port, timeout=max(timeout, 180.0))  # valgrind's start on a loaded machine

    proxies._process = wrapped  # type: ignore[assignment]
    proxies.wait_greeting = slow_greeting
    try:
        yield
    finally:
        proxies._process = original
        proxies.wait_greeting = greeting


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


@contextlib.contextmanager
def _moxy_log_on_error(workdir: Path) -> Iterator[None]:
    """A run that fails shows the end of Moxy's own log."""
    try:
        yield
    except (subprocess.CalledProcessError, SystemExit):
        log = workdir / "stderr.log"
        if log.exists():
            print("".join(log.read_text(errors="replace").splitlines(True)[-20:]),
                  file=sys.stderr)
        raise


def _cpus() -> tuple[set[int], set[int]] | None:
    """(Moxy's CPU, everyone else's) when there are two or more, else None."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[-1]}, set(cpus[:-1])) if len(cpus) >= 2 else None


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` (threads started later inherit their creator's CPU set)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task), cpus)


def measure(args: argparse.Namespace, name: str, reuse: bool, pool: int, sink_port: int,
            extra: str) -> tuple[float, float]:
    """One Moxy, warmed up, then measured: messages per second, and instructions or CPU µs
    per message (printed too)."""
    sessions = 5 if args.callgrind else 20
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runner = under_callgrind(workdir) if args.callgrind else contextlib.nullcontext()
        with runner, _moxy_log_on_error(workdir), proxies.moxy(
            workdir, f"{ROUTE}  127.0.0.1:{sink_port}\n", idle_upstreams=pool, extra=extra
        ) as moxy:
            warm = min(300, args.messages)
            smtp_source(moxy.port, warm, args.size, reuse, f"u@{ROUTE}", sessions=sessions)
            if args.callgrind:
                subprocess.run(["callgrind_control", "-z", str(moxy.pid)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                took = smtp_source(moxy.port, args.messages, args.size, reuse, f"u@{ROUTE}",
                                   sessions=sessions)
                per_message = instructions(moxy.pid, workdir) / args.messages
                print(f"{name:22s} {per_message / 1e6:6.3f} M instructions/msg "
                      f"({args.messages / took:.0f} msg/s under valgrind)", flush=True)
                return args.messages / took, per_message
            user0, sys0 = process_cpu(moxy.pid)
            took = smtp_source(moxy.port, args.messages, args.size, reuse, f"u@{ROUTE}")
            user1, sys1 = process_cpu(moxy.pid)
            per = 1e6 / args.messages
            cpu = (user1 - user0 + sys1 - sys0) * per
            print(f"{name:22s} {cpu:5.0f} µs/msg (user {(user1 - user0) * per:4.0f}, "
                  f"system {(sys1 - sys0) * per:4.0f})  {args.messages / took:5.0f} msg/s",
                  flush=True)
            return args.messages / took, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead")
    parser.add_argument("--size", type=int, default=100,
                        help="message size in bytes, smtp-source -l (default 100)")
    parser.add_argument("--accounting", action="store_true",
                        help="without any accounting vs the message log + Redis counters")
    parser.add_argument("--in-process", action="store_true",
                        help="with --accounting: the sinks in the serving process")
    parser.add_argument("--unpinned", action="store_true",
                        help="with --accounting: no CPU pinning (as under `make bench`)")
    parser.add_argument("--pairs", type=int, default=1,
                        help="with --accounting or --against: alternate this many times")
    parser.add_argument("--against", metavar="SRC",
                        help="compare with the Moxy whose src directory this is")
    parser.add_argument("--floor", action="store_true",
                        help="compare with the trio floor relay (benchmarks/floor_relay.py)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if (args.against is not None or args.floor) and (args.accounting or args.callgrind):
        parser.error("--against and --floor go with neither --accounting nor --callgrind")
    if args.against is not None and args.floor:
        parser.error("--against or --floor, not both")
    if args.against is not None and not (Path(args.against) / "moxy").is_dir():
        parser.error(f"--against: no moxy package in {args.against}")
    sink_port = free_port()
    pin = (args.accounting or args.against or args.floor) and not (args.callgrind or
                                                                     args.unpinned)
    cpus = _cpus() if pin else None
    if cpus is not None:
        os.sched_setaffinity(0, cpus[1])  # inherited by the load, the sink and Redis
    with contextlib.ExitStack() as stack:
        stack.enter_context(proxies.smtp_sink(sink_port))
        if args.against is not None:
            this = str(Path(__file__).resolve().parent.parent / "src")
            for name in modes:
                interleaved(args, name, sink_port, {"other": "", "this": ""}, cpus,
                            {"other": str(Path(args.against).resolve()), "this": this})
            return
        if args.floor:
            for name in modes:
                interleaved(args, name, sink_port, {"floor": "", "moxy": ""}, cpus,
                            floor=True)
            return
        if not args.accounting:
            for name in modes:
                reuse, pool = MODES[name]
                measure(args, name, reuse, pool, sink_port, "")
            return
        cache = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        url = stack.enter_context(proxies.redis_server(cache))
        # Under callgrind Moxy runs 50-100 times slower: the Redis flush every 30 s instead of
        # every second, and the hand-over to the sinks every 15 s instead of every half second
        # (so, as at full speed, per 512 events), spread a flush and a batch over about as many
        # messages as at full speed. Per-second costs would otherwise weigh 50-100 times more.
        scale = 30.0 if args.callgrind else 1.0
        configs = {"without": proxies.accounting_toml(None),
                   "file+redis": proxies.accounting_toml(url, scale, 0.5 * scale,
                                                         process=not args.in_process)}
        if not args.callgrind:
            for name in modes:
                interleaved(args, name, sink_port, configs, cpus)
            return
        summary = []
        for name in modes:
            reuse, pool = MODES[name]
            got = [measure(args, f"{name} {config}", reuse, pool, sink_port, extra)[1]
                   for config, extra in configs.items()]
            summary.append(f"{name:9s} without {got[0] / 1e6:8.3f}  file+redis {got[1] / 1e6:8.3f}"
                           f"  cost {100 * (got[1] / got[0] - 1):+5.1f} %")
        print("accounting's cost (M instructions/msg; without = sinks [], file+redis = the "
              "message log and the Redis counters):")
        print("\n".join(summary))


def _runtime(pid: int) -> float:
    """CPU seconds of every thread of `pid` so far, to the nanosecond (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def _children_runtime(pid: int) -> float:
    """CPU seconds of `pid`'s child processes (its accounting process), as `_runtime`. By
    their parent in /proc/*/stat: a child started from one of its threads is not in the main
    thread's `children`."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                total += _runtime(int(entry))
    return total


def interleaved(args: argparse.Namespace, name: str, sink_port: int, configs: dict[str, str],
                cpus: tuple[set[int], set[int]] | None,
                sources: dict[str, str] | None = None, floor: bool = False) -> None:
    """Both Moxys up at once, loaded in turn: `--pairs` bursts of `--messages` each, the order
    alternating, so that the machine's drift falls on both alike. A pair's two bursts are
    seconds apart; the median of the pairs' ratios is the figure. `sources`: per config, the
    `src` directory its Moxy runs from (PYTHONPATH), for `--against`. `floor`: the first
    config is the trio floor relay instead of a Moxy (`--floor`)."""
    reuse, pool = MODES[name]
    with contextlib.ExitStack() as stack:
        moxies: dict[str, proxies.Proxy] = {}
        for config, extra in configs.items():
            if floor and not moxies:
                moxies[config] = stack.enter_context(proxies.floor(sink_port, pool))
                continue
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            stack.enter_context(_moxy_log_on_error(workdir))
            source = (sources or {}).get(config)
            with _pythonpath(source):
                moxies[config] = stack.enter_context(proxies.moxy(
                    workdir, f"{ROUTE}  127.0.0.1:{sink_port}\n", idle_upstreams=pool,
                    extra=extra))
        for moxy in moxies.values():
            smtp_source(moxy.port, min(1000, args.messages), args.size, reuse, f"u@{ROUTE}")
        time.sleep(1.2)  # every sink thread has started (first batch, first Redis flush)
        if cpus is not None:
            for moxy in moxies.values():
                _pin(moxy.pid, cpus[0])
        rates: dict[str, list[float]] = {config: [] for config in configs}
        costs: dict[str, list[float]] = {config: [] for config in configs}
        aside: dict[str, list[float]] = {config: [] for config in configs}  # child processes
        for pair in range(args.pairs):
            order = list(moxies) if pair % 2 == 0 else list(moxies)[::-1]
            for config in order:
                moxy = moxies[config]
                before, before_aside = _runtime(moxy.pid), _children_runtime(moxy.pid)
                took = smtp_source(moxy.port, args.messages, args.size, reuse, f"u@{ROUTE}")
                # The accounting process writes a burst's events within about a second.
                time.sleep(1.2 if sources is None else 0)
                costs[config].append((_runtime(moxy.pid) - before) * 1e6 / args.messages)
                aside[config].append(
                    (_children_runtime(moxy.pid) - before_aside) * 1e6 / args.messages)
                rates[config].append(args.messages / took)
            print(f"{name} pair {pair + 1:2d}: " + "  ".join(
                f"{config} {costs[config][-1]:4.0f} µs/msg {rates[config][-1]:5.0f} msg/s"
                + (f" (+{aside[config][-1]:.0f} µs/msg aside)" if aside[config][-1] else "")
                for config in configs), flush=True)
    without, with_ = configs
    cost = sorted(b / a for a, b in zip(costs[without], costs[with_], strict=True))
    rate = sorted(b / a for a, b in zip(rates[without], rates[with_], strict=True))
    what = (f"this tree against {sources[without]}:" if sources
            else "Moxy against the trio floor relay:" if floor
            else "accounting (file+redis against sinks []) costs")
    print(f"{name}: {what} {100 * (_median(cost) - 1):+.1f} % CPU per message and "
          f"{100 * (_median(rate) - 1):+.1f} % throughput (medians of {args.pairs} pairs of "
          f"{args.messages} messages; CPU per message "
          f"{_median(sorted(costs[without])):.0f} / {_median(sorted(costs[with_])):.0f} µs"
          + (f"; Moxy on CPU {min(cpus[0])}" if cpus else "") + ")", flush=True)
    print(f"{name}: pairs' cost ratios: " + " ".join(f"{100 * (r - 1):+.0f}" for r in cost),
          flush=True)
    for config in configs:
        if any(aside[config]):
            print(f"{name}: {config}: its accounting process, on the other CPUs, "
                  f"{_median(sorted(aside[config])):.0f} µs per message (median)", flush=True)


@contextlib.contextmanager
def _pythonpath(source: str | None) -> Iterator[None]:
    """Moxy processes started inside run from `source` (a `src` directory) when given."""
    if source is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = source
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _median(values: list[float]) -> float:
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


if __name__ == "__main__":
    main()
