"""Destinations that say more than they are asked, or answer what cannot be an answer.

A reply that arrives before the command it would answer must never be taken for that answer:
an early "250" after the 354 would otherwise be the client's verdict on a message the
destination then refuses (a lost message), and an extra reply would answer every later command
of the session one step late. And a reply code that cannot answer a command (a 334 to DATA)
must not reach the client, which would take it as an invitation to send a body. Each fails the
leg: 451 for the message, and no end-of-data sequence to any destination.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import pytest
import trio

from peers.client import SmtpClient
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import DISCONNECT, Late, Recorder, Step, delay
from peers.tls import TlsFiles
from peers.waiting import eventually

from .helpers import BODY, FAST_TIMEOUTS, SENDER, body_of, open_session, send_one

MakeRecorder = Callable[..., Recorder]

BIG = b"".join(b"line %05d of a body longer than Moxy gathers before it writes\r\n" % i
               for i in range(600))  # about 38 KB: written to the legs before the end of data


async def big_message_with_a_pause(server: RunningMoxy, rcpt: str) -> tuple[int, str]:
    """MAIL, RCPT, DATA, most of a large body, a pause in which the destination may speak,
    then the end of data: the final reply's code and enhanced code."""
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command(f"RCPT TO:<{rcpt}>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: big\r\n\r\n" + BIG)
        await trio.sleep(0.3)
        await client.send(b".\r\n")
        final = await client.reply()
        await client.command("QUIT")
        return final.code, final.enhanced or ""


async def test_an_early_250_after_the_354_in_the_same_segment_is_not_the_verdict(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    liar = make_recorder({"data": "354 go\r\n250 2.0.0 early accept",
                          "end_of_data": "550 5.7.1 refused after all"}, name="liar")
    server = await moxy({"example.org": liar}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    [data] = outcome.envelope[-1:]
    assert (data.code, data.enhanced) == (451, "4.4.2"), outcome.transcript
    assert outcome.final is None
    assert not liar.messages  # no end-of-data sequence went out


@pytest.fixture(params=[False, True], ids=["plain", "tls"])
def starttls(request: pytest.FixtureRequest, tls_files: TlsFiles) -> ssl.SSLContext | None:
    """Destinations in clear text, or offering STARTTLS (which Moxy then uses: the default
    `[tls] upstream` is opportunistic), where what a peer sent cannot be read without a read
    that may wait."""
    if not request.param:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    return context


@pytest.mark.parametrize(
    "misbehaviour",
    [
        # Its own early "250" mid-body, and a refusal at the end of data.
        {"body": "250 2.0.0 early accept", "end_of_data": "550 5.7.1 refused after all"},
        # A close once the body has begun (no 'destinations disagreed' any more).
        {"body": DISCONNECT},
    ],
    ids=["speaks", "closes"],
)
async def test_a_leg_that_speaks_or_closes_during_the_body_fails_every_leg_before_any_commits(
    moxy: StartMoxy, make_recorder: MakeRecorder, misbehaviour: dict[str, Step],
    starttls: ssl.SSLContext | None,
) -> None:
    """A mirror route whose second destination misbehaves during the body while the other is
    fine: known before the end of data, so neither gets it, and the client hears 451 4.4.2.
    (Over TLS the early "250" was the verdict, the "550" unread: a lost message.)"""
    odd = make_recorder(misbehaviour, name="odd", starttls=starttls)
    honest = make_recorder(name="honest", starttls=starttls)
    server = await moxy({"example.org": [honest, odd]}, timeouts=FAST_TIMEOUTS)
    assert await big_message_with_a_pause(server, "user@example.org") == (451, "4.4.2")
    assert not odd.messages and not honest.messages
    assert [bool(c.tls) for c in odd.connections] == [starttls is not None]


async def test_a_lone_leg_that_speaks_during_the_body_is_not_believed(
    moxy: StartMoxy, make_recorder: MakeRecorder, starttls: ssl.SSLContext | None
) -> None:
    liar = make_recorder({"body": "250 2.0.0 early accept",
                          "end_of_data": "550 5.7.1 refused after all"},
                         name="liar", starttls=starttls)
    server = await moxy({"example.org": liar}, timeouts=FAST_TIMEOUTS)
    assert await big_message_with_a_pause(server, "user@example.org") == (451, "4.4.2")
    assert not liar.messages


async def test_a_pooled_connection_the_destination_spoke_on_while_idle_is_not_reused(
    moxy: StartMoxy, make_recorder: MakeRecorder, starttls: ssl.SSLContext | None
) -> None:
    """A second verdict, late, after the connection went back to the pool: it answered the
    next session's MAIL (a sender refused for good by a reply meant for another message)."""
    late = make_recorder({"end_of_data": [Late("250 2.0.0 Ok", "550 5.7.1 late"),
                                          "250 2.0.0 Ok"]},
                         name="late", starttls=starttls)
    server = await moxy({"example.org": late}, timeouts=FAST_TIMEOUTS,
                        limits={"idle_upstreams": 4})
    first = await send_one(server, ["user@example.org"])
    assert first.final is not None and first.final.code == 250, first.transcript
    await trio.sleep(0.5)  # the late "550" (0.2 s after the verdict) is at Moxy's idle end
    second = await send_one(server, ["user@example.org"])
    assert second.final is not None and second.final.code == 250, second.transcript
    assert len(late.messages) == 2
    assert len(late.connections) == 2  # the one that spoke was not taken again


@pytest.mark.parametrize("destination", ["no pipelining", "pipelining, slow RCPT"])
async def test_a_kept_connection_the_destination_spoke_on_is_not_used_again(
    moxy: StartMoxy, make_recorder: MakeRecorder, destination: str
) -> None:
    """The same late verdict on the connection a session keeps for its next message: it
    answered that message's MAIL, and the client heard a 550 for a good recipient."""
    options: dict[str, Any] = (
        {"ehlo_keywords": ("8BITMIME", "ENHANCEDSTATUSCODES")} if destination == "no pipelining"
        else {}
    )
    script: dict[str, Any] = {"end_of_data": [Late("250 2.0.0 Ok", "550 5.7.1 late"),
                                              "250 2.0.0 Ok"]}
    if destination != "no pipelining":
        script["rcpt"] = delay(0.1, "250 2.1.5 Ok")
    late = make_recorder(script, name="late", **options)
    server = await moxy({"example.org": late}, timeouts=FAST_TIMEOUTS)
    client = await open_session(server)
    for _ in range(2):
        _, final = await client.send_message(SENDER, ["user@example.org"], b"x\r\n")
        assert final is not None and final.code == 250, client.dump()
        await trio.sleep(0.5)  # the late "550" (0.2 s after the verdict) is at Moxy by now
    assert len(late.delivered) == 2
    assert len(late.connections) == 2  # the one that spoke was not used again


async def test_a_quiet_destination_still_gets_a_large_message(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """The same pause with well-behaved destinations: both get the message and the 250."""
    first, second = make_recorder(name="first"), make_recorder(name="second")
    server = await moxy({"example.org": [first, second]}, timeouts=FAST_TIMEOUTS)
    code, _ = await big_message_with_a_pause(server, "user@example.org")
    assert code == 250
    for recorder in (first, second):
        [message] = recorder.messages
        assert body_of(message).endswith(BIG)


async def test_an_extra_reply_to_rcpt_is_not_the_answer_to_data(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    chatty = make_recorder({"rcpt": ["250 2.1.5 ok\r\n250 2.1.5 extra"]}, name="chatty")
    server = await moxy({"example.org": chatty}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    [rcpt] = outcome.rcpt
    assert (rcpt.code, rcpt.enhanced) == (451, "4.4.2"), outcome.transcript
    assert not chatty.messages


async def test_two_replies_to_the_end_of_data_do_not_answer_the_next_transaction(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """The second "250" would otherwise answer the next message's RCPT, and the destination's
    refusal of that recipient would then answer DATA."""
    doubled = make_recorder({"end_of_data": ["250 2.0.0 Ok\r\n250 2.0.0 Ok again",
                                             "250 2.0.0 Ok"]},
                            rcpt_script={"reject@example.org": "550 5.1.1 no such user"},
                            name="doubled")
    server = await moxy({"example.org": doubled}, timeouts=FAST_TIMEOUTS)
    async with await open_session(server) as client:
        _, final = await client.send_message(SENDER, ["user@example.org"], BODY)
        assert final is not None and (final.code, final.enhanced) == (451, "4.4.2")
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        rcpt = await client.command("RCPT TO:<reject@example.org>")
        assert (rcpt.code, rcpt.enhanced) == (550, "5.1.1"), client.dump()
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(BODY + b".\r\n")
        assert (await client.reply()).code == 250, client.dump()
        await client.command("QUIT")
    # The first message did reach the destination (it said 250, then spoke out of turn): the
    # client's retry may be a duplicate, never a loss.
    assert len(doubled.messages) == 2


async def answer_to(server: RunningMoxy, until: str) -> tuple[SmtpClient, int, str]:
    client = await open_session(server)
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    reply = await client.command("RCPT TO:<user@example.org>")
    if until == "data" and reply.code == 250:
        reply = await client.command("DATA")
    return client, reply.code, reply.enhanced or ""


async def test_codes_that_cannot_answer_the_command_fail_the_leg(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    cases: list[tuple[str, Step, str]] = [
        ("data", "334 3.0.0 huh", "data"),
        ("data", "250 2.0.0 no body needed", "data"),
        ("rcpt", "354 go ahead", "rcpt"),
        ("mail", "334 what", "rcpt"),
    ]
    for stage, step, until in cases:
        odd = make_recorder({stage: step}, name=f"odd-{stage}")
        server = await moxy({"example.org": odd}, timeouts=FAST_TIMEOUTS)
        client, code, enhanced = await answer_to(server, until)
        async with client:
            assert (code, enhanced) == (451, "4.4.2"), (step, client.dump())
            # The session is in step with the client: it answers the next command at once.
            assert (await client.command("RSET")).code == 250, (step, client.dump())
            await client.command("QUIT")
        assert not odd.messages


async def test_a_multi_line_reply_keeps_its_own_enhanced_code(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    wordy = make_recorder({"rcpt": "250-first\r\n250-second\r\n250 2.1.5 ok"}, name="wordy")
    server = await moxy({"example.org": wordy}, timeouts=FAST_TIMEOUTS)
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        rcpt = await client.command("RCPT TO:<user@example.org>")
        assert rcpt.code == 250
        assert rcpt.lines == ("2.1.5 first", "2.1.5 second", "2.1.5 ok"), client.dump()
        await client.command("QUIT")
    await eventually(lambda: wordy.connections, timeout=5, what="the connection")
