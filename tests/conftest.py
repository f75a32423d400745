"""Fixtures shared by the whole suite: real SMTP peers around a real Moxy.

- `make_recorder(script, **options)`: a scriptable recording upstream (tests/peers/recorder.py).
- `smtp_sink` / `make_smtp_sink(*options)`: Postfix's smtp-sink as an upstream.
- `moxy(routes, **sections)`: Moxy served in-process in the test's trio run; returns a
  `RunningMoxy` with the bound address. Cancelled at teardown.
- `moxy_process(routes, **sections)`: `python -m moxy serve -c moxy.toml` as a subprocess on a
  free port; terminated at teardown.
- `write_config(routes, **sections)`: the TOML file (and routes file) both of them use.
- `redis_server`, `make_redis_server`, `redis_sentinel`, `slapd`, `slapd_tls`, `tls_files`:
  real route backends on loopback ports (tests/peers/redis_server.py, slapd.py, tls.py).

How `routes` and sections are written is in tests/peers/moxy.py. `routes` is positional, so
`routes={"chain": [...]}` is the `[routes]` section; `**{"routes.ldap": {...}}` becomes a
`[routes.ldap]` table; without "file" in a `chain` the routes file is left out of `[routes]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

# The peers are importable as `peers.*` whether or not tests/ is a package.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from peers.moxy import (  # noqa: E402
    DEFAULT_SECTIONS,
    MoxyProcess,
    Routes,
    RunningMoxy,
    StartMoxy,
    merge_sections,
    routes_text,
    toml_text,
)
from peers.recorder import Recorder  # noqa: E402
from peers.redis_server import make_redis_server, redis_sentinel, redis_server  # noqa: E402
from peers.sink import SmtpSink, free_port, wait_for_greeting  # noqa: E402
from peers.slapd import slapd, slapd_tls  # noqa: E402
from peers.tls import tls_files  # noqa: E402

__all__ = [  # the backend fixtures, for every test module
    "make_redis_server",
    "redis_sentinel",
    "redis_server",
    "slapd",
    "slapd_tls",
    "tls_files",
]

WriteConfig = Callable[..., Path]


def pytest_sessionstart(session: pytest.Session) -> None:
    """The native build (setup.py) must be what runs: `make test` asks for it with
    MOXY_EXPECT_NATIVE=1, and an in-place build older than its source would test old code."""
    from moxy import native

    if stale := native.stale():
        pytest.exit(f"compiled modules older than their source: {', '.join(stale)}; "
                    "run `make native` (or delete the .so files to test pure Python)", 2)
    if os.environ.get("MOXY_EXPECT_NATIVE") == "1":
        missing = sorted(set(native.MODULES + native.C_MODULES) - set(native.compiled()))
        if missing:
            pytest.exit(f"native build expected but not compiled: {', '.join(missing)}", 2)


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """write_config(routes, listen=[...], server={...}, timeouts={...}, ...) -> moxy.toml path.

    Writes moxy.toml and routes into a fresh directory under tmp_path, with the log file
    moxy.log beside them; keyword sections are merged over the suite's defaults key by key."""

    written: list[Path] = []

    def write(
        routes: Routes,
        /,
        *,
        listen: Sequence[str] = ("127.0.0.1:0",),
        **sections: Mapping[str, Any],
    ) -> Path:
        # Every call gets its own directory, so two servers in one test do not share files.
        directory = tmp_path / f"moxy{len(written)}"
        directory.mkdir()
        (directory / "routes").write_text(routes_text(routes))
        base: dict[str, dict[str, object]] = {
            "server": {"listen": list(listen)},
            "routes": {"file": "routes"},  # relative to the config file
            "log": {"file": "moxy.log"},
        }
        merged = merge_sections(base, DEFAULT_SECTIONS, sections)
        chain = merged["routes"].get("chain")
        if isinstance(chain, list) and "file" not in chain:
            del merged["routes"]["file"]
        path = directory / "moxy.toml"
        path.write_text(toml_text(merged))
        written.append(path)
        return path

    return write


# --- upstream peers ------------------------------------------------------------------------


@pytest.fixture
def make_recorder() -> Iterator[Callable[..., Recorder]]:
    """make_recorder(script=None, **options) -> a running Recorder, stopped at teardown."""
    started: list[Recorder] = []

    def make(script: Mapping[str, Any] | None = None, **options: Any) -> Recorder:
        options.setdefault("name", f"recorder{len(started)}")
        recorder = Recorder(script, **options)
        started.append(recorder)
        return recorder

    yield make
    for recorder in started:
        recorder.stop()


@pytest.fixture
def make_smtp_sink() -> Iterator[Callable[..., SmtpSink]]:
    """make_smtp_sink(*smtp_sink_options) -> a running SmtpSink, stopped at teardown."""
    started: list[SmtpSink] = []

    def make(*options: str) -> SmtpSink:
        sink = SmtpSink(*options)
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.stop()


@pytest.fixture
def smtp_sink(make_smtp_sink: Callable[..., SmtpSink]) -> SmtpSink:
    return make_smtp_sink()


# --- Moxy ----------------------------------------------------------------------------------


@pytest.fixture
async def moxy(write_config: WriteConfig) -> AsyncIterator[StartMoxy]:
    """await moxy(routes, **sections) -> RunningMoxy served in this test's trio run; every call
    starts another server. All of them are cancelled at teardown."""
    async with trio.open_nursery() as nursery:

        async def start(routes: Routes, /, **sections: Any) -> RunningMoxy:
            from moxy.config import load_config
            from moxy.server import serve

            path = write_config(routes, **sections)
            config = load_config(path)
            bound = await nursery.start(serve, config)
            assert bound, "serve() reported no bound address"
            return RunningMoxy([(str(h), int(p)) for h, p in bound], path, path.parent / "moxy.log")

        yield start
        nursery.cancel_scope.cancel()


@pytest.fixture
def moxy_process(write_config: WriteConfig) -> Iterator[Callable[..., MoxyProcess]]:
    """moxy_process(routes, **sections) -> `python -m moxy serve -c moxy.toml` on a free port."""
    started: list[MoxyProcess] = []

    def start(routes: Routes, /, **sections: Any) -> MoxyProcess:
        port = free_port()
        path = write_config(routes, listen=[f"127.0.0.1:{port}"], **sections)
        stderr_path = path.parent / "moxy.stderr"
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "moxy", "serve", "-c", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                cwd=path.parent,
            )
        running = MoxyProcess(
            process, "127.0.0.1", port, path, path.parent / "moxy.log", stderr_path
        )
        started.append(running)
        try:
            wait_for_greeting("127.0.0.1", port, 15, process)
        except RuntimeError as exc:
            pytest.fail(f"moxy serve did not come up: {exc}\n--- output ---\n{running.stderr()}")
        return running

    yield start
    problems = []
    for running in started:
        if running.stopped_by_test:
            continue
        if running.process.poll() is not None:
            problems.append(
                f"moxy serve died during the test (status {running.process.returncode}):\n"
                f"{running.stderr()}"
            )
            continue
        running.process.terminate()
        try:
            running.process.wait(10)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait(5)
            problems.append(f"moxy serve ignored SIGTERM for 10 s:\n{running.stderr()}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
