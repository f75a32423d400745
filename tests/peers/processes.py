"""A real server program run by a test: started on a loopback port, stopped, restarted.

Tests use `stop()` and `restart()` to take a backend away mid-test and bring it back on the same
port with the same data directory; teardown calls `stop()`.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest


class ServerProcess:
    """One server program; `ready_ports` accept TCP connections once it serves."""

    def __init__(
        self, name: str, argv: Sequence[str], ready_ports: Sequence[int], log_path: Path
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_ports = list(ready_ports)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        assert not self.running, f"{self.name} is already running"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        waiting = list(self.ready_ports)
        while waiting:
            if self.process.poll() is not None:
                pytest.fail(
                    f"{self.name} exited with status {self.process.returncode} at start:\n"
                    f"{self.log()}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not listen within {timeout}s:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), timeout=1).close()
            except OSError:
                time.sleep(0.01)
                continue
            waiting.pop(0)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (SIGTERM, a clean shutdown) and wait; SIGKILL if it takes too long."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"
