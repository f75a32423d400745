#!/usr/bin/env python3
"""A tiny SMTP server for the README tour: accepts every message and prints it.

Stands in for a customer's mail server behind Moxy. Standard library only.
Usage: python3 examples/sink.py [PORT]   (default 2526, on 127.0.0.1)
"""

from __future__ import annotations

import socketserver
import sys


class Handler(socketserver.StreamRequestHandler):
    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        self.reply("220 sink.example ESMTP tour sink")
        envelope: list[str] = []
        while line := self.rfile.readline(4096):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250 sink.example")
            elif verb in (b"MAIL", b"RCPT"):
                envelope.append(line.decode(errors="replace").strip())
                self.reply("250 2.0.0 Ok")
            elif verb == b"DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                body = []
                while (data := self.rfile.readline(1 << 20)) not in (b".\r\n", b""):
                    body.append(data.decode(errors="replace"))
                print("=" * 60, *envelope, "-" * 60, "".join(body).rstrip(), sep="\n")
                sys.stdout.flush()
                envelope.clear()
                self.reply("250 2.0.0 Ok: printed")
            elif verb == b"RSET":
                envelope.clear()
                self.reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("250 2.0.0 Ok")


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 2526
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler) as server:
        print(f"tour sink listening on 127.0.0.1:{port}", flush=True)
        server.serve_forever()
