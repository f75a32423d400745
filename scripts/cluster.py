"""`make cluster`: a small ISP's Moxy setup on loopback, in the foreground, until Ctrl-C.

Two Moxy nodes share one Redis (routes and their change announcements) and one slapd (Moxy's
schema, the shipped example tree and one route of its own), with chain ["redis", "ldap", "file"];
two recording SMTP servers stand in for a customer's old and new mail server. The script prints
copy-paste commands with the real ports, then one line per message those servers receive.
Everything lives in one temporary directory; Ctrl-C (SIGINT), SIGTERM or SIGHUP stop every
process it started (each in its own process group) and remove the directory.

Run with the project's venv python (`make cluster`); needs redis-server and slapd (`make test`
installs both). Standard library only, so that a broken Moxy install still gets a clear message.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
SLAPD_INIT = ROOT / "deploy" / "ldap" / "slapd-init"
EXAMPLE_LDIF = ROOT / "deploy" / "ldap" / "example.ldif"
REDIS_SERVER = "/usr/bin/redis-server"
SLAPD = "/usr/sbin/slapd"
ROUTES_BASE = "ou=routes,dc=example,dc=net"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0  # per process group, before SIGKILL

# Extra TOML for both nodes' configurations, with {redis_port} and {name} filled in: both
# nodes count what they deliver in the cluster's Redis, which `moxystats` (step 7) reads.
# While empty, the moxystats step is not printed.
ACCOUNTING_TOML = """
[accounting]
sinks = ["file", "redis"]

[accounting.redis]
url = "redis://127.0.0.1:{redis_port}/0"
"""


class Stopped(Exception):
    """A stop signal arrived (raised by the signal handler into the main loop)."""


class ClusterError(Exception):
    """Something did not start; the message is the one line the user sees."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the two recording SMTP servers ---------------------------------------------------------

_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


class Sink(socketserver.ThreadingTCPServer):
    """Accepts every message, stores it as <directory>/<n>.eml and prints one line about it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, directory: Path) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.name = name
        self.directory = directory
        self.count = 0
        self.lock = threading.Lock()
        self.serving = False
        directory.mkdir()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def record(self, sender: str, recipients: list[str], data: bytes) -> None:
        with self.lock:
            self.count += 1
            (self.directory / f"{self.count}.eml").write_bytes(data)
        text = data.decode("utf-8", "replace")
        via = re.search(r"\bby (\S+) \(Moxy\)", text)
        subject = re.search(r"^Subject: *(.*?)\r?$", text, re.MULTILINE | re.IGNORECASE)
        say(
            f"{self.name} server 127.0.0.1:{self.port} <- {via.group(1) if via else '?'}: "
            f"from {sender} to {', '.join(recipients)}, "
            f"Subject: {subject.group(1) if subject else ''}"
        )


class _SinkHandler(socketserver.StreamRequestHandler):
    server: Sink

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.reply(f"220 {self.server.name}.customer.test ESMTP recording sink")
        sender, recipients = "", []
        while line := self.rfile.readline(4096):
            verb = line[:4].upper()
            argument = line[5:].decode("utf-8", "replace").strip()
            if verb in (b"EHLO", b"HELO"):
                self.reply(f"250 {self.server.name}.customer.test")
            elif verb == b"MAIL":
                sender, recipients = argument.removeprefix("FROM:").split(" ")[0], []
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                recipients.append(argument.removeprefix("TO:").split(" ")[0])
                self.reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                lines = []
                while (data := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                    lines.append(data[1:] if data.startswith(b"..") else data)
                self.server.record(sender, recipients, b"".join(lines))
                self.reply(f"250 2.0.0 Ok: stored by the {self.server.name} server")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:  # RSET, NOOP
                sender, recipients = "", []
                self.reply("250 2.0.0 Ok")


# --- child processes -------------------------------------------------------------------------


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if this script dies without cleaning up. (Children
    are started before the sinks' threads, so nothing else runs while this does.)"""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Cluster:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="moxy-cluster-"))
        self.children: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        self.sinks: list[Sink] = []

    def tail(self, name: str) -> str:
        """The end of a child's output and log, for the message that it failed (the directory
        is removed right after)."""
        text = ""
        for path in (self.directory / f"{name}.out", self.directory / f"{name}.log"):
            if path.exists():
                text += path.read_text(errors="replace")
        lines = text.strip().splitlines()[-10:]
        return "".join(f"\n    {line}" for line in lines)

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}.out"
        with open(log, "wb") as out:
            child = subprocess.Popen(
                argv,
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,  # Ctrl-C reaches this script only; it stops the groups
                preexec_fn=_die_with_parent,
            )
        self.children.append((name, child, log))
        return child

    def wait_ready(self, name: str, child: subprocess.Popen[bytes], port: int, smtp: bool) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if child.poll() is not None:
                raise ClusterError(
                    f"{name} exited with status {child.returncode} at start{self.tail(name)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    if not smtp or sock.makefile("rb").readline().startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ClusterError(
            f"{name} did not answer on 127.0.0.1:{port} within {START_TIMEOUT}s{self.tail(name)}"
        )

    def check_children(self) -> None:
        for name, child, _log in self.children:
            if child.poll() is not None:
                raise ClusterError(f"{name} exited with status {child.returncode}{self.tail(name)}")

    def stop(self) -> None:
        """Every process group, newest first (the nodes before their backends), then the sinks
        and the directory."""
        for _name, child, _log in reversed(self.children):
            _signal_group(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for _name, child, _log in reversed(self.children):
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            _signal_group(child.pid, signal.SIGKILL)  # anything the child left in its group
        for sink in self.sinks:
            if sink.serving:
                sink.shutdown()  # waits for serve_forever to return: only if it runs
            sink.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# --- the cluster ---------------------------------------------------------------------------


def _node_toml(name: str, port: int, redis_port: int, ldap_port: int) -> str:
    return f"""\
# Moxy {name} of `make cluster` (scripts/cluster.py); the other node differs only in name and port.
[server]
listen = ["127.0.0.1:{port}"]
hostname = "{name}.cluster.test"
node = "{name}"

[routes]
chain = ["redis", "ldap", "file"]
file = "routes"

[routes.redis]
url = "redis://127.0.0.1:{redis_port}/0"

[routes.ldap]
uri = ["ldap://127.0.0.1:{ldap_port}"]
base = "{ROUTES_BASE}"

[log]
file = "{name}.log"
{ACCOUNTING_TOML.format(redis_port=redis_port, name=name)}"""


def _ldap_route_ldif(old: int, new: int) -> str:
    return f"""\
dn: moxyRouteKey=directory.test,{ROUTES_BASE}
objectClass: moxyRoute
moxyRouteKey: directory.test
moxyDestination: 127.0.0.1:{old}
moxyDestination: 127.0.0.1:{new}
description: make cluster: a customer routed by LDAP; both servers get every message
"""


def _shown(path: Path) -> str:
    """A path as short as it can be pasted from the directory `make cluster` ran in."""
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def start(cluster: Cluster) -> dict[str, int]:
    moxy = Path(sys.executable).parent / "moxy"
    for binary, hint in [(moxy, "make cluster"), (REDIS_SERVER, "make test"), (SLAPD, "make test")]:
        if not Path(binary).exists():
            raise ClusterError(f"{binary} is missing: run `{hint}` first")
    d = cluster.directory
    for name in ("old", "new"):  # bound now, served once every child is started
        cluster.sinks.append(Sink(name, d / f"{name}-server"))
    ports = {"old": cluster.sinks[0].port, "new": cluster.sinks[1].port}
    ports |= {name: free_port() for name in ("redis", "ldap", "node-a", "node-b")}

    (d / "redis").mkdir()
    redis = cluster.spawn("redis-server", [
        REDIS_SERVER, "--port", str(ports["redis"]), "--bind", "127.0.0.1",
        "--dir", str(d / "redis"), "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--loglevel", "warning",
    ])  # fmt: skip
    (d / "directory.ldif").write_text(_ldap_route_ldif(ports["old"], ports["new"]))
    init = subprocess.run(
        [SLAPD_INIT, str(d / "ldap"), str(EXAMPLE_LDIF), str(d / "directory.ldif")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if init.returncode:
        raise ClusterError(f"slapd-init failed: {' '.join(init.stderr.split())}")
    slapd = cluster.spawn("slapd", [
        SLAPD, "-d", "0", "-F", str(d / "ldap" / "slapd.d"),
        "-h", f"ldap://127.0.0.1:{ports['ldap']}/",
    ])  # fmt: skip
    (d / "routes").write_text(
        "# make cluster: the customer's domain starts on its old server.\n"
        f"example.test  127.0.0.1:{ports['old']}\n"
    )
    cluster.wait_ready("redis-server", redis, ports["redis"], smtp=False)
    cluster.wait_ready("slapd", slapd, ports["ldap"], smtp=False)
    nodes = []
    for name in ("node-a", "node-b"):
        config = d / f"{name}.toml"
        config.write_text(_node_toml(name, ports[name], ports["redis"], ports["ldap"]))
        nodes.append((name, cluster.spawn(name, [str(moxy), "serve", "--config", str(config)])))
    for sink in cluster.sinks:
        sink.serving = True  # set before the thread runs: stop() then waits for it to end
        threading.Thread(target=sink.serve_forever, daemon=True).start()
    for name, node in nodes:
        cluster.wait_ready(name, node, ports[name], smtp=True)
    return ports


def instructions(directory: Path, ports: dict[str, int]) -> str:
    moxy = _shown(Path(sys.executable).parent / "moxy")
    config = directory / "node-a.toml"

    def swaks(node: str, to: str, subject: str) -> str:
        return (
            f"swaks --server 127.0.0.1:{ports[node]} --from sender@elsewhere.test --to {to} "
            f"--h-Subject '{subject}'"
        )

    steps: list[tuple[str, list[str]]] = [
        (
            "Send to node A: the routes file sends example.test to the old server",
            [swaks("node-a", "alice@example.test", "step 1 via A")],
        ),
        (
            "The customer moved: route example.test to the new server in Redis",
            [f"{moxy} route set --config {config} example.test 127.0.0.1:{ports['new']}"],
        ),
        (
            "Send to node B: it lands in the new server at once",
            [swaks("node-b", "alice@example.test", "step 3 via B")],
        ),
        (
            "Send to node A again: it had cached the old route, and dropped it on the announcement",
            [swaks("node-a", "alice@example.test", "step 4 via A")],
        ),
        (
            "An address routed by LDAP (two moxyDestination values: both servers get it)",
            [
                f"{moxy} lookup --config {config} info@directory.test",
                swaks("node-b", "info@directory.test", "step 5 via B"),
            ],
        ),
        (
            "Undo step 2: mail for example.test goes back to the old server",
            [f"{moxy} route del --config {config} example.test"],
        ),
    ]
    if ACCOUNTING_TOML:
        moxystats = _shown(Path(sys.executable).parent / "moxystats")
        steps.append(
            ("Counters of both nodes, from Redis", [f"{moxystats} --config {config} --once"])
        )
    lines = [
        f"Moxy cluster on loopback; everything lives in {directory}",
        f"  node A        smtp 127.0.0.1:{ports['node-a']}   config {directory}/node-a.toml",
        f"  node B        smtp 127.0.0.1:{ports['node-b']}   config {directory}/node-b.toml",
        f"  redis         127.0.0.1:{ports['redis']}   routes and announcements",
        f"  slapd         ldap://127.0.0.1:{ports['ldap']}   base {ROUTES_BASE}",
        f"  old server    127.0.0.1:{ports['old']}   the routes file sends example.test here",
        f"  new server    127.0.0.1:{ports['new']}",
        '  chain = ["redis", "ldap", "file"]; node logs: node-a.log, node-b.log in that directory',
        "",
        "Try, in another terminal:",
    ]
    for number, (what, commands) in enumerate(steps, start=1):
        lines += ["", f"{number}. {what}:", *(f"   {command}" for command in commands)]
    lines += ["", "Messages the two servers receive are shown below. Ctrl-C stops everything."]
    return "\n".join(lines)


def main() -> int:
    def stop(signum: int, _frame: FrameType | None) -> None:
        raise Stopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)
    cluster = Cluster()
    status = 0
    try:
        ports = start(cluster)
        say(instructions(cluster.directory, ports))
        while True:
            cluster.check_children()
            time.sleep(0.5)
    except Stopped:
        pass
    except ClusterError as exc:
        print(f"cluster: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        # A second Ctrl-C must not cut the cleanup short; it is bounded by STOP_TIMEOUT anyway.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        cluster.stop()
    if status == 0:
        say("cluster stopped; its processes and directory are gone")
    return status


if __name__ == "__main__":
    sys.exit(main())
