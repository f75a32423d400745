"""SMTPUTF8 (RFC 6531), SIZE (RFC 1870) and BODY (RFC 6152) towards legs that do or do not
advertise them: an SMTPUTF8 transaction or a too-large declared size is refused at RCPT for
the legs that cannot take it, before any body is sent."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import pytest
import trio

from peers.client import READ_TIMEOUT, SmtpClient
from peers.moxy import StartMoxy
from peers.recorder import DEFAULT_EHLO_KEYWORDS, Recorder

from .helpers import BODY, split_received

MakeRecorder = Callable[..., Recorder]
WITHOUT_UTF8 = DEFAULT_EHLO_KEYWORDS
WITH_UTF8 = (*DEFAULT_EHLO_KEYWORDS, "SMTPUTF8")


def smtplib_utf8(host: str, port: int, rcpts: list[str]) -> dict[str, tuple[int, bytes]]:
    """Blocking: one SMTPUTF8 message, as smtplib sends it (UTF-8 commands after EHLO)."""
    message = "From: jöran@bücher.example\r\nSubject: grüße\r\n\r\nHallo.\r\n".encode()
    with smtplib.SMTP(host, port, "smtplib.test", timeout=READ_TIMEOUT) as smtp:
        return smtp.sendmail("jöran@bücher.example", rcpts, message,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])


async def test_smtputf8_goes_only_to_legs_that_advertise_it(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    utf8 = make_recorder(ehlo_keywords=WITH_UTF8, name="utf8")
    ascii_only = make_recorder(ehlo_keywords=WITHOUT_UTF8, name="ascii")
    server = await moxy({"example.org": utf8, "example.net": ascii_only})
    refused = await trio.to_thread.run_sync(
        smtplib_utf8, server.host, server.port, ["用户@example.org", "b@example.net"]
    )
    assert refused == {
        "b@example.net": (553, b"5.6.7 SMTPUTF8 is required, but was not offered by the "
                               b"destination"),
    }
    assert ascii_only.connections[0].commands[:1] == ["EHLO relay.moxy.test"]
    assert "MAIL" not in ascii_only.verbs()
    [message] = utf8.delivered
    assert (message.mail_from, message.rcpts) == ("jöran@bücher.example", ["用户@example.org"])
    assert "SMTPUTF8" in message.mail_params.split() and "BODY=8BITMIME" in message.mail_params
    assert message.data is not None
    assert b" with UTF8SMTP id " in split_received(message.data)[0]
    assert "Subject: grüße".encode() in message.data


async def test_declared_size_above_a_legs_limit_is_refused_at_rcpt_for_that_leg_only(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    small = make_recorder(
        ehlo_keywords=("PIPELINING", "SIZE 10000", "ENHANCEDSTATUSCODES"), name="small"
    )
    large = make_recorder(name="large")  # SIZE 209715200, 8BITMIME
    server = await moxy({"example.org": small, "example.net": large})
    async with await trio.open_tcp_stream(server.host, server.port) as stream:
        client = SmtpClient(stream)
        await client.greeting_and_ehlo()
        replies = [
            await client.command("MAIL FROM:<s@client.test> SIZE=50000 BODY=8BITMIME"),
            await client.command("RCPT TO:<a@example.org>"),
            await client.command("RCPT TO:<b@example.net>"),
            await client.command("DATA"),
        ]
        assert [(r.code, r.enhanced) for r in replies] == [
            (250, "2.1.0"), (552, "5.3.4"), (250, "2.1.5"), (354, None)
        ], client.dump()
        await client.send(BODY + b".\r\n")
        assert (await client.reply()).code == 250
    assert "MAIL" not in small.verbs()
    [message] = large.delivered
    # The size grows by the Received header Moxy adds; BODY goes only where 8BITMIME is.
    assert message.mail_params == "SIZE=51024 BODY=8BITMIME"


async def test_size_and_body_are_left_out_for_legs_without_the_extensions(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    bare = make_recorder(ehlo_keywords=("PIPELINING",))
    server = await moxy({"example.org": bare})
    async with await trio.open_tcp_stream(server.host, server.port) as stream:
        client = SmtpClient(stream)
        await client.greeting_and_ehlo()
        assert (await client.command("MAIL FROM:<s@client.test> SIZE=100 BODY=8BITMIME")).code \
            == 250
        assert (await client.command("RCPT TO:<a@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(BODY + b".\r\n")
        assert (await client.reply()).code == 250
    [message] = bare.delivered
    assert message.mail_params == ""


@pytest.mark.parametrize("where", ["body", "last line"])
async def test_8bit_data_of_an_8bitmime_message_never_reaches_a_leg_without_8bitmime(
    moxy: StartMoxy, make_recorder: MakeRecorder, where: str
) -> None:
    """RFC 6152: Moxy does not convert, so a message declared BODY=8BITMIME that does hold
    8-bit octets is refused for every leg when one leg's destination lacks 8BITMIME (it went
    as it was, and the client heard 250). A 7-bit body declared so still goes."""
    bare = make_recorder(ehlo_keywords=("PIPELINING",), name="bare")
    full = make_recorder(name="full")
    server = await moxy({"example.org": [bare, full]})
    big = b"".join(b"line %05d of plain text, longer than Moxy gathers\r\n" % i
                   for i in range(500))
    eight_bit = (b"Subject: x\r\n\r\n" + big + "Grüße\r\n".encode()) if where == "body" \
        else (b"Subject: x\r\n\r\n" + "Grüße\r\n".encode())
    for body, expected in ((BODY, (250, None)), (eight_bit, (554, "5.6.3"))):
        async with await trio.open_tcp_stream(server.host, server.port) as stream:
            client = SmtpClient(stream)
            await client.greeting_and_ehlo()
            assert (await client.command("MAIL FROM:<s@client.test> BODY=8BITMIME")).code == 250
            assert (await client.command("RCPT TO:<a@example.org>")).code == 250
            assert (await client.command("DATA")).code == 354
            await client.send(body + b".\r\n")
            final = await client.reply()
            assert final.code == expected[0], client.dump()
            if expected[1] is not None:
                assert final.enhanced == expected[1], client.dump()
    assert len(bare.delivered) == 1 and len(full.delivered) == 1  # the 7-bit one only


async def test_an_internationalized_domain_is_routed_by_either_spelling(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """A route keyed by the A-label takes SMTPUTF8 mail to the UTF-8 spelling, and a route
    written in UTF-8 takes mail to the A-label: routes hold A-labels (lookup/idn.py). Each
    address goes upstream as the client wrote it."""
    books = make_recorder(ehlo_keywords=WITH_UTF8, name="books")
    pupils = make_recorder(ehlo_keywords=WITH_UTF8, name="pupils")
    server = await moxy({"xn--bcher-kva.example": books, "schüler.example": pupils})
    refused = await trio.to_thread.run_sync(
        smtplib_utf8, server.host, server.port, ["leser@Bücher.example"]
    )
    assert refused == {}
    [message] = books.delivered
    assert message.rcpts == ["leser@Bücher.example"]
    async with await trio.open_tcp_stream(server.host, server.port) as stream:
        client = SmtpClient(stream)
        await client.greeting_and_ehlo()
        replies = [
            await client.command("MAIL FROM:<s@client.test>"),
            await client.command("RCPT TO:<kind@xn--schler-5ya.example>"),
            await client.command("DATA"),
        ]
        assert [r.code for r in replies] == [250, 250, 354], client.dump()
        await client.send(BODY + b".\r\n")
        assert (await client.reply()).code == 250
    [message] = pupils.delivered
    assert message.rcpts == ["kind@xn--schler-5ya.example"]
