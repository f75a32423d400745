"""`make cluster` (scripts/cluster.py): the printed walk-through works as printed, and Ctrl-C
leaves nothing behind.

The script runs as the user runs it, in a process group of its own like a terminal's foreground
job; the test pastes each printed command into a shell, checks where each message lands from
the lines the recording servers print, then sends SIGINT to the group as Ctrl-C does.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.py"
ARRIVAL = re.compile(
    r"^(old|new) server 127\.0\.0\.1:\d+ <- (node-[ab])\.cluster\.test: "
    r"from <sender@elsewhere\.test> to <([^>]+)>, Subject: (.*)$"
)


class Output:
    """The script's output lines, read by a thread so that the test never blocks on the pipe."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        stream = process.stdout
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> str:
        """The first line from now on that matches; earlier lines stay in `lines`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line matching {pattern!r} within {timeout}s; output so far:\n"
                    + "\n".join(self.lines)
                ) from None
            if line is None:
                raise AssertionError(
                    f"the script ended before printing {pattern!r}:\n" + "\n".join(self.lines)
                )
            self.lines.append(line)
            if re.search(pattern, line):
                return line


def _descendants(pid: int) -> dict[int, tuple[str, str]]:
    """Every process below `pid`: pid -> (start time, command), read from /proc."""
    parents: dict[int, int] = {}
    info: dict[int, tuple[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
        info[int(entry.name)] = (fields[19], command)
    found: dict[int, tuple[str, str]] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = info[child]
                frontier.append(child)
    return found


def _alive(pid: int, start_time: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[19] == start_time and fields[0] != "Z"


def _kind(process: tuple[str, str]) -> str:
    command = process[1]
    for kind, pattern in [
        ("moxy", r"/moxy serve "),
        ("accounting", r" -m moxy\.accounting\.host$"),  # each node's sinks (accounting/remote.py)
        ("redis", r"redis-server"),
        ("slapd", r"slapd"),
    ]:
        if re.search(pattern, command):
            return kind
    return command


def _tree_files() -> set[str]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
    files = set()
    for directory, subdirectories, names in os.walk(ROOT):
        subdirectories[:] = [d for d in subdirectories if d not in skip]
        files.update(os.path.join(directory, name) for name in names)
    return files


@pytest.fixture
def cluster() -> Iterator[tuple[subprocess.Popen[str], Output]]:
    for binary, package in [("swaks", "swaks"), ("redis-server", "redis-server")]:
        if shutil.which(binary) is None:
            pytest.fail(f"{binary} is missing: run `apt-get install {package}` (or `make test`)")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        yield process, Output(process)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_walk_through_as_printed_then_ctrl_c_leaves_nothing(
    cluster: tuple[subprocess.Popen[str], Output],
) -> None:
    process, output = cluster
    files_before = _tree_files()
    output.wait_for(r"Ctrl-C stops everything")
    directory = Path(
        re.search(r"everything lives in (\S+)", "\n".join(output.lines)).group(1)  # type: ignore[union-attr]
    )
    assert directory.is_dir()
    commands = [line[3:] for line in output.lines if re.match(r"^   \S", line)]
    assert len(commands) == 16, output.lines
    printed = "\n".join(output.lines)
    servers = {
        name: re.search(rf"{name} server +(127\.0\.0\.1:\d+)", printed).group(1)  # type: ignore[union-attr]
        for name in ("old", "new")
    }
    dark_server = re.search(r"dark server +(127\.0\.0\.1:\d+)", printed).group(1)  # type: ignore[union-attr]
    children = _descendants(process.pid)
    assert sorted(map(_kind, children.values())) == [
        "accounting", "accounting", "moxy", "moxy", "redis", "slapd"
    ], children

    arrivals: list[tuple[str, str, str, str]] = []

    def run(command: str, status: int = 0) -> str:
        done = subprocess.run(
            command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        assert done.returncode == status, f"{command}\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def lands(command: str, *servers: str) -> None:
        run(command)
        for _ in servers:
            match = ARRIVAL.match(output.wait_for(ARRIVAL.pattern, timeout=10))
            assert match is not None
            arrivals.append(match.groups())  # type: ignore[arg-type]

    send_a, route_set, send_b, send_a_again, lookup, send_ldap, route_del, stats = commands[:8]
    tls, dark, dark_again, send_b_again, dead_set, metrics, reload, greeting = commands[8:]
    lands(send_a, "old")
    assert arrivals[-1] == ("old", "node-a", "alice@example.test", "step 1 via A")
    assert re.fullmatch(r"moxy: example\.test -> 127\.0\.0\.1:\d+\n", run(route_set))
    lands(send_b, "new")
    assert arrivals[-1] == ("new", "node-b", "alice@example.test", "step 3 via B")
    # Node A had the file's route in its cache for a minute: the announcement dropped it.
    lands(send_a_again, "new")
    assert arrivals[-1] == ("new", "node-a", "alice@example.test", "step 4 via A")
    assert run(lookup).startswith("source: ldap\nkey: directory.test\ngroup 1:")
    lands(send_ldap, "old", "new")
    assert sorted(arrivals[-2:]) == [
        ("new", "node-b", "info@directory.test", "step 5 via B"),
        ("old", "node-b", "info@directory.test", "step 5 via B"),
    ]
    assert run(route_del) == "moxy: example.test deleted\n"
    lands(send_a.replace("step 1", "after undo"), "old")
    assert arrivals[-1] == ("old", "node-a", "alice@example.test", "after undo via A")
    # Step 7: both nodes' counters in Redis. Each server got three copies (the LDAP route's
    # message went to both); the nodes flush every second, so the JSON form is asked until
    # every copy is counted, then the command runs as printed.
    assert "moxystats" in stats and stats.endswith(" --once")
    deadline = time.monotonic() + 15
    while True:
        rows = {row["key"]: row for row in json.loads(run(f"{stats} --json"))}
        counted = {name: rows.get(dest, {}).get("messages") for name, dest in servers.items()}
        if counted == {"old": 3, "new": 3} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert counted == {"old": 3, "new": 3}, rows
    by_node = {row["key"]: row["messages"] for row in json.loads(run(f"{stats} --json --by node"))}
    assert by_node == {"node-a": 3, "node-b": 3}
    table = run(stats).splitlines()
    assert table[0].startswith("moxystats: Redis redis://127.0.0.1:") and ", by dest, " in table[0]
    assert sorted(line.split()[:2] for line in table[2:]) == sorted(
        [[servers["old"], "3"], [servers["new"], "3"]]
    )

    # Step 8: STARTTLS with the cluster's throwaway certificate.
    assert tls.endswith(" --tls")
    arrived = len(arrivals)
    lands(tls, "old")
    assert arrivals[arrived:] == [("old", "node-a", "alice@example.test", "step 8 via A, TLS")]
    # Steps 9 and 10: a dark destination costs its first sender one greeting timeout (5 s in
    # the cluster), the next one nothing, and other domains nothing.
    started = time.monotonic()
    assert re.search(r"<\*\* +451 4\.4\.1 ", run(dark, status=24)), dark
    assert time.monotonic() - started >= 4.5
    started = time.monotonic()
    assert re.search(r"<\*\* +451 4\.4\.1 ", run(dark_again, status=24))
    assert time.monotonic() - started < 3
    lands(send_b_again, "old")
    assert arrivals[-1] == ("old", "node-b", "alice@example.test", "step 10 via B")
    assert re.match(rf"{re.escape(dark_server)}  down since .*greeting: no reply within 5s",
                    run(dead_set))
    # Step 11: node B's metrics.
    scraped = run(metrics).splitlines()
    assert 'moxy_messages_total{result="2xx"} 3.0' in scraped  # steps 3, 5 and 10
    assert "moxy_destinations_down 1.0" in scraped
    assert 'moxy_destination_skipped_total{reason="down"} 1.0' in scraped  # step 10's
    # Step 12: SIGHUP reloads node A's configuration; the greeting shows it.
    assert "kill -HUP " in reload
    run(reload)
    deadline = time.monotonic() + 10
    while "ESMTP Moxy, reloaded" not in (said := run(greeting)):
        assert time.monotonic() < deadline, said
        time.sleep(0.2)

    # Ctrl-C: the terminal signals the whole foreground process group.
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(30) == 0, "\n".join(output.lines)
    output.wait_for(r"^cluster stopped")
    survivors = [command for pid, (start, command) in children.items() if _alive(pid, start)]
    assert survivors == []
    assert not directory.exists()
    assert _tree_files() == files_before


def test_make_cluster_runs_the_script() -> None:
    # Under `make test` this make is a sub-make: without the parent's flags, and without the
    # "Entering directory" lines a sub-make prints.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", "-o", ".venv/.run-installed", "-o", ".venv/.native",
         "-o", "test-debs", "cluster"],
        cwd=ROOT, capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [".venv/bin/python scripts/cluster.py"]


def test_a_child_that_dies_stops_the_whole_cluster(
    cluster: tuple[subprocess.Popen[str], Output],
) -> None:
    process, output = cluster
    output.wait_for(r"Ctrl-C stops everything")
    directory = Path(
        re.search(r"everything lives in (\S+)", "\n".join(output.lines)).group(1)  # type: ignore[union-attr]
    )
    children = _descendants(process.pid)
    redis = next(pid for pid, child in children.items() if _kind(child) == "redis")
    os.kill(redis, signal.SIGKILL)
    line = output.wait_for(r"^cluster: ")
    assert line == "cluster: redis-server exited with status -9"
    assert process.wait(30) == 1
    assert [command for pid, (start, command) in children.items() if _alive(pid, start)] == []
    assert not directory.exists()
