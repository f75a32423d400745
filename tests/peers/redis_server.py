"""A real redis-server for tests (and a Sentinel): a free loopback port, a throwaway data dir.

Data survive `restart()` (append-only file, fsync always), as they would on a production node,
so a test can tell "Redis came back" from "Redis came back empty".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from peers.processes import ServerProcess
from peers.sink import free_port, require_binary
from peers.tls import TlsFiles

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer(ServerProcess):
    """redis-server on 127.0.0.1; with `tls`, it speaks TLS only (rediss://localhost:port)."""

    def __init__(
        self, directory: Path, password: str | None = None, tls: TlsFiles | None = None
    ) -> None:
        binary = require_binary(REDIS_SERVER, "redis-server")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls
        listen = ["--port", str(self.port)]
        if tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            listen += ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
            listen += ["--tls-ca-cert-file", str(tls.ca)]
        argv = [
            binary,
            *listen,
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--loglevel",
            "warning",
            # Moxy must never use KEYS (it stalls a big Redis): make any use of it fail.
            "--rename-command",
            "KEYS",
            "KEYS-is-disabled-in-tests",
        ]
        if password is not None:
            argv += ["--requirepass", password]
        super().__init__("redis-server", argv, [self.port], directory / "redis.log")

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls is not None:
            return f"rediss://{auth}localhost:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain client, for a test to look at or change what is stored."""
        return redis.Redis.from_url(self.url, socket_timeout=5)


class RedisSentinel(ServerProcess):
    """A redis-server in Sentinel mode watching `master` under the name `master_name`."""

    def __init__(self, directory: Path, master: RedisServer, master_name: str = "moxy") -> None:
        binary = require_binary(REDIS_SERVER, "redis-server")
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.master_name = master_name
        config = directory / "sentinel.conf"  # Sentinel rewrites it, so it must be a file
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\nloglevel warning\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master.port} 1\n"
        )
        argv = [binary, str(config), "--sentinel"]
        super().__init__("redis-sentinel", argv, [self.port], directory / "sentinel.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """make_redis_server(password=None, tls=None) -> a running redis-server, stopped at
    teardown."""
    started: list[ServerProcess] = []

    def make(password: str | None = None, tls: TlsFiles | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(started)}", password=password, tls=tls)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(make_redis_server: Callable[..., RedisServer]) -> RedisServer:
    """A running redis-server without a password, stopped at teardown."""
    return make_redis_server()


@pytest.fixture
def redis_sentinel(tmp_path: Path, redis_server: RedisServer) -> Iterator[RedisSentinel]:
    """A Sentinel watching `redis_server` as master "moxy"."""
    sentinel = RedisSentinel(tmp_path / "sentinel", redis_server)
    sentinel.start()
    yield sentinel
    sentinel.stop()
