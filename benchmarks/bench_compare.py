#!/usr/bin/env python3
"""`make bench`: Moxy beside direct delivery, nginx's mail proxy and Haraka, in one run.

Load: Postfix's `smtp-source` (20 sessions); destination: Postfix's `smtp-sink`. For every
proxy, message size and connection mode (a new client connection per message, or one reused
per session) it reports messages per second and the proxy's CPU time per message (user+system
of its whole process tree, from /proc), with ratios to nginx beside; then Moxy's fan-out cases
(one route with two destinations; one message to ten domains sharing one destination), the
latency each proxy adds per message at 20 sessions (p50/p99), and the RCPT time against a
destination that leaves Nagle on. The table, with the machine and versions, replaces the
"make bench" section of docs/benchmarks.md (`--no-docs` leaves it alone).

    .venv/bin/python benchmarks/bench_compare.py [--messages 3000] [--sizes 100,10240,102400]

Everything binds 127.0.0.1 on free ports, every loop is bounded, and every process started is
stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from bench_clients import DOMAINS, SENDER, latency, nagle_rcpt_ms, ten_domains
from proxies import Proxy, free_port, need

DOCS = proxies.ROOT / "docs" / "benchmarks.md"
START, END = "<!-- make bench: start -->", "<!-- make bench: end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- measuring ------------------------------------------------------------------------------


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) of `root` and every process below it."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        times[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        todo += [child for child, parent in parents.items() if parent == pid]
    return total


@attrs.frozen
class Cell:
    rate: float  # messages per second
    cpu_us: float | None  # proxy CPU per message, µs


def smtp_source(port: int, messages: int, size: int, reuse: bool, to: str,
                sessions: int = 20) -> float:
    args = [need("smtp-source", "postfix"), "-m", str(messages), "-s", str(sessions),
            "-l", str(size), "-f", SENDER, "-t", to]
    if reuse:
        args.append("-d")
    started = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def settled_tree_cpu(root: int, quiet: float = 0.005, longest: float = 3.0) -> float:
    """`tree_cpu` once the tree has finished the work the load left it: Moxy's accounting
    process writes the last events up to a second after the load ends, and that CPU is part of
    the messages' cost. Read until two readings 0.3 s apart differ by less than `quiet` CPU
    seconds (at most `longest` seconds)."""
    last = tree_cpu(root)
    deadline = time.monotonic() + longest
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = tree_cpu(root)
        if now - last < quiet:
            return now
        last = now
    return last


def measure(proxy: Proxy | None, port: int, messages: int, send: Callable[[int], float]) -> Cell:
    before = settled_tree_cpu(proxy.pid) if proxy else 0.0
    took = send(port)
    cpu = (settled_tree_cpu(proxy.pid) - before) / messages * 1e6 if proxy else None
    return Cell(messages / took, cpu)


# --- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(root: Path, name: str) -> Iterator[Path]:
    path = root / name
    path.mkdir()
    os.chmod(path, 0o755)  # nginx's workers run as nobody
    yield path


def fmt_rate(cell: Cell | None) -> str:
    return "–" if cell is None else f"{cell.rate:,.0f}"


def fmt_cpu(cell: Cell | None, reference: Cell | None, floor: Cell | None = None) -> str:
    """CPU per message, × nginx's (`reference`) and, for Moxy, × the trio floor's (`floor`)."""
    if cell is None or cell.cpu_us is None:
        return "–"
    ratios = [f"×{cell.cpu_us / ref.cpu_us:.2f}{what}" for ref, what in
              ((reference, ""), (floor, " floor")) if ref is not None and ref.cpu_us]
    return f"{cell.cpu_us:,.0f} µs" + (f" ({'; '.join(ratios)})" if ratios else "")


def floor_of(name: str) -> str | None:
    """The trio floor row a Moxy row is compared with: the same upstream pool, or none."""
    if not name.startswith("moxy"):
        return None
    return "trio floor no pool" if name.endswith("no pool") else "trio floor"


def fmt_body(cell: Cell | None, size: int) -> str:
    """Message octets carried per second of the proxy's CPU (issue 13's figure for bodies)."""
    if cell is None or not cell.cpu_us or size < 1024:
        return "–"
    return f"{size / cell.cpu_us:,.1f}"  # octets per µs = MB per second


def size_name(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size // 1024} KB"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    debian = Path("/etc/debian_version").read_text().strip() \
        if Path("/etc/debian_version").exists() else "?"
    import trio

    return (f"{os.cpu_count()} × {cpu}; Linux {platform.release()}, Debian {debian}; "
            f"Python {platform.python_version()}, trio {trio.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=3000, help="messages per cell")
    ap.add_argument("--sizes", default="100,10240,102400", help="message sizes in bytes")
    ap.add_argument("--probes", type=int, default=300, help="messages in the latency probe")
    ap.add_argument("--no-haraka", action="store_true", help="leave Haraka out")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = os.cpu_count() or 1
    haraka_missing = "left out (--no-haraka)" if args.no_haraka else proxies.haraka_available()

    rows: dict[str, dict[tuple[int, bool], Cell]] = {}
    fanout: dict[str, dict[str, Cell]] = {}
    lat: dict[str, tuple[float, float]] = {}
    total_cells = (8 if haraka_missing is None else 7) * len(sizes) * 2
    done = 0

    def run_cells(name: str, proxy: Proxy | None, port: int) -> None:
        nonlocal done
        rows[name] = {}
        for size in sizes:
            for reuse in (False, True):
                send = functools.partial(smtp_source, messages=args.messages, size=size,
                                         reuse=reuse, to="user@bench.test")
                cell = measure(proxy, port, args.messages, send)
                rows[name][size, reuse] = cell
                done += 1
                print(f"[{done:>2}/{total_cells}] {name:<18} {size_name(size):>6} "
                      f"{'reuse' if reuse else 'new':<5} {cell.rate:>8,.0f} msg/s"
                      + (f" {cell.cpu_us:>7,.0f} µs/msg" if cell.cpu_us else ""), flush=True)

    routes = "".join(f"{d}  127.0.0.1:{{sink}}\n" for d in ["bench.test", *DOMAINS])
    with tempfile.TemporaryDirectory(prefix="moxy-bench-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o755)
        sink_port, mirror_port = free_port(), free_port()
        with proxies.smtp_sink(sink_port), proxies.smtp_sink(mirror_port):
            run_cells("direct", None, sink_port)
            lat["direct"] = latency(sink_port, args.probes)
            the_routes = routes.format(sink=sink_port) + \
                f"mirror.test  127.0.0.1:{sink_port}  127.0.0.1:{mirror_port}\n"
            moxies: list[tuple[str, int, int | None]] = [  # name, workers, idle_upstreams
                ("moxy no pool", 1, 0),
                ("moxy", 1, None),  # defaults: upstream pool of 20 per destination
                (f"moxy {workers}w", workers, None),
            ]
            for name, processes, idle in moxies:
                with workdir(root, name.replace(" ", "-").replace("+", "-")) as wd, \
                        proxies.moxy(wd, the_routes, name=name, workers=processes,
                                     idle_upstreams=idle) as moxy:
                    run_cells(name, moxy, moxy.port)
                    n = args.messages
                    mirror = functools.partial(smtp_source, messages=n, size=sizes[0],
                                               reuse=True, to="user@mirror.test")
                    ten = functools.partial(ten_domains, messages=n, size=sizes[0])
                    fanout[name] = {"mirror": measure(moxy, moxy.port, n, mirror),
                                    "ten": measure(moxy, moxy.port, n, ten)}
                    print(f"      {name}: fan-out done", flush=True)
                    lat[name] = latency(moxy.port, args.probes)
            for name, idle in (("trio floor no pool", 0), ("trio floor", 20)):
                with proxies.floor(sink_port, idle) as floor:
                    run_cells(name, floor, floor.port)
            with workdir(root, "nginx") as wd, proxies.nginx(wd, sink_port) as ngx:
                run_cells("nginx", ngx, ngx.port)
                lat["nginx"] = latency(ngx.port, args.probes)
            if haraka_missing is None:
                with workdir(root, "haraka") as wd, \
                        proxies.haraka(wd, sink_port, ["bench.test", *DOMAINS]) as har:
                    run_cells("haraka", har, har.port)
                    lat["haraka"] = latency(har.port, args.probes)
        with workdir(root, "nagle") as wd:
            nagle = nagle_rcpt_ms(wd, 200)

    versions = [f"nginx {proxies.nginx_version()} (mail module, 1 worker, auth_http answered "
                "by nginx itself)"]
    if haraka_missing is None:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
        versions.append(f"Haraka {proxies.haraka_version()} on Node.js {node.strip()} "
                        "(smtp_forward, 1 process)")
    else:
        versions.append(f"Haraka: not measured ({haraka_missing})")
    report = render(rows, fanout, lat, nagle, sizes, args, versions)
    print("\n" + report)
    if not args.no_docs:
        text = DOCS.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            text = head + START + "\n" + report + "\n" + END + rest.split(END, 1)[1]
        else:
            text += f"\n{START}\n{report}\n{END}\n"
        DOCS.write_text(text)
        print(f"bench: wrote the table into {DOCS.relative_to(proxies.ROOT)}")


def render(rows: dict[str, dict[tuple[int, bool], Cell]], fanout: dict[str, dict[str, Cell]],
           lat: dict[str, tuple[float, float]], nagle: float, sizes: list[int],
           args: argparse.Namespace, versions: list[str]) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"Run {when} on {machine()}.",
        "; ".join(versions) + ".",
        f"{args.messages} messages per cell from `smtp-source -s 20` to `smtp-sink`; CPU is "
        "the proxy's whole process tree (user + system) per message; × is the ratio to nginx, "
        "× floor Moxy's to the trio floor relay with the same upstream pool (its pool 20 or "
        "none; benchmarks/floor_relay.py); "
        "body MB per CPU second is the message size over that CPU time (10 KB and up).",
        "",
        "| path | size | conn | msgs/s | CPU per message | body MB per CPU second |",
        "|---|---|---|---|---|---|",
    ]
    for name, cells in rows.items():
        for size in sizes:
            for reuse in (False, True):
                cell = cells.get((size, reuse))
                ref = None if name == "nginx" else rows.get("nginx", {}).get((size, reuse))
                base = rows.get(floor_of(name) or "", {}).get((size, reuse))
                out.append(f"| {name} | {size_name(size)} | {'reuse' if reuse else 'new'} | "
                           f"{fmt_rate(cell)} | {fmt_cpu(cell, ref, base)} | "
                           f"{fmt_body(cell, size)} |")
    out += ["", f"Fan-out ({size_name(sizes[0])}, connections reused):", "",
            "| path | one route, two destinations (2 copies) | ten domains → one destination |",
            "|---|---|---|"]
    for name, pair in fanout.items():
        mirror, ten = pair["mirror"], pair["ten"]
        out.append(f"| {name} | {fmt_rate(mirror)} msgs/s, {fmt_cpu(mirror, None)}"
                   f" | {fmt_rate(ten)} msgs/s, {fmt_cpu(ten, None)} |")
    direct = lat.get("direct", (0.0, 0.0))
    out += ["", f"Latency of one message (MAIL to final 250) beside 19 loading sessions, "
            f"{args.probes} probes; added = minus direct:", "",
            "| path | p50 | p99 | added p50 | added p99 |", "|---|---|---|---|---|"]
    for name, (p50, p99) in lat.items():
        added = "–" if name == "direct" else f"{p50 - direct[0]:.2f} ms"
        added99 = "–" if name == "direct" else f"{p99 - direct[1]:.2f} ms"
        out.append(f"| {name} | {p50:.2f} ms | {p99:.2f} ms | {added} | {added99} |")
    out += ["", f"RCPT over a cached route to a destination that leaves Nagle on and writes each "
            f"reply separately (tests/peers/nagle_mta.py), Moxy defaults: median "
            f"**{nagle:.2f} ms** over 200 RCPTs."]
    return "\n".join(out)


if __name__ == "__main__":
    main()
