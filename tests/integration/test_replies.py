"""Senders hear the destinations' own answers; when destinations disagree, the decision table
of docs/semantics.md decides, and nobody receives mail the sender was told was refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.sink import SmtpSink

from .helpers import BODY, SENDER, body_of, open_session, send_one

MakeRecorder = Callable[..., Recorder]

USER_UNKNOWN = "550 5.1.1 <nobody@example.org>: Recipient address rejected: User unknown"
MAILBOX_FULL = "452 4.2.2 <nobody@example.org>: Mailbox full, try later"


@pytest.mark.parametrize(
    "upstream_reply",
    [
        USER_UNKNOWN,
        MAILBOX_FULL,
        "250 2.1.5 Recipient <nobody@example.org> looks fine to me",
    ],
)
async def test_rcpt_reply_is_the_destinations_own_code_and_text(
    moxy: StartMoxy, make_recorder: MakeRecorder, upstream_reply: str
) -> None:
    upstream = make_recorder(rcpt_script={"nobody@example.org": upstream_reply})
    server = await moxy({"example.org": upstream})
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        reply = await client.command("RCPT TO:<nobody@example.org>")
    assert f"{reply.code} {reply.lines[0]}" == upstream_reply, client.dump()


async def test_upstream_refusing_mail_from_is_what_the_client_hears_at_rcpt(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder({"mail": "553 5.7.1 <sender@client.test>: Sender address rejected"})
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@example.org"])
    [rcpt] = outcome.rcpt
    assert rcpt.code == 553, outcome.transcript
    assert rcpt.lines == ("5.7.1 <sender@client.test>: Sender address rejected",)
    assert upstream.messages == []


@pytest.mark.parametrize("refusal", [USER_UNKNOWN, MAILBOX_FULL], ids=["550", "452"])
@pytest.mark.parametrize("rejected_first", [False, True], ids=["accepted-first", "rejected-first"])
async def test_recipient_rejected_by_one_of_its_destinations_is_delivered_by_none(
    moxy: StartMoxy, make_recorder: MakeRecorder, rejected_first: bool, refusal: str
) -> None:
    """example.org goes to two groups; B refuses nobody@ while A would take it. The client is
    told B's refusal, so A must not deliver to nobody@ either (only to the recipient both
    accepted)."""
    a = make_recorder(name="A")
    b = make_recorder(name="B", rcpt_script={"nobody@example.org": refusal})
    server = await moxy({"example.org": [a, b]})
    rcpts = ["user@example.org", "nobody@example.org"]
    if rejected_first:
        rcpts.reverse()
    outcome = await send_one(server, rcpts)
    codes = {rcpt: reply.code for rcpt, reply in zip(rcpts, outcome.rcpt, strict=True)}
    expected = {"user@example.org": 250, "nobody@example.org": int(refusal[:3])}
    assert codes == expected, outcome.transcript
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    for upstream in (a, b):
        [message] = upstream.delivered
        assert message.rcpts == ["user@example.org"], f"{upstream.name}: {upstream.commands()}"
        assert body_of(message) == BODY


async def test_recipient_rejected_by_its_only_other_destination_leaves_nothing_to_send(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    a = make_recorder(name="A")
    b = make_recorder(name="B", rcpt_script={"nobody@example.org": USER_UNKNOWN})
    server = await moxy({"example.org": [a, b]})
    outcome = await send_one(server, ["nobody@example.org"])
    assert outcome.rcpt[0].code == 550, outcome.transcript
    assert outcome.final is None
    assert outcome.envelope[-1].klass in (4, 5), outcome.transcript  # DATA without recipients
    assert a.messages == [] and b.messages == []


@pytest.mark.parametrize(
    ("a_reply", "b_reply", "klass"),
    [
        ("250 2.1.5 Ok", "550 5.1.1 No such user", 5),
        ("250 2.1.5 Ok", "451 4.3.0 Try later", 4),
        ("451 4.3.0 Try later", "550 5.1.1 No such user", 5),
    ],
)
async def test_destinations_disagreeing_at_rcpt_give_the_worst_class(
    moxy: StartMoxy, make_recorder: MakeRecorder, a_reply: str, b_reply: str, klass: int
) -> None:
    a = make_recorder(name="A", rcpt_script={"user@example.org": a_reply})
    b = make_recorder(name="B", rcpt_script={"user@example.org": b_reply})
    server = await moxy({"example.org": [a, b]})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.rcpt[0].klass == klass, outcome.transcript
    assert a.messages == [] and b.messages == []


@pytest.mark.parametrize("refusal", ["554 5.5.1 No valid recipients here", "451 4.3.0 Busy"])
async def test_a_leg_refusing_data_means_no_354_and_no_delivery_anywhere(
    moxy: StartMoxy, make_recorder: MakeRecorder, refusal: str
) -> None:
    a = make_recorder(name="A")
    b = make_recorder(name="B", script={"data": refusal})
    server = await moxy({"example.org": [a, b]})
    outcome = await send_one(server, ["user@example.org"])
    data = outcome.envelope[-1]
    assert data.code != 354 and data.klass in (4, 5), outcome.transcript
    assert outcome.final is None
    assert a.messages == [] and b.messages == []


async def test_single_destination_refusing_data_passes_its_reply_through(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder({"data": "554 5.7.1 Not from you"})
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@example.org"])
    data = outcome.envelope[-1]
    assert (data.code, data.lines) == (554, ("5.7.1 Not from you",)), outcome.transcript


# The final reply after end of data, for every pair of answers two destinations can give.
ACCEPT, TEMPFAIL, REJECT = "250 2.0.0 Ok: queued", "451 4.3.0 Try again", "554 5.7.1 Rejected"


@pytest.mark.parametrize(
    ("a_reply", "b_reply", "code"),
    [
        (ACCEPT, ACCEPT, 250),
        (ACCEPT, TEMPFAIL, 451),
        (ACCEPT, REJECT, 451),
        (TEMPFAIL, ACCEPT, 451),
        (TEMPFAIL, TEMPFAIL, 451),
        (TEMPFAIL, REJECT, 451),
        (REJECT, ACCEPT, 451),
        (REJECT, TEMPFAIL, 451),
        (REJECT, REJECT, 554),
    ],
    ids=lambda v: v if isinstance(v, int) else v[:3],
)
async def test_final_reply_decision_table(
    moxy: StartMoxy, make_recorder: MakeRecorder, a_reply: str, b_reply: str, code: int
) -> None:
    a = make_recorder(name="A", script={"end_of_data": a_reply})
    b = make_recorder(name="B", script={"end_of_data": b_reply})
    server = await moxy({"example.org": [a, b]})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None, outcome.transcript
    assert outcome.final.code == code, outcome.transcript
    assert outcome.final.enhanced is not None and outcome.final.enhanced[0] == str(code)[0]
    # Both destinations saw the whole message exactly once, whatever they answered.
    assert len(a.messages) == len(b.messages) == 1
    assert a.messages[0].data == b.messages[0].data


@pytest.mark.parametrize("reply", [ACCEPT, TEMPFAIL, REJECT])
async def test_final_reply_of_a_single_destination_is_passed_through(
    moxy: StartMoxy, make_recorder: MakeRecorder, reply: str
) -> None:
    upstream = make_recorder({"end_of_data": reply})
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None, outcome.transcript
    if reply == ACCEPT:
        assert outcome.final.code == 250
    else:
        assert f"{outcome.final.code} {outcome.final.lines[0]}" == reply, outcome.transcript


async def test_smtp_sink_rejecting_the_message_passes_its_reply_through(
    moxy: StartMoxy, make_smtp_sink: Callable[..., SmtpSink]
) -> None:
    sink = make_smtp_sink("-f", ".", "-B", "554 5.7.1 Sink says no")  # hard reject at end of data
    server = await moxy({"example.org": sink})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None, outcome.transcript
    assert (outcome.final.code, outcome.final.lines) == (554, ("5.7.1 Sink says no",))


async def test_a_destination_reply_line_over_512_octets_reaches_the_client_cut_into_lines(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """RFC 5321 §4.5.3.1.5: 512 octets a reply line, code and CRLF included. Moxy reads a
    destination's longer lines (up to `reply_line`) and passes them on within the limit."""
    words = " ".join(f"word{n:03d}" for n in range(110))  # 879 characters
    wordy = make_recorder(rcpt_script={"user@example.org": f"550 5.1.1 {words}"}, name="wordy")
    server = await moxy({"example.org": wordy})
    outcome = await send_one(server, ["user@example.org"])
    [rcpt] = outcome.rcpt
    assert rcpt.code == 550 and len(rcpt.lines) == 2, outcome.transcript
    assert all(len(f"550-{line}\r\n".encode()) <= 512 for line in rcpt.lines)
    assert all(line.startswith("5.1.1 ") for line in rcpt.lines)
    assert " ".join(line[len("5.1.1 "):] for line in rcpt.lines) == words
