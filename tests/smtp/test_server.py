"""The server connection: command order, pipelining, limits, the body, end of file."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy.smtp.events import (
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyEnd,
    BodyRefused,
    ConnectionClosed,
    Data,
    Event,
    Hello,
    Help,
    Invalid,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Reset,
    Sentinel,
    Verify,
)
from moxy.smtp.replies import Reply
from moxy.smtp.server import LocalProtocolError, ServerConnection, State

from .splits import split_at

OK = Reply.make(250, "2.0.0", "Ok")
GO_AHEAD = Reply(354, ("End data with <CR><LF>.<CR><LF>",))
REFUSED = Reply.make(550, "5.1.1", "No such user")
BYE = Reply.make(221, "2.0.0", "Bye")


def connect(**options: Any) -> ServerConnection:
    conn = ServerConnection(**options)
    conn.send(Reply(220, ("mx.example ESMTP",)))
    return conn


def ready(verb: str = "EHLO", **options: Any) -> ServerConnection:
    conn = connect(**options)
    command(conn, f"{verb} client.example", OK)
    return conn


def command(conn: ServerConnection, line: str, reply: Reply = OK) -> Event | Sentinel:
    """Send one command line, answer its event with `reply`, return the event."""
    conn.receive_data(line.encode() + b"\r\n")
    event = conn.next_event()
    if not isinstance(event, Sentinel | ConnectionClosed):
        conn.send(reply)
    return event


def in_transaction(recipients: int = 1, **options: Any) -> ServerConnection:
    conn = ready(**options)
    command(conn, "MAIL FROM:<a@example.org>")
    for i in range(recipients):
        command(conn, f"RCPT TO:<r{i}@example.net>")
    return conn


def drain(conn: ServerConnection) -> list[Event | Sentinel]:
    """Every event until the core needs data or a reply, with that sentinel last."""
    events: list[Event | Sentinel] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if isinstance(event, Sentinel | ConnectionClosed):
            return events


def code(event: Event | Sentinel) -> tuple[int, str | None]:
    assert isinstance(event, Invalid), event
    return event.reply.code, event.reply.enhanced


# -- greeting and simple commands ------------------------------------------------------------


def test_nothing_is_parsed_before_the_greeting_is_sent() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO early.example\r\n")
    assert (conn.state, conn.next_event()) == (State.CONNECTED, PAUSED)
    conn.send(Reply(220, ("hi",)))
    assert conn.state is State.GREETED
    assert conn.next_event() == Hello("EHLO", "early.example")


@pytest.mark.parametrize("greeting", [220, 554])
def test_greeting_opens_the_dialogue(greeting: int) -> None:
    conn = ServerConnection()
    conn.send(Reply.make(greeting, "2.0.0" if greeting == 220 else "5.3.2"))
    assert conn.state is State.GREETED


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ("NOOP", Noop()),
        ("RSET", Reset()),
        ("VRFY someone", Verify("someone")),
        ("HELP", Help("")),
        ("QUIT", Quit()),
        ("EHLO c.example", Hello("EHLO", "c.example")),
        ("HELO c.example", Hello("HELO", "c.example")),
    ],
)
def test_commands_allowed_before_hello(line: str, event: Event) -> None:
    conn = connect()
    conn.receive_data(line.encode() + b"\r\n")
    assert conn.next_event() == event


def test_accepted_hello_is_remembered() -> None:
    conn = ready("HELO")
    assert (conn.state, conn.hello, conn.hello_domain) == (State.READY, "HELO", "client.example")


def test_refused_hello_leaves_the_state_as_it_was() -> None:
    conn = connect()
    command(conn, "EHLO c.example", Reply.make(550, "5.7.1", "Go away"))
    assert (conn.state, conn.hello) == (State.GREETED, None)


@pytest.mark.parametrize(
    ("replies", "state"),
    [
        (["MAIL FROM:<a@b.example>"], State.MAIL),
        (["MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>"], State.RCPT),
        (["MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>", "RSET"], State.READY),
        (["MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>", "EHLO again.example"], State.READY),
        (["MAIL FROM:<a@b.example>", "NOOP", "VRFY x", "HELP"], State.MAIL),
        (["QUIT"], State.CLOSED),
    ],
)
def test_accepted_commands_move_the_state(replies: list[str], state: State) -> None:
    conn = ready()
    for line in replies:
        command(conn, line, BYE if line == "QUIT" else OK)
    assert conn.state is state


def test_refused_mail_or_rcpt_changes_nothing() -> None:
    conn = ready()
    command(conn, "MAIL FROM:<a@b.example>", REFUSED)
    assert conn.state is State.READY
    command(conn, "MAIL FROM:<a@b.example>")
    command(conn, "RCPT TO:<c@d.example>", REFUSED)
    assert (conn.state, conn.accepted_recipients) == (State.MAIL, 0)


def test_rset_before_hello_stays_greeted() -> None:
    conn = connect()
    command(conn, "RSET")
    assert conn.state is State.GREETED


def test_extensions_match_the_limits() -> None:
    conn = ServerConnection(max_message_size=1000)
    assert conn.extensions == (
        "PIPELINING", "SIZE 1000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"
    )


# -- command order ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "line", "expected"),
    [
        ([], "MAIL FROM:<a@b.example>", (503, "5.5.1")),
        ([], "MAIL FROM:bad syntax", (503, "5.5.1")),
        ([], "RCPT TO:<c@d.example>", (503, "5.5.1")),
        ([], "DATA", (503, "5.5.1")),
        (["EHLO c.example"], "RCPT TO:<c@d.example>", (503, "5.5.1")),
        (["EHLO c.example"], "DATA", (503, "5.5.1")),
        (["EHLO c.example", "MAIL FROM:<a@b.example>"], "MAIL FROM:<a@b.example>", (503, "5.5.1")),
        (["EHLO c.example", "MAIL FROM:<a@b.example>"], "DATA", (554, "5.5.1")),
        (
            ["EHLO c.example", "MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>"],
            "MAIL FROM:<x@b.example>",
            (503, "5.5.1"),
        ),
        (
            ["EHLO c.example", "MAIL FROM:<a@b.example>", "RCPT TO:<c@d.example>", "RSET"],
            "RCPT TO:<c@d.example>",
            (503, "5.5.1"),
        ),
        (["HELO c.example"], "MAIL FROM:<a@b.example> SIZE=10", (555, "5.5.4")),
        (["EHLO c.example"], "MAIL FROM:<a@b.example> SIZE=2000", (552, "5.3.4")),
    ],
)
def test_out_of_order_or_refused_command_is_invalid(
    setup: list[str], line: str, expected: tuple[int, str]
) -> None:
    conn = connect(max_message_size=1000)
    for earlier in setup:
        command(conn, earlier)
    state = conn.state
    assert code(command(conn, line, Reply.make(*expected))) == expected
    assert conn.state is state


def test_data_with_only_refused_recipients_has_no_valid_recipients() -> None:
    conn = ready()
    command(conn, "MAIL FROM:<a@b.example>")
    command(conn, "RCPT TO:<c@d.example>", REFUSED)
    assert code(command(conn, "DATA")) == (554, "5.5.1")


def test_recipients_beyond_the_limit_are_deferred() -> None:
    conn = in_transaction(recipients=2, max_recipients=2)
    assert code(command(conn, "RCPT TO:<third@d.example>")) == (452, "4.5.3")
    assert conn.accepted_recipients == 2


def test_refused_recipients_do_not_count_towards_the_limit() -> None:
    conn = in_transaction(recipients=1, max_recipients=2)
    command(conn, "RCPT TO:<nobody@d.example>", REFUSED)
    assert isinstance(command(conn, "RCPT TO:<second@d.example>"), RcptTo)


def test_new_transaction_starts_with_no_recipients() -> None:
    conn = in_transaction(recipients=2, max_recipients=2)
    command(conn, "RSET")
    command(conn, "MAIL FROM:<a@b.example>")
    assert isinstance(command(conn, "RCPT TO:<c@d.example>"), RcptTo)


# -- pipelining ------------------------------------------------------------------------------

PIPELINED = (
    b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\nDATA\r\n"
    b"Subject: x\r\n\r\n..body\r\n.\r\nQUIT\r\n"
)


def test_next_event_pauses_until_the_command_is_answered() -> None:
    conn = ready()
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    assert conn.next_event() == Noop()
    assert conn.next_event() is PAUSED
    conn.send(OK)
    assert conn.next_event() == Noop()


def test_pipelined_transaction_in_one_packet() -> None:
    conn = ready()
    conn.receive_data(PIPELINED)
    assert conn.next_event() == MailFrom("a@b.example")
    conn.send(OK)
    assert conn.next_event() == RcptTo("c@d.example")
    conn.send(OK)
    assert conn.next_event() == RcptTo("e@f.example")
    conn.send(REFUSED)
    assert conn.next_event() == Data()
    conn.send(GO_AHEAD)
    assert drain(conn) == [BodyChunk(b"Subject: x\r\n\r\n..body\r\n"), BodyEnd(), PAUSED]
    conn.send(OK)
    assert conn.state is State.READY
    assert conn.next_event() == Quit()


def test_refused_data_makes_the_pipelined_body_commands() -> None:
    conn = in_transaction()
    conn.receive_data(b"DATA\r\nNOOP\r\n")
    assert conn.next_event() == Data()
    conn.send(Reply.make(451, "4.3.0", "Try later"))
    assert conn.state is State.RCPT
    assert conn.next_event() == Noop()


@pytest.mark.parametrize("point", range(len(PIPELINED) + 1))
def test_pipelined_packet_split_anywhere_gives_the_same_events(point: int) -> None:
    conn = ready()
    events = []
    for piece in split_at(PIPELINED, point):
        conn.receive_data(piece)
        events += answer_all(conn)
    assert [e for e in events if not isinstance(e, BodyChunk)] == [
        MailFrom("a@b.example"),
        RcptTo("c@d.example"),
        RcptTo("e@f.example"),
        Data(),
        BodyEnd(),
        Quit(),
    ]
    assert b"".join(e.data for e in events if isinstance(e, BodyChunk)) == (
        b"Subject: x\r\n\r\n..body\r\n"
    )


def answer_all(conn: ServerConnection) -> list[Event]:
    """Play a session that accepts everything; the events seen until more data is needed."""
    events: list[Event] = []
    while conn.state is not State.CLOSED:
        event = conn.next_event()
        if isinstance(event, Sentinel):
            assert event is NEED_DATA
            break
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
        if isinstance(event, Invalid):
            conn.send(event.reply)
        elif isinstance(event, Data):
            conn.send(GO_AHEAD)
        elif isinstance(event, Quit):
            conn.send(BYE)
        elif not isinstance(event, BodyChunk | BodyRefused):
            conn.send(OK)
    return events


# -- the body through the connection ---------------------------------------------------------


def test_body_then_final_reply_returns_to_ready() -> None:
    conn = in_transaction()
    command(conn, "DATA", GO_AHEAD)
    assert conn.state is State.DATA
    conn.receive_data(b"hello\r\n.\r\n")
    assert drain(conn) == [BodyChunk(b"hello\r\n"), BodyEnd(), PAUSED]
    conn.send(OK)
    assert (conn.state, conn.accepted_recipients) == (State.READY, 0)


@pytest.mark.parametrize("mode", ["refuse", "normalise"])
def test_bare_newline_mode_reaches_the_body(mode: str) -> None:
    conn = in_transaction(bare_newlines=mode)
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"a\n.\nb\r\n.\r\n")
    events = drain(conn)
    if mode == "refuse":
        assert isinstance(events[0], BodyRefused) and events[0].reply.code == 550
    else:
        assert events[0] == BodyChunk(b"a\r\n..\r\nb\r\n")
    assert events[1:] == [BodyEnd(), PAUSED]


def test_refused_body_gets_its_final_reply_after_the_end() -> None:
    conn = in_transaction(max_message_size=5)
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"0123456789\r\n.\r\n")
    refused, end, paused = drain(conn)
    assert isinstance(refused, BodyRefused) and (end, paused) == (BodyEnd(), PAUSED)
    conn.send(refused.reply)
    assert conn.state is State.READY


def test_body_reads_received_before_next_event_are_read_in_order() -> None:
    # In DATA the core hands received bytes to the body reader without its command buffer.
    conn = in_transaction()
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"one\r\n")
    conn.receive_data(b"two\r")
    assert conn.buffered == 9
    conn.receive_data(b"\n.\r\nNOOP\r\n")
    assert drain(conn) == [BodyChunk(b"one\r\ntwo\r\n"), BodyEnd(), PAUSED]
    conn.receive_data(b"QUIT\r\n")  # pipelined while the final reply is owed
    conn.send(OK)
    assert conn.next_event() == Noop()
    conn.send(OK)
    assert conn.next_event() == Quit() and conn.buffered == 0


def test_bytes_before_the_354_and_after_it_stay_in_order() -> None:
    conn = in_transaction()
    conn.receive_data(b"DATA\r\nfirst\r\n")
    assert conn.next_event() == Data()
    conn.send(GO_AHEAD)
    conn.receive_data(b"second\r\n.\r\n")
    assert drain(conn) == [BodyChunk(b"first\r\nsecond\r\n"), BodyEnd(), PAUSED]


def test_a_421_in_data_drops_the_unread_body() -> None:
    conn = in_transaction()
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"never read\r\n")
    conn.send(Reply.make(421, "4.4.2", "Timeout"))
    assert (conn.state, conn.buffered, conn.next_event()) == (State.CLOSED, 0, PAUSED)


def test_body_text_line_limit_comes_from_the_connection() -> None:
    conn = in_transaction(max_text_line=4)
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"12345\r\n.\r\n")
    assert isinstance(drain(conn)[0], BodyRefused)


# -- limits on command lines and errors ------------------------------------------------------


@pytest.mark.parametrize(("length", "too_long"), [(510, False), (511, True)])
def test_command_line_limit_includes_crlf(length: int, too_long: bool) -> None:
    conn = ready()
    conn.receive_data(b"NOOP " + b"x" * (length - 5) + b"\r\n")
    event = conn.next_event()
    assert (event == Noop()) is not too_long
    if too_long:
        assert code(event) == (500, "5.5.6")


def test_command_lines_may_end_with_a_bare_lf() -> None:
    conn = ready()
    conn.receive_data(b"NOOP\nRSET\n")
    assert conn.next_event() == Noop()
    conn.send(OK)
    assert conn.next_event() == Reset()


def test_huge_command_line_is_discarded_in_bounded_memory() -> None:
    conn = ready()
    for _ in range(1000):  # 64 MB without a line end
        conn.receive_data(b"x" * 65536)
        assert conn.next_event() is NEED_DATA
        assert conn.buffered <= 512
    conn.receive_data(b"xxx\r\nNOOP\r\n")
    assert code(conn.next_event()) == (500, "5.5.6")
    conn.send(Reply.make(500, "5.5.6", "Error: line too long"))
    assert conn.next_event() == Noop()


def test_huge_line_in_one_read_is_one_error() -> None:
    conn = ready()
    conn.receive_data(b"y" * 100_000 + b"\r\nNOOP\r\n")
    assert code(conn.next_event()) == (500, "5.5.6")


def test_too_many_errors_close_the_connection() -> None:
    conn = ready(max_errors=3)
    for _ in range(3):
        assert code(command(conn, "BOGUS"))[0] == 500
    assert code(command(conn, "BOGUS", Reply.make(421, "4.7.0"))) == (421, "4.7.0")
    assert conn.state is State.CLOSED
    assert conn.next_event() is PAUSED


@pytest.mark.parametrize(
    "line", ["BOGUS", "STARTTLS", "MAIL FROM:<a@b.example>", "RCPT TO:<>", "DATA x"]
)
def test_protocol_errors_count(line: str) -> None:
    conn = in_transaction(max_errors=1)
    conn.errors = 1
    assert code(command(conn, line))[0] == 421


def test_pipelining_outcomes_do_not_count_as_errors() -> None:
    conn = in_transaction(recipients=1, max_recipients=1, max_errors=2)
    for _ in range(10):
        assert code(command(conn, "RCPT TO:<more@d.example>"))[0] == 452
    assert conn.errors == 0


def refuse(conn: ServerConnection, line: str) -> Event | Sentinel:
    """A RCPT the session refuses for the recipient itself (it tells the core so)."""
    conn.receive_data(line.encode() + b"\r\n")
    event = conn.next_event()
    if isinstance(event, RcptTo):
        conn.refused_recipient()
        conn.send(REFUSED)
    elif isinstance(event, Invalid):
        conn.send(event.reply)
    return event


def test_refused_recipients_count_and_the_next_transaction_gets_421() -> None:
    conn = in_transaction(recipients=0, max_errors=3)
    for i in range(5):  # within the transaction: each refused, none cut off yet
        assert isinstance(refuse(conn, f"RCPT TO:<x{i}@d.example>"), RcptTo)
    assert conn.errors == 5
    assert isinstance(command(conn, "RSET"), Reset)
    assert isinstance(command(conn, "NOOP"), Noop)
    event = command(conn, "MAIL FROM:<a@example.org>", Reply.make(421, "4.7.0"))
    assert isinstance(event, Invalid) and code(event) == (421, "4.7.0")
    assert conn.state is State.CLOSED


def test_within_a_transaction_the_cut_comes_past_the_recipient_limit() -> None:
    conn = in_transaction(recipients=0, max_errors=2, max_recipients=4)
    for i in range(5):
        assert isinstance(refuse(conn, f"RCPT TO:<x{i}@d.example>"), RcptTo)
    event = refuse(conn, "RCPT TO:<y@d.example>")
    assert isinstance(event, Invalid) and code(event) == (421, "4.7.0")


def test_quit_over_the_error_limit_is_still_a_quit() -> None:
    conn = in_transaction(recipients=0, max_errors=1)
    for i in range(3):
        refuse(conn, f"RCPT TO:<x{i}@d.example>")
    assert isinstance(command(conn, "QUIT", BYE), Quit)


def test_a_delivered_message_resets_the_error_count() -> None:
    conn = in_transaction(recipients=1, max_errors=2)
    for i in range(3):
        refuse(conn, f"RCPT TO:<x{i}@d.example>")
    assert isinstance(command(conn, "DATA", GO_AHEAD), Data)
    conn.receive_data(b"body\r\n.\r\n")
    assert [type(e) for e in drain(conn)] == [BodyChunk, BodyEnd, Sentinel]
    conn.send(OK)
    assert conn.errors == 0
    assert isinstance(command(conn, "MAIL FROM:<a@example.org>"), MailFrom)


def test_421_names_the_host_when_known() -> None:
    conn = ready(max_errors=1, hostname="mx.example")
    command(conn, "BOGUS")
    event = command(conn, "BOGUS")
    assert isinstance(event, Invalid)
    assert event.reply.lines == ("4.7.0 mx.example Error: too many errors",)


# -- end of file and closing -----------------------------------------------------------------


def test_end_of_file_between_commands() -> None:
    conn = ready()
    conn.receive_data(b"NOOP")
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed(mid_data=False)


def test_end_of_file_in_the_body() -> None:
    conn = in_transaction()
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"partial\r\n")
    conn.receive_data(b"")
    assert drain(conn) == [BodyChunk(b"partial"), ConnectionClosed(mid_data=True)]


def test_pipelined_quit_is_answered_before_the_close() -> None:
    conn = ready()
    conn.receive_data(b"QUIT\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == Quit()
    assert conn.next_event() is PAUSED
    conn.send(BYE)
    assert conn.state is State.CLOSED


def test_421_may_be_sent_at_any_time() -> None:
    conn = in_transaction()
    assert conn.send(Reply.make(421, "4.4.2", "mx Timeout")) == b"421 4.4.2 mx Timeout\r\n"
    assert conn.state is State.CLOSED


def test_nothing_follows_a_421() -> None:
    conn = in_transaction()
    command(conn, "DATA", GO_AHEAD)
    conn.receive_data(b"body\r\n.\r\nQUIT\r\n")
    assert conn.next_event() == BodyChunk(b"body\r\n")
    conn.send(Reply.make(421, "4.3.2", "Shutting down"))
    assert conn.next_event() is PAUSED
    conn.receive_data(b"NOOP\r\n")
    assert (conn.next_event(), conn.buffered) == (PAUSED, 0)


def test_multi_line_reply_is_written_with_continuations() -> None:
    conn = connect()
    conn.receive_data(b"EHLO c.example\r\n")
    conn.next_event()
    wire = conn.send(Reply(250, ("mx.example", "PIPELINING", "SIZE 10")))
    assert wire == b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n"


@pytest.mark.parametrize(
    "misuse",
    [
        lambda c: c.send(OK),  # nothing to answer
        lambda c: c.send(Reply(99, ("x",))),
        lambda c: (c.receive_data(b""), c.receive_data(b"NOOP\r\n")),
    ],
)
def test_local_misuse_raises(misuse: Any) -> None:
    conn = ready()
    with pytest.raises(LocalProtocolError):
        misuse(conn)


def test_send_after_close_raises() -> None:
    conn = ready()
    command(conn, "QUIT", BYE)
    with pytest.raises(LocalProtocolError):
        conn.send(OK)


# -- properties ------------------------------------------------------------------------------

VALID_SESSION = (
    b"EHLO c.example\r\nMAIL FROM:<a@b.example> SIZE=100\r\nRCPT TO:<c@d.example>\r\n"
    b"DATA\r\nline one\r\n..two\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n"
)


TOKENS = st.sampled_from(
    [
        b"EHLO c.example\r\n",
        b"HELO c\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
        b"MAIL FROM:<>\r\n",
        b"RCPT TO:<c@d.example>\r\n",
        b"DATA\r\n",
        b"RSET\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
        b"\r\n.\r\n",
        b".\r\n",
        b"\n.\n",
        b"\r",
        b"\n",
        b".",
        b"x" * 70,
        b"\x00",
        b"\xff",
    ]
)
SESSION_BYTES = st.lists(st.one_of(TOKENS, st.binary(max_size=40)), max_size=40).map(b"".join)


@given(
    SESSION_BYTES,
    st.lists(st.integers(0, 2000), max_size=6),
    st.sampled_from(["refuse", "normalise"]),
)
def test_random_bytes_never_raise(data: bytes, points: list[int], mode: str) -> None:
    conn = connect(max_command_line=64, max_errors=5, max_message_size=200, bare_newlines=mode)
    for packet in [*split_at(data, *points), b""]:
        if conn.state is State.CLOSED:
            break
        conn.receive_data(packet)
        answer_all(conn)


@given(st.lists(st.integers(0, len(VALID_SESSION)), max_size=6))
def test_valid_session_split_anywhere_gives_the_same_events(points: list[int]) -> None:
    def run(pieces: list[bytes]) -> list[Event]:
        conn = connect()
        events: list[Event] = []
        for piece in pieces:
            conn.receive_data(piece)
            events += answer_all(conn)
        return events

    split, whole = run(split_at(VALID_SESSION, *points)), run([VALID_SESSION])

    def merged(events: list[Event]) -> list[object]:
        body = b"".join(e.data for e in events if isinstance(e, BodyChunk))
        return [body, *(e for e in events if not isinstance(e, BodyChunk))]

    assert merged(split) == merged(whole)
    assert merged(whole)[0] == b"line one\r\n..two\r\n"
    assert Quit() in whole
