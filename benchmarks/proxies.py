"""The programs `bench_compare.py` measures, each started on loopback with a route to the sink.

Every proxy is a context manager yielding a `Proxy`: the port it listens on and the root pid
of its process tree (whose CPU time is what the comparison reports). Nothing here talks to
anything but 127.0.0.1; Haraka's reverse DNS lookup is answered by a local plugin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
HARAKA_DIR = ROOT / "benchmarks" / ".cache" / "haraka"  # npm install target (git-ignored)
HARAKA_VERSION = "3.3.4"


@attrs.frozen
class Proxy:
    name: str
    port: int
    pid: int  # root of the process tree whose CPU is measured


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Until something accepts connections on `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: nothing answers on 127.0.0.1:{port}")


def wait_greeting(port: int, timeout: float = 30.0) -> None:
    """Until a server on `port` sends its 220 greeting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.settimeout(5)
            if s.recv(512).startswith(b"220"):
                s.sendall(b"QUIT\r\n")
                return
        time.sleep(0.1)
    raise SystemExit(f"bench: no SMTP greeting on 127.0.0.1:{port} within {timeout:g}s")


def need(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin")
    if path is None:
        raise SystemExit(f"bench: {tool} not found; install it with: apt-get install {package}")
    return path


@contextlib.contextmanager
def _process(args: list[str], cwd: Path | None = None, **env: str) -> Iterator[int]:
    log = open(os.devnull, "wb") if cwd is None else open(cwd / "stderr.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        args, cwd=cwd, stdout=log, stderr=log, env={**os.environ, **env}, start_new_session=True
    )
    try:
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@contextlib.contextmanager
def smtp_sink(port: int) -> Iterator[int]:
    """Postfix's smtp-sink: accepts and discards, answers each command at once."""
    args = [need("smtp-sink", "postfix")]
    if os.geteuid() == 0:
        args += ["-u", "nobody"]
    with _process([*args, f"127.0.0.1:{port}", "1024"]) as pid:
        wait_greeting(port)
        yield pid


@contextlib.contextmanager
def moxy(
    workdir: Path, routes: str, *, workers: int = 1, idle_upstreams: int | None = None,
    name: str = "moxy", extra: str = "", server: str = "",
) -> Iterator[Proxy]:
    """Moxy with a route file and `extra` TOML tables appended to its configuration (`server`:
    more `[server]` lines)."""
    port = free_port()
    (workdir / "routes").write_text(routes)
    (workdir / "moxy.toml").write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "bench.moxy.test"\n'
        f"workers = {workers}\n{server}"
        '[routes]\nfile = "routes"\n[log]\nfile = "moxy.log"\nlevel = "warning"\n'
        "[limits]\nmessage_size = 104857600\nconnections = 5000\n"
        # Every client of a benchmark comes from 127.0.0.1: no per-address cap.
        "connections_per_ip = 0\n"
        + ("" if idle_upstreams is None else f"idle_upstreams = {idle_upstreams}\n")
        + extra
    )
    args = [sys.executable, "-m", "moxy", "serve", "-c", str(workdir / "moxy.toml")]
    with _process(args, cwd=workdir) as pid:
        wait_greeting(port)
        yield Proxy(name, port, pid)


@contextlib.contextmanager
def floor(sink_port: int, pool: int) -> Iterator[Proxy]:
    """The trio floor relay (benchmarks/floor_relay.py): what a minimal correct relay on trio
    costs, the yardstick for Moxy's own bookkeeping."""
    port = free_port()
    script = ROOT / "benchmarks" / "floor_relay.py"
    args = [sys.executable, str(script), "--listen", f"127.0.0.1:{port}", "--to",
            f"127.0.0.1:{sink_port}", "--pool", str(pool)]
    with _process(args) as pid:
        wait_greeting(port)
        yield Proxy("trio floor", port, pid)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (nothing saved); yields its URL."""
    binary = need("redis-server", "redis-server")
    port = free_port()
    directory = workdir / "redis"
    directory.mkdir()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
    with _process(args):
        wait_port(port)
        yield f"redis://127.0.0.1:{port}/0"


def accounting_toml(redis_url: str | None, flush_interval: float = 1.0,
                    interval: float = 0.5, process: bool = True) -> str:
    """Moxy's message log plus the Redis counters every node of a cluster would keep; with
    `redis_url` None, no accounting at all (`sinks = []`: not even the message log). With
    `process` false, the sinks run in the serving process (`[accounting] process = false`)."""
    if redis_url is None:
        return "[accounting]\nsinks = []\n"
    return (f'[accounting]\nsinks = ["file", "redis"]\ninterval = {interval}\n'
            f'process = {"true" if process else "false"}\n'
            f'[accounting.redis]\nurl = "{redis_url}"\nflush_interval = {flush_interval}\n')


_NGINX_CONF = """\
load_module {module};
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    # auth_http answered by nginx itself: every session goes to the sink.
    server {{
        listen 127.0.0.1:{auth_port};
        location /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server 127.0.0.1;
            add_header Auth-Port {sink_port};
            return 204;
        }}
    }}
}}
mail {{
    server_name bench.nginx.test;
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_pass_error_message on;
    xclient off;
    smtp_auth none;
    server {{
        listen 127.0.0.1:{port};
        protocol smtp;
    }}
}}
"""


def nginx_version() -> str:
    out = subprocess.run([need("nginx", "nginx-light"), "-v"], capture_output=True, text=True)
    return out.stderr.strip().removeprefix("nginx version: ")


@contextlib.contextmanager
def nginx(workdir: Path, sink_port: int) -> Iterator[Proxy]:
    """nginx's mail proxy, one worker, as in the issue's reference figures."""
    module = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
    if not module.exists():
        raise SystemExit("bench: nginx's mail module is missing; install it with: "
                         "apt-get install libnginx-mod-mail")
    port, auth_port = free_port(), free_port()
    (workdir / "tmp").mkdir()
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    conf = workdir / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(
        module=module, user=user, prefix=workdir, auth_port=auth_port, sink_port=sink_port,
        port=port,
    ))
    with _process([need("nginx", "nginx-light"), "-p", str(workdir), "-c", str(conf)],
                  cwd=workdir) as pid:
        wait_greeting(port)
        yield Proxy("nginx", port, pid)


_RDNS_PLUGIN = """\
// The benchmark stays on loopback: answer Haraka's reverse DNS lookup locally.
exports.hook_lookup_rdns = function (next, connection) {
    next(OK, 'localhost');
};
"""


def haraka_available() -> str | None:
    """Why Haraka cannot run here, or None. Installs it from npm on first use."""
    binary = HARAKA_DIR / "node_modules" / ".bin" / "haraka"
    if binary.exists():
        return None
    if shutil.which("npm") is None or shutil.which("node") is None:
        return "Node.js/npm not found (Haraka needs Node.js 20 or newer)"
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout
    if int(node.strip().lstrip("v").split(".")[0] or 0) < 20:
        return f"Node.js {node.strip()} is too old for Haraka {HARAKA_VERSION} (needs 20+)"
    HARAKA_DIR.mkdir(parents=True, exist_ok=True)
    print(f"bench: installing Haraka {HARAKA_VERSION} from npm into {HARAKA_DIR} ...",
          flush=True)
    done = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(HARAKA_DIR),
         f"Haraka@{HARAKA_VERSION}"],
        capture_output=True, text=True,
    )
    if done.returncode != 0 or not binary.exists():
        return "npm install Haraka failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return None


def haraka_version() -> str:
    package = HARAKA_DIR / "node_modules" / "Haraka" / "package.json"
    return str(json.loads(package.read_text())["version"])


@contextlib.contextmanager
def haraka(workdir: Path, sink_port: int, domains: list[str]) -> Iterator[Proxy]:
    """Haraka with smtp_forward to the sink, one process (nodes unset)."""
    port = free_port()
    config = workdir / "config"
    (workdir / "plugins").mkdir()
    # Haraka's own defaults first (connection.ini and the like), then the benchmark's settings.
    shutil.copytree(HARAKA_DIR / "node_modules" / "Haraka" / "config", config)
    (workdir / "plugins" / "rdns_local.js").write_text(_RDNS_PLUGIN)
    (config / "smtp.ini").write_text(f"listen=127.0.0.1:{port}\n")
    (config / "plugins").write_text("rdns_local\nrcpt_to.in_host_list\nqueue/smtp_forward\n")
    (config / "host_list").write_text("\n".join(domains) + "\n")
    (config / "smtp_forward.ini").write_text(
        f"host=127.0.0.1\nport={sink_port}\nenable_tls=false\n"
    )
    (config / "log.ini").write_text("[main]\nlevel=error\n")
    (config / "me").write_text("bench.haraka.test\n")
    binary = HARAKA_DIR / "node_modules" / ".bin" / "haraka"
    with _process([str(binary), "-c", str(workdir)], cwd=workdir) as pid:
        wait_greeting(port)
        yield Proxy("haraka", port, pid)
