"""Whatever a client sends, a session never ends in a traceback: seeded random sessions of
valid, invalid and garbage input, pipelined, cut off at random, through a real Moxy to a real
smtp-sink. Every session must end with Moxy still answering and nothing logged as a failure."""

from __future__ import annotations

import logging
import random

import pytest
import trio

from peers.moxy import StartMoxy
from peers.sink import SmtpSink

PIECES = [
    b"EHLO x\r\n", b"HELO y\r\n", b"MAIL FROM:<a@b.test>\r\n", b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<a@b.test> SIZE=999999999\r\n", b"MAIL FROM:<a@b.test> BODY=8BITMIME\r\n",
    b"RCPT TO:<u@example.org>\r\n", b"RCPT TO:<v@unrouted.test>\r\n", b"RCPT TO:<postmaster>\r\n",
    b"RCPT TO:<@a,@b:x@example.org>\r\n", b"DATA\r\n", b"hello\r\n", b"bare\nlf\r\n", b".\r\n",
    b"\r\n.\r\n", b"..dot\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n",
    b"BDAT 10\r\n", b"STARTTLS\r\n", b"\x00\xff\xfe\r\n", b"A" * 600 + b"\r\n", b"\n.\n",
    b"QUIT\r\n", b"x" * 3000, b"\r", b"\n",
]
START = b"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"


def session_input(rng: random.Random) -> bytes:
    data = b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))
    kind = rng.random()
    if kind < 0.3:
        return rng.randbytes(rng.randint(0, 200)) + data
    if kind < 0.8:
        return START + data
    return data


async def one_session(host: str, port: int, data: bytes, cut: bool) -> None:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        with trio.move_on_after(2):
            await stream.receive_some(1000)
            await stream.send_all(data)
            if cut:
                return
            with trio.move_on_after(0.2):
                while await stream.receive_some(65536):
                    pass


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_sessions_never_crash_a_session(
    moxy: StartMoxy, smtp_sink: SmtpSink, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    server = await moxy(
        {"example.org": smtp_sink.address},
        limits={"message_size": 100_000, "recipients": 5, "errors": 50},
        timeouts={"client_command": 1.0, "client_data": 1.0},
    )
    rng = random.Random(seed)
    with caplog.at_level(logging.ERROR, logger="moxy"):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(
                    one_session, server.host, server.port, session_input(rng), rng.random() < 0.3
                )
        # Still serving: a clean session works after all that.
        stream = await trio.open_tcp_stream(server.host, server.port)
        async with stream:
            assert (await stream.receive_some(1000)).startswith(b"220 ")
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert failures == [], [r.getMessage() for r in failures]
