"""The reply decision table of docs/semantics.md, cell by cell, without sockets."""

from __future__ import annotations

import pytest

from moxy.smtp.replies import Reply
from moxy.transaction import Outcome, decide_data, decide_final, leg_error_reply, merge_rcpt
from moxy.upstream import LegError

OK = Reply(250, ("2.0.0 Ok: queued as A1",))
OK2 = Reply(250, ("Ok queued as B2",))  # no enhanced code of its own
TEMP = Reply(451, ("4.3.0 try later",))
TEMP2 = Reply(452, ("4.2.2 mailbox full",))
PERM = Reply(554, ("5.6.0 rejected",))
PERM2 = Reply(550, ("5.1.1 no such user",))
GO = Reply(354, ("go ahead",))
LOST = LegError("end-of-data", "10.0.0.1:25", "no reply within 600s")
CLOSING = LegError("rcpt", "10.0.0.1:25", "service closing", Reply(421, ("4.3.2 bye",)))
REFUSED = LegError("connect", "10.0.0.1:25", "Connection refused")


@pytest.mark.parametrize(
    ("outcomes", "code", "enhanced"),
    [
        ([OK], 250, "2.0.0"),
        ([OK2], 250, "2.1.5"),  # enhanced code added when the upstream sent none
        ([PERM2], 550, "5.1.1"),
        ([TEMP], 451, "4.3.0"),
        ([OK, OK2], 250, "2.0.0"),
        ([OK, PERM2], 550, "5.1.1"),
        ([PERM2, OK], 550, "5.1.1"),
        ([OK, TEMP2], 452, "4.2.2"),
        ([TEMP2, PERM2], 550, "5.1.1"),  # worst class wins
        ([PERM2, PERM], 550, "5.1.1"),  # same class: first group's reply
        ([REFUSED], 451, "4.4.1"),
        ([CLOSING], 451, "4.4.2"),  # upstream 421 -> 451 to the client
        ([OK, REFUSED], 451, "4.4.1"),
        ([PERM2, REFUSED], 550, "5.1.1"),
    ],
)
def test_rcpt_reply_is_the_worst_destination_answer(
    outcomes: list[Outcome], code: int, enhanced: str
) -> None:
    reply = merge_rcpt(outcomes)
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_rcpt_reply_keeps_the_upstream_text() -> None:
    assert merge_rcpt([PERM2]).lines == ("5.1.1 no such user",)


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [
        ([GO], 354),
        ([GO, GO, GO], 354),
        ([PERM], 554),
        ([TEMP], 451),
        ([PERM, PERM2], 554),  # all refused, same class: the first leg's reply
        ([GO, PERM], 451),  # mixed: temporary, nothing delivered
        ([PERM, GO], 451),
        ([TEMP, PERM], 451),  # refusals of mixed classes
        ([GO, LOST], 451),
        ([LOST], 451),
    ],
)
def test_data_command_needs_354_from_every_leg(outcomes: list[Outcome], code: int) -> None:
    assert decide_data(outcomes).code == code


def test_data_mixed_reply_is_4_3_0() -> None:
    assert decide_data([GO, PERM]).enhanced == "4.3.0"


@pytest.mark.parametrize(
    ("outcomes", "code", "enhanced"),
    [
        ([OK], 250, "2.0.0"),
        ([OK2], 250, "2.0.0"),
        ([OK, OK2], 250, "2.0.0"),
        ([TEMP], 451, "4.3.0"),
        ([PERM], 554, "5.6.0"),
        ([TEMP, TEMP2], 451, "4.3.0"),  # all 4xx: first leg's reply
        ([PERM2, PERM], 550, "5.1.1"),  # all 5xx: first leg's reply
        ([OK, TEMP], 451, "4.3.0"),  # mixed: retry, duplicate possible
        ([OK, PERM], 451, "4.3.0"),
        ([TEMP, PERM], 451, "4.3.0"),
        ([OK, LOST], 451, "4.3.0"),  # unknown outcome counts as temporary
        ([LOST], 451, "4.4.2"),
        ([LOST, LOST], 451, "4.4.2"),
    ],
)
def test_final_reply_decision_table(
    outcomes: list[Outcome], code: int, enhanced: str
) -> None:
    reply = decide_final(outcomes, "ABC.1")
    assert (reply.code, reply.enhanced) == (code, enhanced)


def test_single_leg_final_reply_is_passed_through() -> None:
    assert decide_final([OK], "ABC.1") == OK


def test_multi_leg_success_names_the_message() -> None:
    reply = decide_final([OK, OK], "ABC.1")
    assert "ABC.1" in reply.lines[0] and "2 destinations" in reply.lines[0]


@pytest.mark.parametrize(
    ("error", "enhanced"),
    [(REFUSED, "4.4.1"), (CLOSING, "4.4.2"), (LOST, "4.4.2"),
     (LegError("greeting", "h:25", "closed"), "4.4.1")],
)
def test_leg_failures_are_always_temporary(error: LegError, enhanced: str) -> None:
    reply = leg_error_reply(error)
    assert reply.code == 451 and reply.enhanced == enhanced


def test_no_legs_is_never_an_acceptance() -> None:
    assert decide_data([]).code == 451
    assert decide_final([], "ABC.1").code == 451


def test_single_leg_354_is_moxys_own_and_a_refusal_is_the_legs() -> None:
    # One leg (the fast path): the client hears Moxy's 354 text whatever the leg said, and
    # a leg's refusal as it is, as with several legs.
    assert decide_data([GO]).lines == ("End data with <CR><LF>.<CR><LF>",)
    assert decide_data([GO]) == decide_data([GO, GO])
    assert decide_data([PERM2]) == PERM2 == decide_data([PERM2, PERM])


def test_single_leg_replies_get_the_default_enhanced_code_on_every_line() -> None:
    multi = Reply(250, ("Ok", "still ok"))
    assert merge_rcpt([multi]).lines == ("2.1.5 Ok", "2.1.5 still ok")
    assert decide_final([multi], "ABC.1").lines == ("2.0.0 Ok", "2.0.0 still ok")
    assert merge_rcpt([multi]) == merge_rcpt([multi, multi])
    assert decide_final([LOST], "ABC.1") == leg_error_reply(LOST)
