"""`make cluster`: a small ISP's Moxy setup on loopback, in the foreground, until Ctrl-C.

Two Moxy nodes share one Redis (routes and their change announcements) and one slapd (Moxy's
schema, the shipped example tree and one route of its own), with chain ["redis", "ldap", "file"];
two recording SMTP servers stand in for a customer's old and new mail server, and a dark one
(scripts/cluster_servers.py) for a customer's server that takes connections and never greets.
The nodes offer STARTTLS (a throwaway certificate made with openssl), serve their metrics and
a control socket. The script prints copy-paste commands with the real ports (routes in Redis
and LDAP, moxystats, STARTTLS, the dead set, metrics, a SIGHUP reload), then one line per
message the recording servers receive.
Everything lives in one temporary directory; Ctrl-C (SIGINT), SIGTERM or SIGHUP stop every
process it started (each in its own process group) and remove the directory.

Run with the project's venv python (`make cluster`); needs redis-server and slapd (`make test`
installs both). Standard library only, so that a broken Moxy install still gets a clear message.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType

from cluster_servers import DarkServer, Sink, say

ROOT = Path(__file__).resolve().parent.parent
SLAPD_INIT = ROOT / "deploy" / "ldap" / "slapd-init"
EXAMPLE_LDIF = ROOT / "deploy" / "ldap" / "example.ldif"
REDIS_SERVER = "/usr/bin/redis-server"
SLAPD = "/usr/sbin/slapd"
OPENSSL = "/usr/bin/openssl"
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
        self.dark: DarkServer | None = None

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
        if self.dark is not None:
            self.dark.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# --- the cluster ---------------------------------------------------------------------------


def _node_toml(name: str, ports: dict[str, int], directory: Path) -> str:
    return f"""\
# Moxy {name} of `make cluster` (scripts/cluster.py); the other node differs only in name and ports.
[server]
listen = ["127.0.0.1:{ports[name]}"]
hostname = "{name}.cluster.test"
node = "{name}"
banner = "ESMTP Moxy"

[tls]  # a throwaway certificate the cluster made for both nodes
cert = "{directory}/cluster.crt"
key = "{directory}/cluster.key"

[timeouts]
upstream_greeting = 5  # a dark destination costs its first sender 5 s here (300 by default)

[destinations]
control_socket = "{directory}/{name}.control"  # `moxy destinations list` asks it

[metrics]
listen = "127.0.0.1:{ports[f"metrics-{name}"]}"

[routes]
chain = ["redis", "ldap", "file"]
file = "routes"

[routes.redis]
url = "redis://127.0.0.1:{ports["redis"]}/0"

[routes.ldap]
uri = ["ldap://127.0.0.1:{ports["ldap"]}"]
base = "{ROUTES_BASE}"

[log]
file = "{name}.log"
{ACCOUNTING_TOML.format(redis_port=ports["redis"], name=name)}"""


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
    for binary, hint in [(moxy, "make cluster"), (REDIS_SERVER, "make test"), (SLAPD, "make test"),
                         (OPENSSL, "make test")]:
        if not Path(binary).exists():
            raise ClusterError(f"{binary} is missing: run `{hint}` first")
    d = cluster.directory
    for name in ("old", "new"):  # bound now, served once every child is started
        cluster.sinks.append(Sink(name, d / f"{name}-server"))
    cluster.dark = DarkServer()
    ports = {"old": cluster.sinks[0].port, "new": cluster.sinks[1].port, "dark": cluster.dark.port}
    ports |= {name: free_port() for name in ("redis", "ldap", "node-a", "node-b",
                                             "metrics-node-a", "metrics-node-b")}
    certificate = subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=cluster.test", "-keyout", str(d / "cluster.key"),
         "-out", str(d / "cluster.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if certificate.returncode:
        raise ClusterError(f"openssl req failed: {' '.join(certificate.stderr.split())}")

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
        "# A customer's server gone dark: it takes connections and never greets.\n"
        f"dark.test  127.0.0.1:{ports['dark']}\n"
    )
    cluster.wait_ready("redis-server", redis, ports["redis"], smtp=False)
    cluster.wait_ready("slapd", slapd, ports["ldap"], smtp=False)
    nodes = []
    for name in ("node-a", "node-b"):
        config = d / f"{name}.toml"
        config.write_text(_node_toml(name, ports, d))
        nodes.append((name, cluster.spawn(name, [str(moxy), "serve", "--config", str(config)])))
    for sink in cluster.sinks:
        sink.serving = True  # set before the thread runs: stop() then waits for it to end
        threading.Thread(target=sink.serve_forever, daemon=True).start()
    for name, node in nodes:
        cluster.wait_ready(name, node, ports[name], smtp=True)
    return ports


def instructions(directory: Path, ports: dict[str, int], pids: dict[str, int]) -> str:
    moxy = _shown(Path(sys.executable).parent / "moxy")
    python = _shown(Path(sys.executable))
    config, config_b = directory / "node-a.toml", directory / "node-b.toml"

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
    metrics = (f"{python} -c \"import urllib.request as r; print(r.urlopen('http://127.0.0.1:"
               f"{ports['metrics-node-b']}/metrics').read().decode(), end='')\" | grep -E "
               "'^moxy_(messages_total|destination_skipped_total|destinations_down|"
               "upstream_connections)'")
    banner = "sed -i 's/^banner = .*/banner = \"ESMTP Moxy, reloaded\"/'"
    steps += [
        (
            "Node A offers STARTTLS, with a throwaway certificate (swaks does not check it)",
            [swaks("node-a", "alice@example.test", "step 8 via A, TLS") + " --tls"],
        ),
        (
            "dark.test's server takes connections and never greets: node B gives up after 5 s "
            "(upstream_greeting)",
            [swaks("node-b", "bob@dark.test", "step 9 via B")],
        ),
        (
            "The address is down now: its senders hear 451 at once, other mail flows, node B "
            "lists its dead set",
            [
                swaks("node-b", "bob@dark.test", "step 10 via B"),
                swaks("node-b", "alice@example.test", "step 10 via B"),
                f"{moxy} destinations list --config {config_b}",
            ],
        ),
        (
            "Node B's metrics (the Grafana dashboard in deploy/grafana shows them)",
            [metrics],
        ),
        (
            "Reload node A without a restart (SIGHUP, as systemctl reload sends): its greeting "
            "changes",
            [
                f"{banner} {config} && kill -HUP {pids['node-a']}",
                f"swaks --server 127.0.0.1:{ports['node-a']} --quit-after CONNECT",
            ],
        ),
    ]
    lines = [
        f"Moxy cluster on loopback; everything lives in {directory}",
        f"  node A        smtp 127.0.0.1:{ports['node-a']}   config {directory}/node-a.toml",
        f"  node B        smtp 127.0.0.1:{ports['node-b']}   config {directory}/node-b.toml",
        f"  redis         127.0.0.1:{ports['redis']}   routes and announcements",
        f"  slapd         ldap://127.0.0.1:{ports['ldap']}   base {ROUTES_BASE}",
        f"  old server    127.0.0.1:{ports['old']}   the routes file sends example.test here",
        f"  new server    127.0.0.1:{ports['new']}",
        f"  dark server   127.0.0.1:{ports['dark']}   takes connections, never greets "
        "(the routes file sends dark.test here)",
        f"  metrics       http://127.0.0.1:{ports['metrics-node-a']}/metrics (node A), "
        f"http://127.0.0.1:{ports['metrics-node-b']}/metrics (node B)",
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
        pids = {name: child.pid for name, child, _log in cluster.children}
        say(instructions(cluster.directory, ports, pids))
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
