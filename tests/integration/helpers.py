"""What the end-to-end tests share: a standard message, talking to Moxy, reading what arrived."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Sequence

import attrs

from peers.client import ServerReply, SmtpClient
from peers.moxy import RunningMoxy
from peers.recorder import Message

SENDER = "sender@client.test"
CLIENT_HELO = "client.test"
HOSTNAME = "mx.moxy.test"  # [server] hostname in the suite's default config
UPSTREAM_HELO = "relay.moxy.test"  # [proxy] helo_name in the suite's default config

# Already in wire form: CRLF line endings, the ".leading" line dot-stuffed.
BODY = (
    b"From: <sender@client.test>\r\n"
    b"To: <user@example.org>\r\n"
    b"Subject: moxy integration test\r\n"
    b"\r\n"
    b"Hello.\r\n"
    b"..leading dot, stuffed on the wire\r\n"
    b"Last line.\r\n"
)

# Timeouts for fault tests: a stage that hangs costs half a second.
FAST_TIMEOUTS = {
    "upstream_connect": 0.5,
    "upstream_greeting": 0.5,
    "upstream_command": 0.5,
    "upstream_mail": 0.5,
    "upstream_rcpt": 0.5,
    "upstream_data_init": 0.5,
    "upstream_data_block": 0.5,
    "upstream_data_end": 0.5,
}


async def open_session(moxy: RunningMoxy | tuple[str, int], helo: str = CLIENT_HELO) -> SmtpClient:
    """Connect, read the greeting, EHLO."""
    host, port = (moxy.host, moxy.port) if isinstance(moxy, RunningMoxy) else moxy
    client = await SmtpClient.connect(host, port)
    await client.greeting_and_ehlo(helo)
    return client


@attrs.frozen
class Outcome:
    envelope: list[ServerReply]  # MAIL, each RCPT, DATA
    final: ServerReply | None  # None when DATA was not answered 354
    transcript: str

    @property
    def rcpt(self) -> list[ServerReply]:
        return self.envelope[1:-1]


async def send_one(
    moxy: RunningMoxy | tuple[str, int],
    rcpts: Sequence[str],
    body: bytes = BODY,
    mail_from: str = SENDER,
) -> Outcome:
    """One message in its own session, command by command, then QUIT."""
    async with await open_session(moxy) as client:
        envelope, final = await client.send_message(mail_from, rcpts, body)
        if final is None:
            await client.command("RSET")
        await client.command("QUIT")
        return Outcome(envelope, final, client.dump())


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """Moxy's Received header (all its folded lines) and everything after it."""
    assert data.startswith(b"Received: "), f"message does not start with Received: {data[:200]!r}"
    pos = 0
    while True:
        end = data.index(b"\r\n", pos) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]
        pos = end


_RECEIVED_RE = re.compile(
    rb"Received: from (?P<helo>\S+) .*?\bby (?P<by>\S+) .*?\bid (?P<id>[^\s;]+).*?;"
    rb"\s*(?P<date>[^\r\n]+)\r\n$",
    re.S,
)


def check_received(header: bytes, helo: str = CLIENT_HELO, hostname: str = HOSTNAME) -> str:
    """Assert the shape of Moxy's trace header; return its id."""
    match = _RECEIVED_RE.match(header)
    assert match is not None, f"unexpected Received header {header!r}"
    assert match["helo"].decode() == helo, header
    assert match["by"].decode() == hostname, header
    # RFC 5322's date with a zone, and about now (a test's message is a few seconds old).
    when = email.utils.parsedate_to_datetime(match["date"].decode())
    assert when.tzinfo is not None, header
    assert abs(time.time() - when.timestamp()) < 300, header
    return match["id"].decode()


def body_of(message: Message) -> bytes:
    """What the client sent, as it arrived upstream after Moxy's Received header."""
    assert message.data is not None
    return split_received(message.data)[1]
