"""A raw SMTP client on trio streams: for what smtplib cannot do in tests.

smtplib waits for each reply and rewrites message bytes; tests of pipelining, of exact wire
bytes (dot-stuffing, bare LF), and of clients that vanish or stall mid-DATA need to write bytes
exactly when and as they choose. Every read has a deadline so a hung server fails the test
instead of hanging it.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterable, Sequence

import attrs
import trio

READ_TIMEOUT = 15.0


@attrs.frozen
class ServerReply:
    code: int
    lines: tuple[str, ...]  # text after the code and separator, one per reply line

    @property
    def klass(self) -> int:
        return self.code // 100

    @property
    def enhanced(self) -> str | None:
        first = self.lines[0].split(" ", 1)[0] if self.lines and self.lines[0] else ""
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return first
        return None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return " / ".join(f"{self.code} {line}" for line in self.lines)


class ConnectionLost(Exception):
    """The server closed the connection while a reply was expected."""


class SmtpClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()
        self.transcript: list[str] = []  # "C: ..." / "S: ..." lines, for failure messages

    @classmethod
    async def connect(cls, host: str, port: int) -> SmtpClient:
        with trio.fail_after(READ_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        return cls(stream)

    async def __aenter__(self) -> SmtpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        """After a 220 to STARTTLS: the handshake; bytes still unread are dropped, as a
        careful client does."""
        self._buffer.clear()
        stream = trio.SSLStream(self.stream, context, server_hostname=server_hostname)
        with trio.fail_after(READ_TIMEOUT):
            await stream.do_handshake()
        self.stream = stream
        self.transcript.append(f"-- TLS {stream.version()} --")

    async def send(self, data: bytes) -> None:
        self.transcript.append(f"C: {data[:200]!r}{'...' if len(data) > 200 else ''}")
        await self.stream.send_all(data)

    async def _read_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return line
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise ConnectionLost(f"connection closed; transcript so far:\n{self.dump()}")
            self._buffer += chunk

    async def reply(self, timeout: float = READ_TIMEOUT) -> ServerReply:
        """Read one (possibly multi-line) reply."""
        lines: list[str] = []
        with trio.fail_after(timeout):
            while True:
                raw = (await self._read_line()).decode("utf-8", "replace")
                self.transcript.append(f"S: {raw}")
                code, sep, text = raw[:3], raw[3:4], raw[4:]
                if not code.isdigit() or sep not in ("-", " ", ""):
                    raise AssertionError(f"malformed reply line {raw!r}\n{self.dump()}")
                lines.append(text)
                if sep != "-":
                    return ServerReply(int(code), tuple(lines))

    async def replies(self, count: int, timeout: float = READ_TIMEOUT) -> list[ServerReply]:
        return [await self.reply(timeout) for _ in range(count)]

    async def command(self, line: str, timeout: float = READ_TIMEOUT) -> ServerReply:
        await self.send(line.encode() + b"\r\n")
        return await self.reply(timeout)

    async def greeting_and_ehlo(self, name: str = "client.test") -> ServerReply:
        greeting = await self.reply()
        assert greeting.code == 220, self.dump()
        ehlo = await self.command(f"EHLO {name}")
        assert ehlo.code == 250, self.dump()
        return ehlo

    async def expect_closed(self, timeout: float = READ_TIMEOUT) -> bytes:
        """Read until the server closes; return whatever it still sent."""
        rest = bytearray(self._buffer)
        self._buffer.clear()
        with trio.fail_after(timeout):
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                rest += chunk
        return bytes(rest)

    async def send_message(
        self, mail_from: str, rcpts: Sequence[str], wire_body: bytes
    ) -> tuple[list[ServerReply], ServerReply | None]:
        """MAIL, RCPT..., DATA one at a time, then `wire_body` (already dot-stuffed, ending in
        CRLF) and ".". Returns the envelope replies and the final reply (None if DATA was not
        answered 354)."""
        envelope = [await self.command(f"MAIL FROM:<{mail_from}>")]
        for rcpt in rcpts:
            envelope.append(await self.command(f"RCPT TO:<{rcpt}>"))
        data = await self.command("DATA")
        envelope.append(data)
        if data.code != 354:
            return envelope, None
        await self.send(wire_body + b".\r\n")
        return envelope, await self.reply()

    async def send_chunks(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            await self.stream.send_all(chunk)

    def dump(self) -> str:
        return "\n".join(self.transcript[-60:])


def stuff(text: bytes) -> bytes:
    """Dot-stuff CRLF text for the wire (RFC 5321 §4.5.2) and make sure it ends in CRLF."""
    if not text.endswith(b"\r\n"):
        text += b"\r\n"
    lines = text.split(b"\r\n")
    return b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)


def smtplib_send(
    host: str, port: int, mail_from: str, rcpts: Sequence[str], message: bytes
) -> dict[str, tuple[int, bytes]]:
    """Blocking: send one message with smtplib (call through trio.to_thread.run_sync).

    Returns smtplib's dict of refused recipients; raises smtplib's exceptions otherwise."""
    with smtplib.SMTP(host, port, local_hostname="smtplib.test", timeout=READ_TIMEOUT) as smtp:
        return smtp.sendmail(mail_from, list(rcpts), message)
