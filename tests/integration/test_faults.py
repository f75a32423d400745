"""When a peer fails, Moxy fails over where it still can, answers 4xx where it cannot, and never
lets a partial or unannounced message reach a destination."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import DISCONNECT, HANG, Recorder, Step, delay, reply_421
from peers.sink import SmtpSink, free_port
from peers.waiting import eventually

from .helpers import BODY, FAST_TIMEOUTS, SENDER, body_of, open_session, send_one

MakeRecorder = Callable[..., Recorder]

ACTIONS: dict[str, Step] = {"disconnect": DISCONNECT, "hang": HANG, "421": reply_421()}

# (stage, action): how the first alternative of a group fails before the leg is usable.
EARLY_FAILURES = [
    ("connect", "refused"),
    *[(stage, action) for stage in ("greeting", "ehlo") for action in ACTIONS],
]


def failing_alternative(make_recorder: MakeRecorder, stage: str, action: str) -> str:
    """The address of an upstream that fails at `stage` in the way `action` says."""
    if stage == "connect":
        return f"127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    return make_recorder({stage: ACTIONS[action]}, name=f"failing-{stage}-{action}").address


@pytest.mark.parametrize(("stage", "action"), EARLY_FAILURES)
async def test_failover_to_the_next_alternative(
    moxy: StartMoxy, make_recorder: MakeRecorder, stage: str, action: str
) -> None:
    broken = failing_alternative(make_recorder, stage, action)
    backup = make_recorder(name="backup")
    server = await moxy({"example.org": f"{broken}|{backup.address}"}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.rcpt[0].code == 250, outcome.transcript
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [message] = backup.messages
    assert body_of(message) == BODY


@pytest.mark.parametrize(("stage", "action"), EARLY_FAILURES)
async def test_every_alternative_failing_is_451_at_rcpt(
    moxy: StartMoxy, make_recorder: MakeRecorder, stage: str, action: str
) -> None:
    first = failing_alternative(make_recorder, stage, action)
    second = failing_alternative(make_recorder, stage, action)
    server = await moxy({"example.org": f"{first}|{second}"}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    [rcpt] = outcome.rcpt
    assert rcpt.code == 451, outcome.transcript
    assert rcpt.enhanced is not None and rcpt.enhanced.startswith("4.4."), outcome.transcript


async def test_first_alternative_is_preferred_while_it_works(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    primary, backup = make_recorder(name="primary"), make_recorder(name="backup")
    server = await moxy({"example.org": f"{primary.address}|{backup.address}"})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert len(primary.messages) == 1
    assert backup.connections == []


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("stage", ["mail", "rcpt"])
async def test_upstream_failing_at_mail_or_rcpt_is_a_4xx_at_rcpt(
    moxy: StartMoxy, make_recorder: MakeRecorder, stage: str, action: str
) -> None:
    upstream = make_recorder({stage: ACTIONS[action]})
    server = await moxy({"example.org": upstream}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    [rcpt] = outcome.rcpt
    assert rcpt.klass == 4, outcome.transcript
    if action == "421":
        assert rcpt.code == 451, outcome.transcript  # a closing upstream is not the client's 421
    assert upstream.messages == []
    # Its only destination, on a connection of its own: not asked again (after a hang the
    # sender waited two timeouts, 600 s for a RCPT with the defaults).
    assert len(upstream.connections) == 1, upstream.connections


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_a_fresh_connection_failing_at_mail_fails_over_to_the_next_alternative(
    moxy: StartMoxy, make_recorder: MakeRecorder, action: str
) -> None:
    broken = make_recorder({"mail": ACTIONS[action]}, name="broken")
    backup = make_recorder(name="backup")
    server = await moxy({"example.org": f"{broken.address}|{backup.address}"},
                        timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert len(broken.connections) == 1 and len(backup.messages) == 1


@pytest.mark.parametrize("action", list(ACTIONS))
async def test_upstream_failing_at_data_is_a_4xx_at_data_and_nothing_is_delivered(
    moxy: StartMoxy, make_recorder: MakeRecorder, action: str
) -> None:
    failing = make_recorder({"data": ACTIONS[action]}, name="failing")
    healthy = make_recorder(name="healthy")
    server = await moxy({"example.org": [failing, healthy]}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    data = outcome.envelope[-1]
    assert data.klass == 4, outcome.transcript
    if action == "421":
        assert data.code == 451, outcome.transcript
    assert outcome.final is None
    assert failing.messages == [] and healthy.messages == []


AFTER_END_OF_DATA: dict[str, Step] = {
    **ACTIONS, "250 out of step": "250 2.0.0 Ok: queued as A1\r\n250 2.0.0 Ok again",
}


@pytest.mark.parametrize("action", list(AFTER_END_OF_DATA))
async def test_upstream_failing_after_end_of_data_is_451(
    moxy: StartMoxy, make_recorder: MakeRecorder, action: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination may have the message (a duplicate is possible), but it never said so
    clearly: the sender must keep it and retry (no loss), and the duplicate is not silent.
    A 421 is a refusal: nothing to warn of."""
    upstream = make_recorder({"end_of_data": AFTER_END_OF_DATA[action]})
    server = await moxy({"example.org": upstream}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 451, outcome.transcript
    assert len(upstream.messages) == 1  # it got the whole message, it just never said 250
    assert ("duplicate possible" in caplog.text) == (action != "421"), caplog.text
    if action == "250 out of step":  # the destination has it: its leg counts as delivered
        await eventually(lambda: any(line.split(" ")[1] == "leg" and " code=250 " in line
                                     for line in server.log_lines()))


async def test_upstream_disconnecting_mid_body_is_451_and_no_other_leg_delivers(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    failing = make_recorder({"body": DISCONNECT}, body_after=16 * 1024, name="failing")
    healthy = make_recorder(name="healthy")
    server = await moxy({"example.org": [failing, healthy]}, timeouts=FAST_TIMEOUTS)
    line = b"x" * 78 + b"\r\n"
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: mid-body\r\n\r\n" + line * 400)  # 32 KB
        await trio.to_thread.run_sync(failing.wait_closed)
        # Enough that Moxy's writes to the dead leg fail before the client ends the body.
        await client.send(line * 4000 + b".\r\n")
        final = await client.reply()
        assert final.code == 451, client.dump()
    assert failing.messages == []
    assert healthy.messages == [], "a leg got the end-of-data sequence after another leg failed"
    # Each leg's event names its own destination; the healthy one was abandoned with the
    # message, for the failing one's failure.
    await eventually(lambda: len(legs(server)) == 2)
    by_dest = {field(line, "dest"): line for line in legs(server)}
    assert set(by_dest) == {failing.address, healthy.address}
    assert f"abandoned: {failing.address} failed" in by_dest[healthy.address]
    assert "connection" in by_dest[failing.address].split(" reply=", 1)[1]


def legs(server: RunningMoxy) -> list[str]:
    return [line for line in server.log_lines() if line.split(" ")[1:2] == ["leg"]]


def field(line: str, name: str) -> str:
    return line.split(f" {name}=", 1)[1].split(" ", 1)[0]


@pytest.mark.parametrize("legs", [1, 2])
async def test_client_disconnecting_mid_data_delivers_nothing(
    moxy: StartMoxy, make_recorder: MakeRecorder, legs: int
) -> None:
    upstreams = [make_recorder() for _ in range(legs)]
    server = await moxy({"example.org": upstreams})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: cut short\r\n\r\nThe first lines arrive,\r\n")
    for upstream in upstreams:
        # The leg is closed without the end-of-data sequence.
        await trio.to_thread.run_sync(upstream.wait_closed)
        assert upstream.messages == []


async def test_client_silent_mid_data_gets_421_and_nothing_is_delivered(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, timeouts={"client_data": 0.5})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(b"Subject: stalled\r\n\r\nand then nothing\r\n")
        with trio.fail_after(5):
            reply = await client.reply()
        assert reply.code == 421, client.dump()
        await client.expect_closed(timeout=5)
    await trio.to_thread.run_sync(upstream.wait_closed)
    assert upstream.messages == []


async def test_client_silent_between_commands_gets_421(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, timeouts={"client_command": 0.5})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        reply = await client.reply(timeout=5)
        assert reply.code == 421, client.dump()
        await client.expect_closed(timeout=5)
    await trio.to_thread.run_sync(upstream.wait_closed)
    assert upstream.messages == []


async def test_slow_upstream_within_its_timeouts_is_fine(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder(
        {"greeting": delay(0.2), "rcpt": delay(0.2), "end_of_data": delay(0.2)}
    )
    server = await moxy({"example.org": upstream}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript


async def test_a_failed_leg_does_not_stop_the_next_transaction(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """After an upstream dropped the connection at end of data, the next message in the same
    client session opens a fresh leg and is delivered."""
    upstream = make_recorder({"end_of_data": [DISCONNECT, "250 2.0.0 Ok"]})
    server = await moxy({"example.org": upstream}, timeouts=FAST_TIMEOUTS)
    async with await open_session(server) as client:
        _, final = await client.send_message(SENDER, ["user@example.org"], BODY)
        assert final is not None and final.code == 451, client.dump()
        _, final = await client.send_message(SENDER, ["user@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    await eventually(lambda: len(upstream.delivered) == 1)
    assert len(upstream.connections) == 2


async def test_smtp_sink_closing_with_421_at_rcpt_is_451_to_the_client(
    moxy: StartMoxy, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink("-Q", "RCPT")  # Postfix's own 421-and-disconnect
    server = await moxy({"example.org": sink}, timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.rcpt[0].code == 451, outcome.transcript
    assert sink.messages() == []


async def test_a_malformed_reply_behind_a_pipelined_one_fails_over(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """The RCPT reply, already read with the MAIL reply in one packet, is not a reply: the leg
    treats the destination as broken (a LegError, so failover), it does not crash the session."""
    broken = make_recorder({"mail": "250 2.1.0 Ok\r\nnot a reply"}, name="broken")
    backup = make_recorder(name="backup")
    server = await moxy({"example.org": f"{broken.address}|{backup.address}"},
                        timeouts=FAST_TIMEOUTS)
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.rcpt[0].code == 250, outcome.transcript
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [message] = backup.messages
    assert body_of(message) == BODY
    assert not broken.messages
