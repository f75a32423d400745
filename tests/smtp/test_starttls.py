"""STARTTLS (RFC 3207) and SMTPUTF8 (RFC 6531) in the protocol core: what is offered, command
order, and the reset after the 220 that throws away whatever was pipelined behind STARTTLS."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from moxy.smtp.events import (
    NEED_DATA,
    PAUSED,
    BodyChunk,
    BodyRefused,
    ConnectionClosed,
    Data,
    Hello,
    Invalid,
    MailFrom,
    RcptTo,
    Sentinel,
    StartTls,
)
from moxy.smtp.replies import Reply
from moxy.smtp.server import State

from .splits import split_at
from .test_server import OK, code, command, connect, ready

GO = Reply.make(220, "2.0.0", "Ready to start TLS")


def test_starttls_is_offered_only_when_the_session_can_do_it_and_not_twice() -> None:
    assert "STARTTLS" not in ready().extensions
    conn = ready(starttls=True)
    assert "STARTTLS" in conn.extensions
    assert command(conn, "STARTTLS", GO) == StartTls()
    assert "STARTTLS" not in conn.extensions


def test_starttls_without_a_certificate_is_not_implemented() -> None:
    assert code(command(ready(), "STARTTLS")) == (502, "5.5.1")


def test_starttls_needs_ehlo_and_no_transaction_and_is_refused_once_active() -> None:
    conn = connect(starttls=True)
    assert code(command(conn, "STARTTLS")) == (503, "5.5.1")
    command(conn, "EHLO client.example")
    command(conn, "MAIL FROM:<a@b.example>")
    assert code(command(conn, "STARTTLS")) == (503, "5.5.1")
    command(conn, "RSET")
    command(conn, "STARTTLS", GO)
    command(conn, "EHLO client.example")
    assert code(command(conn, "STARTTLS")) == (554, "5.5.1")


def test_after_220_everything_pipelined_behind_starttls_is_discarded_and_hello_forgotten() -> None:
    conn = ready(starttls=True)
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@y.example>\r\n")
    assert conn.next_event() == StartTls()
    assert conn.next_event() is PAUSED
    conn.send(GO)
    assert conn.discarded == len(b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<x@y.example>\r\n")
    assert conn.tls and conn.state is State.GREETED and conn.hello is None
    assert conn.next_event() is NEED_DATA  # nothing of the injected commands is left
    # Over TLS, the client must greet again before MAIL.
    assert code(command(conn, "MAIL FROM:<a@b.example>")) == (503, "5.5.1")
    assert command(conn, "EHLO again.example") == Hello("EHLO", "again.example")
    assert isinstance(command(conn, "MAIL FROM:<a@b.example>"), MailFrom)


def test_a_refused_starttls_keeps_the_session_and_its_input() -> None:
    conn = ready(starttls=True)
    conn.receive_data(b"STARTTLS\r\nNOOP\r\n")
    assert conn.next_event() == StartTls()
    conn.send(Reply.make(454, "4.7.0", "TLS not available"))
    assert not conn.tls and conn.hello == "EHLO"
    assert conn.next_event() is not NEED_DATA  # NOOP is still there


def test_require_tls_refuses_mail_until_starttls() -> None:
    conn = ready(starttls=True, require_tls=True)
    assert code(command(conn, "MAIL FROM:<a@b.example>")) == (530, "5.7.0")
    command(conn, "STARTTLS", GO)
    command(conn, "EHLO client.example")
    assert isinstance(command(conn, "MAIL FROM:<a@b.example>"), MailFrom)


def test_smtputf8_transaction_takes_utf8_recipients_and_the_next_one_does_not() -> None:
    conn = ready()
    event = command(conn, "MAIL FROM:<jöran@bücher.example> SMTPUTF8")
    assert isinstance(event, MailFrom) and event.smtputf8
    assert event.address == "jöran@bücher.example"
    assert command(conn, "RCPT TO:<用户@例子.example>") == RcptTo("用户@例子.example")
    command(conn, "RSET")
    command(conn, "MAIL FROM:<a@b.example>")
    event = command(conn, "RCPT TO:<用户@例子.example>")
    assert isinstance(event, Invalid) and code(event) == (553, "5.6.7")


def test_utf8_that_is_not_valid_utf8_is_a_syntax_error() -> None:
    conn = ready()
    conn.receive_data(b"MAIL FROM:<caf\xe9@b.example> SMTPUTF8\r\n")
    assert code(conn.next_event()) == (501, "5.1.7")
    conn.send(Reply.make(501, "5.1.7", "x"))
    conn.receive_data(b"MAIL FROM:<a@b.example> SMTPUTF8\r\nRCPT TO:<\xc3@b.example>\r\n")
    conn.next_event()
    conn.send(OK)
    assert code(conn.next_event()) == (501, "5.1.3")


TOKENS_TLS = st.sampled_from(
    [b"EHLO a.example\r\n", b"STARTTLS\r\n", b"MAIL FROM:<a@b.example> SMTPUTF8\r\n",
     b"RCPT TO:<\xc3\xa9@d.example>\r\n", b"DATA\r\n", b"\r\n.\r\n", b"RSET\r\n", b"\xff"]
)


RANDOM_TLS = st.lists(st.one_of(TOKENS_TLS, st.binary(max_size=20)), max_size=30).map(b"".join)


@given(
    st.lists(st.one_of(TOKENS_TLS, st.binary(max_size=20)), max_size=3).map(b"".join),
    RANDOM_TLS,
    st.lists(st.integers(0, 600), max_size=5),
)
def test_random_input_with_starttls_never_raises_and_nothing_survives_a_220(
    before: bytes, after: bytes, points: list[int]
) -> None:
    """Random input around an EHLO and a STARTTLS: never an exception, and at every 220 for
    STARTTLS nothing the client sent before it is left to read. Without the random bytes in
    front, the STARTTLS is always answered with 220."""
    data = before + b"EHLO client.example\r\nSTARTTLS\r\n" + after
    conn = connect(max_command_line=64, max_errors=5, starttls=True, require_tls=True)
    handshakes = 0
    for packet in [*split_at(data, *points), b""]:
        if conn.state is State.CLOSED:
            break
        conn.receive_data(packet)
        while conn.state is not State.CLOSED:
            event = conn.next_event()
            if isinstance(event, Sentinel | ConnectionClosed):
                break
            if isinstance(event, StartTls):
                conn.send(GO)
                assert conn.buffered == 0 and conn.tls
                handshakes += 1
            elif isinstance(event, Invalid):
                conn.send(event.reply)
            elif isinstance(event, Data):
                conn.send(Reply(354, ("go",)))
            elif not isinstance(event, BodyChunk | BodyRefused):
                conn.send(OK)
    if not before:
        assert handshakes >= 1
