"""The stand-in mail servers of `make cluster` (scripts/cluster.py): two recording servers for a
customer's old and new mail server, and a dark one that takes connections and never greets.
Standard library only, as cluster.py.
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from pathlib import Path

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


class DarkServer:
    """A customer's server gone dark: its port takes connections (the kernel completes them,
    up to the backlog) and nothing ever answers, so a client waits for a greeting that never
    comes."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)

    @property
    def port(self) -> int:
        return int(self.socket.getsockname()[1])

    def close(self) -> None:
        self.socket.close()
