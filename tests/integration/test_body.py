"""The message body: only CRLF.CRLF ends it, bare line endings are refused or normalised so no
smuggled second message can reach a destination, and the size limit holds."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import trio

from peers.client import ServerReply, SmtpClient
from peers.moxy import StartMoxy
from peers.recorder import Recorder

from .helpers import BODY, SENDER, body_of, open_session, send_one

MakeRecorder = Callable[..., Recorder]

ATTACKER, VICTIM = "attacker@evil.test", "victim@example.org"


def smuggling_body(separator: bytes) -> bytes:
    """A body whose first "message" ends with `separator` (e.g. LF . LF) and is followed by a
    whole second SMTP transaction, as in the SMTP smuggling attacks of 2023."""
    return (
        b"From: <sender@client.test>\r\n"
        b"Subject: smuggling\r\n"
        b"\r\n"
        b"Hello" + separator + b"MAIL FROM:<" + ATTACKER.encode() + b">\r\n"
        b"RCPT TO:<" + VICTIM.encode() + b">\r\n"
        b"DATA\r\n"
        b"From: <ceo@example.org>\r\n"
        b"Subject: smuggled\r\n"
        b"\r\n"
        b"smuggled\r\n"
    )


SEPARATORS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r"]


async def rest_of_session(client: SmtpClient) -> list[ServerReply]:
    """QUIT, then every reply still to come, up to the close."""
    await client.send(b"QUIT\r\n")
    replies = []
    while True:
        reply = await client.reply()
        replies.append(reply)
        if reply.code == 221:
            return replies


@pytest.mark.parametrize("separator", SEPARATORS, ids=repr)
async def test_smuggling_attempt_is_refused_and_reaches_no_upstream(
    moxy: StartMoxy, make_recorder: MakeRecorder, separator: bytes
) -> None:
    # A lenient upstream: it would end DATA at a bare-LF dot line, as vulnerable servers do.
    upstream = make_recorder(lenient_end_of_data=True)
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(smuggling_body(separator) + b".\r\n")
        final = await client.reply()
        assert final.code == 550, client.dump()
        assert final.enhanced is not None and final.enhanced.startswith("5.5."), client.dump()
        # Moxy itself must not have run the smuggled commands: the next reply is QUIT's.
        assert [r.code for r in await rest_of_session(client)] == [221], client.dump()
    await eventually_all_closed(upstream)
    assert upstream.messages == []
    assert not any(ATTACKER in c for c in upstream.commands()), upstream.commands()


async def test_after_a_refused_body_the_session_can_send_a_clean_message(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder(lenient_end_of_data=True)
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        _, final = await client.send_message(SENDER, ["user@example.org"], b"bare\nLF\r\n")
        assert final is not None and final.code == 550, client.dump()
        _, final = await client.send_message(SENDER, ["user@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    [message] = upstream.messages
    assert body_of(message) == BODY


@pytest.mark.parametrize("separator", SEPARATORS, ids=repr)
async def test_normalised_smuggling_attempt_arrives_as_one_crlf_message(
    moxy: StartMoxy, make_recorder: MakeRecorder, separator: bytes
) -> None:
    upstream = make_recorder(lenient_end_of_data=True)
    # Without the pool, the upstream session ends with the client's: all it got is recorded.
    server = await moxy(
        {"example.org": upstream}, proxy={"bare_newlines": "normalise"},
        limits={"idle_upstreams": 0},
    )
    outcome = await send_one(server, ["user@example.org"], smuggling_body(separator))
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    await eventually_all_closed(upstream)
    [message] = upstream.messages  # exactly one, even at an upstream that ends DATA at LF.LF
    assert message.rcpts == ["user@example.org"]
    delivered = body_of(message)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", delivered) is None, delivered
    # The lone dot became a line of its own, which must be dot-stuffed to stay content.
    assert delivered == smuggling_body(b"\r\n..\r\n")


async def test_bare_cr_inside_a_line_is_refused_by_default(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@example.org"], b"Subject: cr\r\n\r\na\rb\r\n")
    assert outcome.final is not None and outcome.final.code == 550, outcome.transcript
    await eventually_all_closed(upstream)
    assert upstream.messages == []


async def test_message_larger_than_the_limit_is_552_and_not_delivered(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"message_size": 10_000})
    big = b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n" * 1 + (b"z" * 98 + b"\r\n") * 300
    outcome = await send_one(server, ["user@example.org"], big)
    assert outcome.final is not None and outcome.final.code == 552, outcome.transcript
    await eventually_all_closed(upstream)
    assert upstream.messages == []


async def test_declared_size_over_the_limit_is_552_at_mail(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"message_size": 10_000})
    async with await open_session(server) as client:
        ehlo = await client.command("EHLO client.test")
        assert "SIZE 10000" in ehlo.lines, client.dump()
        reply = await client.command(f"MAIL FROM:<{SENDER}> SIZE=20000")
        assert reply.code == 552, client.dump()
    assert upstream.connections == []


async def eventually_all_closed(upstream: Recorder) -> None:
    """Wait until every connection Moxy opened to `upstream` has ended (QUIT or drop)."""

    def all_closed() -> None:
        upstream.wait_for(
            lambda: all(c.closed.is_set() for c in upstream.connections), what="legs to close"
        )

    await trio.to_thread.run_sync(all_closed)
