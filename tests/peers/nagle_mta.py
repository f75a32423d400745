"""A destination MTA with a common habit: Nagle left on, one write per reply.

Plain `socketserver` MTAs (and many small appliances) never set TCP_NODELAY and answer each
pipelined command with its own write. The second of two replies then waits in the destination's
kernel until Moxy ACKs the first: if Moxy lets its delayed ACK run (~40 ms on Linux), every
pipelined MAIL/RCPT exchange stalls. This peer keeps that habit on purpose (never "fix" it), so
the suite shows Moxy does not depend on how a destination tunes its TCP stack.
"""

from __future__ import annotations

import socketserver
import threading
from typing import Any


class _Handler(socketserver.StreamRequestHandler):
    server: NagleMta

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")  # unbuffered: one send() per reply

    def handle(self) -> None:
        self.reply("220 nagle.test ESMTP")
        in_data = False
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            if in_data:
                if line == b".\r\n":
                    in_data = False
                    with self.server.lock:
                        self.server.messages += 1
                    self.reply("250 2.0.0 Ok: queued")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.reply("250-nagle.test")
                self.reply("250-PIPELINING")
                self.reply("250 8BITMIME")
            elif verb == b"DATA":
                in_data = True
                self.reply("354 go ahead")
            elif verb == b"QUIT":
                self.reply("221 bye")
                return
            else:  # MAIL, RCPT, RSET, NOOP
                self.reply("250 2.0.0 Ok")


class NagleMta(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.messages = 0
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def __enter__(self) -> NagleMta:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
