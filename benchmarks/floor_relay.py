#!/usr/bin/env python3
"""The trio floor: the least a correct SMTP relay on trio does per message, to measure Moxy
against on the same machine (issue 13's "what trio can do").

One destination, no routing, no limits, no log, no accounting: the greeting, EHLO, MAIL
answered at once and sent upstream with the first RCPT (pipelined), each RCPT's and DATA's
answer the destination's (a refused MAIL answers every RCPT), a `Received:` header (RFC 5321
§4.4) and the body streamed chunk by chunk to the end-of-data sequence (CRLF.CRLF, found
across chunk boundaries too) and the destination's verdict passed back. It
uses what issue 13 lists as trio's cheapest ways: plain non-blocking sockets read and written
directly (`trio.lowlevel.wait_readable` only when the kernel has nothing), a read that yields
once before it tries the socket, one cancel scope per session whose deadline is re-armed only
before a wait, an upstream pool (`--pool`, RSET sent in the same write as the next MAIL and
RCPT when a transaction was abandoned), and QUIT sent upstream without waiting for its reply.

It is correct for what the benchmark and its test send: dot-stuffed bodies pass unchanged,
pipelined commands, RSET, refused recipients and DATA, a client gone mid-body (its upstream
connection is closed, never pooled: the destination gets no message). It is no mail server:
it does not check bare CR or LF, sizes or addresses (Moxy does; tests/test_floor_relay.py),
and an unreachable destination closes the client's connection instead of a 4xx.

    .venv/bin/python benchmarks/floor_relay.py --listen 127.0.0.1:2525 --to 127.0.0.1:2526 \
        [--pool 20] [--timeout 300]
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import errno
import socket
import time

import trio

CHUNK = 65536
LONGEST_LINE = 4096
EHLO = b"250-floor\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"
END = b"\r\n.\r\n"


class Gone(Exception):
    """The peer closed, reset, sent a line too long, or the deadline passed."""


class Refused(Exception):
    """The destination refused MAIL: its reply answers every RCPT of the transaction."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply


class Conn:
    """A non-blocking socket with a read buffer; its waits re-arm the session's one deadline."""

    __slots__ = ("buf", "dirty", "scope", "sock", "timeout")

    def __init__(self, sock: socket.socket, scope: trio.CancelScope, timeout: float) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray()
        self.scope = scope
        self.timeout = timeout
        self.dirty = False  # an upstream holding an abandoned transaction: RSET first

    async def recv(self) -> bytes:
        await trio.lowlevel.cancel_shielded_checkpoint()  # the answer has often come by then
        while True:
            try:
                data = self.sock.recv(CHUNK)
            except BlockingIOError:
                self.scope.deadline = trio.current_time() + self.timeout
                await trio.lowlevel.wait_readable(self.sock)
                continue
            except OSError as exc:
                raise Gone from exc
            if not data:
                raise Gone
            return data

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while True:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise Gone from exc
            if not view:
                return
            self.scope.deadline = trio.current_time() + self.timeout
            await trio.lowlevel.wait_writable(self.sock)

    async def line(self) -> bytes:
        buf = self.buf
        while True:
            end = buf.find(b"\n")
            if end >= 0:
                line = bytes(buf[: end + 1])
                del buf[: end + 1]
                return line
            if len(buf) > LONGEST_LINE:
                raise Gone
            buf += await self.recv()

    async def reply(self) -> bytes:
        """One reply, all of its lines."""
        lines = []
        while True:
            line = await self.line()
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def close(self) -> None:
        self.sock.close()


class Relay:
    def __init__(self, destination: tuple[str, int], pool: int, timeout: float) -> None:
        self.destination = destination
        self.pool_size = pool
        self.timeout = timeout
        self.idle: list[Conn] = []

    async def connect(self, scope: trio.CancelScope) -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = Conn(sock, scope, self.timeout)
        error = sock.connect_ex(self.destination)
        if error == errno.EINPROGRESS:
            scope.deadline = trio.current_time() + self.timeout
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            sock.close()
            raise Gone
        try:
            if not (await up.reply()).startswith(b"220"):
                raise Gone
            await up.send(b"EHLO floor\r\n")
            if not (await up.reply()).startswith(b"250"):
                raise Gone
        except Gone:
            up.close()
            raise
        return up

    async def begin(self, scope: trio.CancelScope, mail: bytes, rcpt: bytes,
                    held: list[Conn]) -> tuple[Conn, bytes]:
        """An upstream connection (put in `held`) with MAIL and the first RCPT sent in one
        write: (it, the reply to pass back to the client). A pooled connection that fails is
        replaced once."""
        while self.idle:
            up = self.idle.pop()
            up.scope = scope
            held.append(up)
            try:
                return up, await self._mail_rcpt(up, mail, rcpt)
            except Gone:
                held.pop()
                up.close()
        up = await self.connect(scope)
        held.append(up)
        return up, await self._mail_rcpt(up, mail, rcpt)

    async def _mail_rcpt(self, up: Conn, mail: bytes, rcpt: bytes) -> bytes:
        """The reply for the client's RCPT: the destination's, or its refusal of MAIL
        (raised as Refused, for every later RCPT of the transaction too)."""
        reset = up.dirty
        await up.send(b"RSET\r\n" + mail + rcpt if reset else mail + rcpt)
        if reset:
            await up.reply()
            up.dirty = False
        mail_reply = await up.reply()
        rcpt_reply = await up.reply()
        if not mail_reply.startswith(b"2"):
            up.dirty = True
            raise Refused(mail_reply)
        return rcpt_reply

    def release(self, up: Conn) -> None:
        """The session is over: back to the pool, or QUIT without waiting for its reply."""
        if len(self.idle) < self.pool_size:
            self.idle.append(up)
            return
        with contextlib.suppress(OSError):
            up.sock.send(b"QUIT\r\n")
        up.close()

    async def session(self, sock: socket.socket, ip: str) -> None:
        held: list[Conn] = []  # the session's upstream connection, once it has one
        clean = False
        with trio.CancelScope() as scope:
            client = Conn(sock, scope, self.timeout)
            try:
                clean = await self._serve(client, scope, held, ip)
            except Gone:
                pass
            finally:
                client.close()
        if held:  # pooled if it sits between transactions, else closed
            if clean:
                self.release(held[0])
            else:
                held[0].close()

    async def _serve(self, client: Conn, scope: trio.CancelScope, held: list[Conn],
                     ip: str) -> bool:
        """The session's dialogue, until QUIT or Gone (a client gone, or an upstream
        connection that failed: the client's connection is closed then). True when the
        upstream connection in `held` sits between transactions."""
        up: Conn | None = None
        mail = b""
        accepted = 0
        asked = False  # MAIL went upstream in this transaction
        refused = b""  # the destination's refusal of this transaction's MAIL
        helo = b"unknown"
        await client.send(b"220 floor ESMTP\r\n")
        try:
            while True:
                line = await client.line()
                verb = line[:4].upper()
                if verb == b"MAIL":
                    if mail:
                        await client.send(b"503 5.5.1 Nested MAIL\r\n")
                        continue
                    mail = line
                    await client.send(b"250 2.1.0 Ok\r\n")
                elif verb == b"RCPT":
                    if not mail:
                        await client.send(b"503 5.5.1 MAIL first\r\n")
                        continue
                    try:
                        if refused:
                            raise Refused(refused)
                        if up is None:
                            up, answer = await self.begin(scope, mail, line, held)
                        elif not asked:  # the first RCPT of a later transaction
                            answer = await self._mail_rcpt(up, mail, line)
                        else:
                            await up.send(line)
                            answer = await up.reply()
                    except Refused as exc:
                        answer = refused = exc.reply
                    up = held[0] if held else None
                    asked = True
                    accepted += answer.startswith(b"2")
                    await client.send(answer)
                elif verb == b"DATA":
                    if up is None or not accepted:
                        await client.send(b"554 5.5.1 No valid recipients\r\n")
                        continue
                    await up.send(b"DATA\r\n")
                    answer = await up.reply()
                    if answer.startswith(b"354"):
                        await client.send(answer)
                        await self._body(client, up, received(helo, ip))
                        answer = await up.reply()
                    else:
                        up.dirty = True
                    mail, accepted, asked, refused = b"", 0, False, b""
                    await client.send(answer)
                elif verb == b"RSET":
                    if mail and up is not None:
                        up.dirty = True
                    mail, accepted, asked, refused = b"", 0, False, b""
                    await client.send(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    await client.send(b"221 2.0.0 Bye\r\n")
                    break
                elif verb in (b"EHLO", b"HELO"):
                    if mail and up is not None:
                        up.dirty = True
                    mail, accepted, asked, refused = b"", 0, False, b""
                    helo = line[5:].strip() or helo
                    await client.send(EHLO if verb == b"EHLO" else b"250 floor\r\n")
                elif verb == b"NOOP":
                    await client.send(b"250 2.0.0 Ok\r\n")
                else:
                    await client.send(b"502 5.5.2 Not implemented\r\n")
        except Gone:
            return not mail  # a client gone between transactions leaves a clean upstream
        if up is not None and mail:
            up.dirty = True
        return True

    async def _body(self, client: Conn, up: Conn, header: bytes) -> None:
        """`header`, then from after the 354 to the end-of-data sequence included, chunk by
        chunk; what the client pipelined after it stays in its buffer."""
        tail = b"\r\n"  # the DATA line's end: "." on the first line ends an empty message
        first = header
        while True:
            if client.buf:
                data = bytes(client.buf)
                client.buf.clear()
            else:
                data = await client.recv()
            joint = (tail + data[:4]).find(END)
            if joint >= 0:
                end = joint + len(END) - len(tail)
            else:
                end = data.find(END)
                if end >= 0:
                    end += len(END)
            if end >= 0:
                client.buf += data[end:]
                await up.send(first + data[:end] if first else data[:end])
                return
            await up.send(first + data if first else data)
            first = b""
            tail = (tail + data)[-4:] if len(data) < 4 else data[-4:]


async def serve(listen: tuple[str, int], relay: Relay, *, task_status: trio.TaskStatus[int]
                = trio.TASK_STATUS_IGNORED) -> None:
    """Accept and relay until cancelled; `task_status` gets the port (`listen`'s may be 0)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(listen)
    listener.listen(1024)
    listener.setblocking(False)
    task_status.started(listener.getsockname()[1])
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(relay.session, sock, address[0])


_date: list[object] = [0, b""]  # the second, and its RFC 5322 date


def received(helo: bytes, ip: str) -> bytes:
    """The trace header RFC 5321 §4.4 asks a relay to add (Moxy's has more in it)."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, email.utils.formatdate(now).encode()
    return (b"Received: from %s ([%s])\r\n\tby floor with ESMTP; %s\r\n"
            % (helo, ip.encode(), _date[1]))


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT")
    parser.add_argument("--to", type=_address, required=True, help="the destination HOST:PORT")
    parser.add_argument("--pool", type=int, default=20, help="idle upstream connections kept")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per wait")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.listen, Relay(args.to, args.pool, args.timeout))


if __name__ == "__main__":
    main()
