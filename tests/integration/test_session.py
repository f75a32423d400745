"""The client side of a session: what EHLO promises, pipelining, and split transactions."""

from __future__ import annotations

from collections.abc import Callable

import trio

from peers.moxy import StartMoxy
from peers.recorder import Recorder, delay

from .helpers import BODY, SENDER, body_of, open_session, send_one

MakeRecorder = Callable[..., Recorder]


async def test_ehlo_advertises_pipelining_size_8bitmime_and_enhanced_status_codes(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy({"example.org": make_recorder()}, limits={"message_size": 12_345_678})
    async with await open_session(server) as client:
        ehlo = await client.command("EHLO client.test")
    assert ehlo.code == 250
    keywords = {line.upper() for line in ehlo.lines[1:]}
    assert {"PIPELINING", "SIZE 12345678", "8BITMIME", "ENHANCEDSTATUSCODES"} <= keywords


async def test_pipelined_mail_rcpt_rcpt_data_get_four_replies_in_order(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        await client.send(
            f"MAIL FROM:<{SENDER}>\r\n"
            "RCPT TO:<user@example.org>\r\n"
            "RCPT TO:<user@unknown.example>\r\n"
            "DATA\r\n".encode()
        )
        replies = await client.replies(4)
        assert [r.code for r in replies] == [250, 250, 550, 354], client.dump()
        await client.send(BODY + b".\r\n")
        assert (await client.reply()).code == 250, client.dump()
    [message] = upstream.messages
    assert message.rcpts == ["user@example.org"]
    assert body_of(message) == BODY


async def test_pipelined_replies_keep_their_order_when_upstreams_answer_out_of_order(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    slow = make_recorder({"rcpt": delay(0.3, "250 2.1.5 slow-ok")}, name="slow")
    fast = make_recorder({"rcpt": "250 2.1.5 fast-ok"}, name="fast")
    server = await moxy({"example.org": slow, "example.net": fast})
    async with await open_session(server) as client:
        await client.send(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            "DATA\r\n".encode()
            + BODY
            + b".\r\nQUIT\r\n"
        )
        replies = await client.replies(6)
    assert [r.code for r in replies] == [250, 250, 250, 354, 250, 221], client.dump()
    assert replies[1].lines == ("2.1.5 slow-ok",)
    assert replies[2].lines == ("2.1.5 fast-ok",)
    assert len(slow.messages) == len(fast.messages) == 1


async def test_whole_session_in_one_write_including_the_body(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        message = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n".encode()
        message += BODY + b".\r\n"
        await client.send(message * 2 + b"QUIT\r\n")
        replies = await client.replies(9)
    assert [r.code for r in replies] == [250, 250, 354, 250] * 2 + [221], client.dump()
    assert len(upstream.delivered) == 2


async def test_split_destinations_defers_recipients_of_another_destination_set(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    org, net = make_recorder(name="org"), make_recorder(name="net")
    server = await moxy(
        {"example.org": org, "example.net": net}, proxy={"split_destinations": True}
    )
    outcome = await send_one(server, ["a@example.org", "b@example.net", "c@example.org"])
    assert [(r.code, r.enhanced) for r in outcome.rcpt] == [
        (250, "2.1.5"),
        (452, "4.5.3"),
        (250, "2.1.5"),
    ], outcome.transcript
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [message] = org.messages
    assert message.rcpts == ["a@example.org", "c@example.org"]
    assert net.messages == []


async def test_split_destinations_still_shares_a_destination_between_domains(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy(
        {"example.org": upstream, "example.net": upstream}, proxy={"split_destinations": True}
    )
    outcome = await send_one(server, ["a@example.org", "b@example.net"])
    assert [r.code for r in outcome.rcpt] == [250, 250], outcome.transcript
    [message] = upstream.messages
    assert message.rcpts == ["a@example.org", "b@example.net"]


async def test_rset_between_transactions_keeps_the_leg(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<first@example.org>")).code == 250
        assert (await client.command("RSET")).code == 250
        _, final = await client.send_message(SENDER, ["second@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    assert len(upstream.connections) == 1
    [message] = upstream.messages
    assert message.rcpts == ["second@example.org"]


async def test_legs_of_one_recipient_open_concurrently(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """Two destination groups that each take 0.6 s to greet: one RCPT waits for both at once."""
    slow = [make_recorder({"greeting": delay(0.6)}, name=f"slow{i}") for i in range(2)]
    server = await moxy({"example.org": slow})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        started = trio.current_time()
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250, client.dump()
        elapsed = trio.current_time() - started
    assert elapsed < 1.1, f"RCPT took {elapsed:.2f}s: the legs were opened one after the other"
