"""Postfix's real `smtp-sink` as an upstream, and `swaks` as a client: peers we did not write.

`SmtpSink` runs `/usr/sbin/smtp-sink` on a free loopback port with one dump file per message.
smtp-sink creates a message's file at MAIL time and deletes it if the transaction is aborted, so
count or read messages only once the sender has had its final reply.

A missing binary is a broken test environment, never a reason to skip: `require_binary` fails
the test and says how to install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import pytest

SMTP_SINK = "/usr/sbin/smtp-sink"
SWAKS = "swaks"


def require_binary(name: str, package: str) -> str:
    """The path of `name`, or fail the test naming the Debian package that provides it."""
    path = shutil.which(name) or (name if os.access(name, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run `apt-get install {package}` (or `make test`, which "
            "installs every package the suite needs)",
            pytrace=False,
        )
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for programs that cannot bind port 0 and tell us)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_greeting(host: str, port: int, timeout: float, alive: subprocess.Popen[bytes]) -> None:
    """Wait until something on host:port sends a 220 greeting; fail if `alive` exits first."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if alive.poll() is not None:
            raise RuntimeError(f"exited with status {alive.returncode} before answering")
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                greeting = sock.recv(512)
                if greeting.startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
                last_error = RuntimeError(f"unexpected greeting {greeting!r}")
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not greet within {timeout}s: {last_error}")


@attrs.frozen
class SinkMessage:
    """One message as smtp-sink dumped it: LF line endings, dot-stuffing undone."""

    path: Path
    helo: str
    mail_from: str  # the X-Mail-Args value, e.g. "<a@example.com> SIZE=123"
    rcpts: tuple[str, ...]  # X-Rcpt-Args values, e.g. "<b@example.org>"
    text: bytes  # the message as received, without smtp-sink's own headers

    @property
    def lines(self) -> list[bytes]:
        return self.text.split(b"\n")


class SmtpSink:
    def __init__(self, *options: str, workdir: Path | None = None) -> None:
        binary = require_binary(SMTP_SINK, "postfix")
        # As root, smtp-sink insists on dropping privileges (-u), so the dump directory must be
        # writable by that user: a world-writable directory of our own, removed at stop().
        self.dumps = Path(tempfile.mkdtemp(prefix="moxy-smtp-sink-", dir=workdir))
        self.dumps.chmod(0o777)
        self.host = "127.0.0.1"
        self.port = free_port()
        argv = [binary, "-d", f"{self.dumps}/%Y%m%d%H%M%S.", "-h", "sink.test", "-t", "30"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        argv += [*options, f"{self.host}:{self.port}", "64"]
        self.argv = argv
        self.stderr_path = self.dumps.parent / f"{self.dumps.name}.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            wait_for_greeting(self.host, self.port, 10, self.process)
        except RuntimeError as exc:
            self.stop()
            pytest.fail(f"smtp-sink did not start ({' '.join(argv)}): {exc}\n{self.stderr()}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def messages(self) -> list[SinkMessage]:
        """The dumped messages, oldest first (by file time, then name)."""
        files = sorted(
            (p for p in self.dumps.rglob("*") if p.is_file()),
            key=lambda p: (p.stat().st_mtime_ns, p.name),
        )
        return [_parse_dump(p) for p in files]

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[SinkMessage]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._stderr.close()
        shutil.rmtree(self.dumps, ignore_errors=True)
        self.stderr_path.unlink(missing_ok=True)


def _parse_dump(path: Path) -> SinkMessage:
    raw = path.read_bytes()
    helo = mail_from = ""
    rcpts: list[str] = []
    lines = raw.split(b"\n")
    i = 0
    while i < len(lines):
        line = lines[i].decode("utf-8", "replace")
        i += 1
        if line.startswith("X-Helo-Args: "):
            helo = line.split(": ", 1)[1]
        elif line.startswith("X-Mail-Args: "):
            mail_from = line.split(": ", 1)[1]
        elif line.startswith("X-Rcpt-Args: "):
            rcpts.append(line.split(": ", 1)[1])
        elif line.startswith("Received: "):
            # smtp-sink's own three-line Received header ends its part of the file.
            while i < len(lines) and lines[i].startswith(b"\t"):
                i += 1
            break
    text = b"\n".join(lines[i:])
    # The dump ends with one empty line after the message.
    text = text.removesuffix(b"\n")
    return SinkMessage(path, helo, mail_from, tuple(rcpts), text)


def swaks(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run swaks with `args` (e.g. "--server", "127.0.0.1:2525", "--to", "a@b"); never raises
    on its exit status, so tests can assert on it and on the transcript in stdout."""
    binary = require_binary(SWAKS, "swaks")
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
