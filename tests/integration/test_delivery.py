"""Mail goes where the routes say, once per destination, byte for byte, with a trace header."""

from __future__ import annotations

from collections.abc import Callable

import trio

from peers.client import smtplib_send
from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.sink import SmtpSink
from peers.waiting import eventually

from .helpers import (
    BODY,
    SENDER,
    UPSTREAM_HELO,
    body_of,
    check_received,
    open_session,
    send_one,
    split_received,
)

MakeRecorder = Callable[..., Recorder]


async def test_one_domain_one_destination_gets_the_exact_bytes_after_a_received_header(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [message] = upstream.messages
    assert message.accepted
    assert message.helo == UPSTREAM_HELO
    assert message.mail_from == SENDER
    assert message.rcpts == ["user@example.org"]
    assert message.data is not None
    header, rest = split_received(message.data)
    check_received(header)
    assert rest == BODY  # dot-stuffing preserved on the wire


async def test_one_domain_one_destination_through_smtp_sink(
    moxy: StartMoxy, smtp_sink: SmtpSink
) -> None:
    server = await moxy({"example.org": smtp_sink})
    message = b"Subject: via smtp-sink\r\n\r\nHello sink.\r\n.dot line\r\n"
    refused = await trio.to_thread.run_sync(
        smtplib_send, server.host, server.port, SENDER, ["user@example.org"], message
    )
    assert refused == {}
    [dumped] = smtp_sink.wait_for_messages(1)
    assert dumped.helo == UPSTREAM_HELO
    assert dumped.mail_from.startswith(f"<{SENDER}>")
    assert dumped.rcpts == ("<user@example.org>",)
    assert dumped.text.startswith(b"Received: from smtplib.test ")
    assert dumped.text.endswith(b"\nSubject: via smtp-sink\n\nHello sink.\n.dot line\n")


async def test_two_domains_to_the_same_destination_share_one_leg_and_one_copy(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream, "example.net": upstream})
    outcome = await send_one(server, ["a@example.org", "b@example.net"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert len(upstream.connections) == 1
    [message] = upstream.messages
    assert message.rcpts == ["a@example.org", "b@example.net"]
    assert upstream.verbs()[:5] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]


async def test_two_domains_to_the_same_smtp_sink_arrive_as_one_message(
    moxy: StartMoxy, smtp_sink: SmtpSink
) -> None:
    server = await moxy({"example.org": smtp_sink, "example.net": smtp_sink})
    outcome = await send_one(server, ["a@example.org", "b@example.net"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    # A second copy would have been committed before the client's 250, so it would be here.
    [dumped] = smtp_sink.wait_for_messages(1)
    assert dumped.rcpts == ("<a@example.org>", "<b@example.net>")


async def test_one_domain_to_two_destinations_both_get_identical_bytes(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    first, second = make_recorder(), make_recorder()
    server = await moxy({"example.org": [first, second]})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [a], [b] = first.messages, second.messages
    assert a.data == b.data
    assert body_of(a) == BODY
    assert a.rcpts == b.rcpts == ["user@example.org"]


async def test_one_domain_to_a_recorder_and_smtp_sink_both_receive_it(
    moxy: StartMoxy, make_recorder: MakeRecorder, smtp_sink: SmtpSink
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": [upstream, smtp_sink]})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [recorded] = upstream.messages
    [dumped] = smtp_sink.wait_for_messages(1)
    assert recorded.data is not None
    # smtp-sink stores LF line endings and undoes dot-stuffing.
    unstuffed = recorded.data.replace(b"\r\n..", b"\r\n.").replace(b"\r\n", b"\n")
    assert dumped.text == unstuffed


async def test_recipients_of_different_destinations_each_reach_only_their_own(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    org, net = make_recorder(), make_recorder()
    server = await moxy({"example.org": org, "example.net": net})
    outcome = await send_one(server, ["a@example.org", "b@example.net", "c@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [to_org], [to_net] = org.messages, net.messages
    assert to_org.rcpts == ["a@example.org", "c@example.org"]
    assert to_net.rcpts == ["b@example.net"]
    assert to_org.data == to_net.data


async def test_unknown_domain_is_refused_as_relaying_denied(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@unknown.example"])
    [rcpt] = outcome.rcpt
    assert (rcpt.code, rcpt.enhanced) == (550, "5.7.1"), outcome.transcript
    assert outcome.final is None
    assert upstream.connections == []


async def test_a_client_guessing_addresses_is_cut_off_after_the_error_limit(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    # Recipients refused by the destination (no such user) and by Moxy (relay denied) count
    # towards `limits.errors`, as in Postfix; a delivered message starts the count again. The
    # cut comes at the next transaction, or within one past `limits.recipients` refusals.
    upstream = make_recorder(rcpt_script={f"guess{i}@example.org": "550 5.1.1 No such user"
                                          for i in range(20)})
    server = await moxy({"example.org": upstream}, limits={"errors": 3, "recipients": 5})
    client = await open_session(server)
    await client.command(f"MAIL FROM:<{SENDER}>")
    for address in ["guess0@example.org", "guess1@example.org", "x@unknown.example",
                    "guess2@example.org"]:
        assert (await client.command(f"RCPT TO:<{address}>")).code == 550
    assert (await client.command("RCPT TO:<user@example.org>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(b"Subject: ok\r\n\r\nreal mail\r\n.\r\n")
    assert (await client.reply()).code == 250  # delivered: the count starts again
    await client.command(f"MAIL FROM:<{SENDER}>")
    for i in range(3, 7):  # four errors: over the limit of 3, not cut within the transaction
        assert (await client.command(f"RCPT TO:<guess{i}@example.org>")).code == 550
    assert (await client.command("RSET")).code == 250
    reply = await client.command(f"MAIL FROM:<{SENDER}>")
    assert (reply.code, reply.enhanced) == (421, "4.7.0"), client.dump()
    await client.expect_closed()
    # Within one transaction: past `recipients` (5) refusals.
    client = await open_session(server)
    await client.command(f"MAIL FROM:<{SENDER}>")
    for i in range(7, 13):
        assert (await client.command(f"RCPT TO:<guess{i}@example.org>")).code == 550
    assert (await client.command("RCPT TO:<guess13@example.org>")).code == 421, client.dump()
    assert "guess13@example.org" not in " ".join(upstream.commands())
    await eventually(lambda: any(" reason=protocol-errors " in line
                                 for line in server.log_lines()))


async def test_refusals_of_the_sender_or_for_too_many_recipients_are_no_client_errors(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """A destination that refuses the sender answers every RCPT with that refusal, and a 552
    says "too many recipients" (RFC 5321 §4.5.3.1.10): not the client's errors, never a 421."""
    refuses_sender = make_recorder({"mail": "550 5.7.1 Sender blocked"}, name="sender")
    full = make_recorder({"rcpt": ["250 2.1.5 Ok"] * 3 + ["552 5.5.3 Too many recipients"]},
                         name="full")
    server = await moxy({"a.example": refuses_sender, "b.example": full},
                        limits={"errors": 2})
    for domain, codes in (("a.example", [550] * 6), ("b.example", [250] * 3 + [552] * 3)):
        client = await open_session(server)
        await client.command(f"MAIL FROM:<{SENDER}>")
        got = [(await client.command(f"RCPT TO:<u{i}@{domain}>")).code for i in range(6)]
        assert got == codes, client.dump()
        assert (await client.command("RSET")).code == 250
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250, client.dump()
        await client.aclose()


async def test_the_routes_lookup_order_reaches_parent_and_wildcard_routes(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    parent, wildcard, boss = make_recorder(), make_recorder(), make_recorder()
    server = await moxy(
        f"# routes\n.example.org  {parent.address}\n*  {wildcard.address}\n"
        f"Boss@Example.ORG  {boss.address}\n"
    )
    outcome = await send_one(
        server, ["user@sub.example.org", "someone@elsewhere.test", "boss@example.org."]
    )
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert parent.messages[0].rcpts == ["user@sub.example.org"]
    assert wildcard.messages[0].rcpts == ["someone@elsewhere.test"]
    assert len(boss.messages) == 1


async def test_second_transaction_in_a_session_reuses_the_upstream_connection(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        for n in range(2):
            _, final = await client.send_message(SENDER, [f"user{n}@example.org"], BODY)
            assert final is not None and final.code == 250, client.dump()
        await client.command("QUIT")
    assert len(upstream.connections) == 1
    assert [m.rcpts for m in upstream.delivered] == [["user0@example.org"], ["user1@example.org"]]
    assert {m.connection for m in upstream.delivered} == {0}


async def test_a_session_keeps_at_most_session_legs_between_transactions(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """A client that names many destinations and then idles must not hold their connections
    (and their places under each destination's `concurrency`) for the whole session."""
    upstreams = [make_recorder(name=f"d{i}") for i in range(4)]
    server = await moxy({f"d{i}.example": u for i, u in enumerate(upstreams)},
                        limits={"session_legs": 2})
    async with await open_session(server) as client:
        await client.command(f"MAIL FROM:<{SENDER}>")
        for i in range(4):
            assert (await client.command(f"RCPT TO:<u@d{i}.example>")).code == 250
        assert (await client.command("RSET")).code == 250
        # Four legs, each with a transaction to reset: given up at once, while the client idles.
        await eventually(lambda: all(u.connections[0].closed.is_set() for u in upstreams),
                         what="the legs closed")
        assert all(u.connections[0].quit for u in upstreams)
        _, final = await client.send_message(SENDER, ["v@d0.example"], BODY)
        assert final is not None and final.code == 250, client.dump()
        assert len(upstreams[0].connections) == 2
        # Under the bound, the session keeps its leg for its next message.
        _, final = await client.send_message(SENDER, ["w@d0.example"], BODY)
        assert final is not None and final.code == 250, client.dump()
        assert len(upstreams[0].connections) == 2


async def test_client_quit_sends_quit_to_every_leg_without_the_pool(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    first, second = make_recorder(), make_recorder()
    server = await moxy(
        {"example.org": first, "example.net": second}, limits={"idle_upstreams": 0}
    )
    outcome = await send_one(server, ["a@example.org", "b@example.net"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    await eventually(lambda: first.connections[0].quit and second.connections[0].quit, what="QUIT")


async def test_client_quit_sends_quit_to_its_one_leg_without_the_pool(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """One leg to quit: Session.close sends its QUIT without the 5 s scope of several."""
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"idle_upstreams": 0})
    outcome = await send_one(server, ["a@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    await eventually(lambda: upstream.connections[0].quit, what="QUIT")
    assert len(upstream.delivered) == 1


async def test_helo_fallback_when_the_upstream_refuses_ehlo(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder(esmtp=False)
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert upstream.verbs()[:3] == ["EHLO", "HELO", "MAIL"]
    [message] = upstream.messages
    assert message.helo == UPSTREAM_HELO
    assert message.mail_params == ""  # no ESMTP parameters to a plain SMTP server
    assert body_of(message) == BODY


async def test_mail_parameters_are_passed_on_when_the_upstream_supports_them(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}> SIZE=500 BODY=8BITMIME")).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: 8bit\r\n\r\n\xc3\xa9t\xc3\xa9\r\n.\r\n")
        assert (await client.reply()).code == 250, client.dump()
    [message] = upstream.messages
    params = message.mail_params.upper().split()
    assert "BODY=8BITMIME" in params
    assert any(p.startswith("SIZE=") for p in params)
    assert body_of(message) == b"Subject: 8bit\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"


async def test_log_file_has_a_line_for_the_message_and_for_each_leg(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    first, second = make_recorder(), make_recorder()
    server = await moxy({"example.org": [first, second]})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript

    def lines_about(text: str) -> list[str]:
        return [line for line in server.log_lines() if text in line]

    await eventually(
        lambda: lines_about(" message ") and lines_about(f"dest={second.address}"),
        what="log lines",
    )
    for upstream in (first, second):
        [line] = lines_about(f"dest={upstream.address}")
        assert "user@example.org" in line and SENDER in line and "code=250" in line, line
    [line] = lines_about(" message ")
    assert "user@example.org" in line and "code=250" in line, line
