"""The test peers themselves: if these fail, no integration result can be trusted."""

from __future__ import annotations

import hashlib
import smtplib
import socket
import threading
import time
from collections.abc import Callable

import pytest
import trio

from peers.client import SmtpClient, stuff
from peers.recorder import DISCONNECT, HANG, Recorder, delay, reply_421
from peers.sink import SmtpSink, require_binary, swaks

MakeRecorder = Callable[..., Recorder]


def smtp(recorder: Recorder) -> smtplib.SMTP:
    return smtplib.SMTP(recorder.host, recorder.port, local_hostname="client.test", timeout=5)


# --- recorder --------------------------------------------------------------------------------


def test_recorder_records_a_message_as_it_was_on_the_wire(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    with smtp(recorder) as client:
        client.sendmail(
            "a@example.com", ["b@example.org", "c@example.org"], b"S: x\r\n\r\n.dot\r\n"
        )
    recorder.wait_closed()
    [message] = recorder.messages
    assert message.helo == "client.test"
    assert message.mail_from == "a@example.com"
    assert message.rcpts == ["b@example.org", "c@example.org"]
    assert message.data == b"S: x\r\n\r\n..dot\r\n"  # still dot-stuffed
    assert message.accepted
    assert recorder.connections[0].quit
    assert recorder.verbs() == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert recorder.errors == []


def test_recorder_answers_scripted_replies_per_stage_and_recipient(
    make_recorder: MakeRecorder,
) -> None:
    recorder = make_recorder(
        {"end_of_data": "554 5.7.1 Spam"}, rcpt_script={"no@example.org": "550 5.1.1 Unknown"}
    )
    with smtp(recorder) as client:
        client.ehlo()
        client.mail("a@example.com")
        assert client.rcpt("no@example.org") == (550, b"5.1.1 Unknown")
        assert client.rcpt("yes@example.org")[0] == 250
        assert client.data(b"hello") == (554, b"5.7.1 Spam")
    [message] = recorder.messages
    assert message.rcpts == ["yes@example.org"]
    assert not message.accepted
    assert recorder.delivered == []


def test_recorder_steps_in_a_sequence_apply_to_successive_occurrences(
    make_recorder: MakeRecorder,
) -> None:
    recorder = make_recorder({"mail": ["451 4.3.0 Try later", "250 2.1.0 Ok"]})
    with smtp(recorder) as client:
        client.ehlo()
        assert client.mail("a@example.com")[0] == 451
        assert client.mail("a@example.com")[0] == 250
        client.rset()
        assert client.mail("a@example.com")[0] == 250  # the last step repeats


def test_recorder_421_closes_the_connection(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"ehlo": reply_421()})
    with smtp(recorder) as client, pytest.raises(smtplib.SMTPServerDisconnected):
        client.ehlo()
        client.noop()
    assert recorder.connections[0].disconnected_by_script


def test_recorder_disconnect_at_greeting(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"greeting": DISCONNECT})
    with pytest.raises(smtplib.SMTPServerDisconnected):
        smtp(recorder)


def test_recorder_delay_then_reply(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"mail": delay(0.3, "452 4.3.1 Slow")})
    with smtp(recorder) as client:
        client.ehlo()
        started = time.monotonic()
        assert client.mail("a@example.com")[0] == 452
        assert time.monotonic() - started >= 0.3


def test_recorder_hang_holds_the_reply_until_the_peer_leaves(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"data": HANG})
    client = smtplib.SMTP(recorder.host, recorder.port, timeout=0.3)
    client.ehlo()
    client.mail("a@example.com")
    client.rcpt("b@example.org")
    with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
        client.docmd("DATA")
    client.close()
    recorder.wait_closed()


def test_recorder_stop_ends_hung_and_delayed_connections(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"greeting": HANG, "ehlo": delay(60)})
    hung = socket.create_connection((recorder.host, recorder.port))
    recorder.wait_for(lambda: len(recorder.connections) == 1)
    started = time.monotonic()
    recorder.stop()
    assert time.monotonic() - started < 2
    assert recorder.connections[0].closed.is_set()
    hung.close()


def test_recorder_without_esmtp_refuses_ehlo_and_takes_helo(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder(esmtp=False)
    with smtp(recorder) as client:
        assert client.ehlo()[0] == 502
        assert client.helo()[0] == 250
        client.sendmail("a@example.com", ["b@example.org"], b"x\r\n")
    assert recorder.verbs()[:2] == ["EHLO", "HELO"]
    assert recorder.messages[0].helo == "client.test"


def test_recorder_fails_mid_body_after_body_after_bytes(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"body": DISCONNECT}, body_after=10)
    sock = socket.create_connection((recorder.host, recorder.port))
    sock.sendall(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n0123456789abc")
    recorder.wait_closed()
    sock.close()
    assert recorder.messages == []
    assert recorder.connections[0].disconnected_by_script


def test_recorder_without_keep_data_keeps_hash_and_head(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder(keep_data=False)
    body = b"line\r\n" * 20000
    with smtp(recorder) as client:
        client.sendmail("a@example.com", ["b@example.org"], body)
    [message] = recorder.messages
    assert message.data is None
    assert message.size == len(body)
    assert message.head == body[: 64 * 1024]
    assert message.sha256 == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("lenient", [False, True])
def test_recorder_end_of_data_strict_or_lenient_about_bare_lf(
    make_recorder: MakeRecorder, lenient: bool
) -> None:
    """The lenient recorder is the vulnerable upstream that SMTP smuggling exploits."""
    recorder = make_recorder(lenient_end_of_data=lenient)
    sock = socket.create_connection((recorder.host, recorder.port))
    sock.sendall(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        b"Subject: one\r\n\r\nbody\n.\nMAIL FROM:<x@y>\r\nRCPT TO:<v@w>\r\nDATA\r\n"
        b"smuggled\r\n.\r\nQUIT\r\n"
    )
    recorder.wait_closed()
    sock.close()
    if lenient:
        assert [m.mail_from for m in recorder.messages] == ["a@b", "x@y"]
        assert recorder.messages[1].data == b"smuggled\r\n"
    else:
        [message] = recorder.messages
        assert message.data is not None
        assert message.data.endswith(
            b"body\n.\nMAIL FROM:<x@y>\r\nRCPT TO:<v@w>\r\nDATA\r\nsmuggled\r\n"
        )


def test_recorder_answers_pipelined_commands_in_order(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder(rcpt_script={"bad@d": "550 5.1.1 No"})
    sock = socket.create_connection((recorder.host, recorder.port))
    sock.sendall(
        b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<bad@d>\r\nDATA\r\n.\r\nQUIT\r\n"
    )
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    sock.close()
    codes = [line[:3] for line in data.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220", b"250", b"250", b"250", b"550", b"354", b"250", b"221"]
    assert recorder.messages[0].data == b""


def test_recorder_threads_serve_many_connections_at_once(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder({"greeting": delay(0.2)})
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with smtp(recorder) as client:
                client.sendmail("a@example.com", ["b@example.org"], b"x\r\n")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(recorder.messages) == 8
    assert time.monotonic() - started < 1.5  # concurrent, not 8 x 0.2 s in a row


# --- raw client --------------------------------------------------------------------------------


def test_stuff_doubles_leading_dots_and_ends_with_crlf() -> None:
    assert stuff(b".a\r\nb\r\n.\r\n") == b"..a\r\nb\r\n..\r\n"
    assert stuff(b"x") == b"x\r\n"


async def test_raw_client_against_recorder(make_recorder: MakeRecorder) -> None:
    recorder = make_recorder()
    async with await SmtpClient.connect(recorder.host, recorder.port) as client:
        ehlo = await client.greeting_and_ehlo()
        assert "PIPELINING" in ehlo.lines
        envelope, final = await client.send_message("a@b", ["c@d"], stuff(b".x\r\n"))
        assert [r.code for r in envelope] == [250, 250, 354]
        assert final is not None and final.code == 250 and final.enhanced == "2.0.0"
        assert (await client.command("QUIT")).code == 221
        assert await client.expect_closed() == b""
    await trio.to_thread.run_sync(recorder.wait_for, lambda: recorder.connections[0].quit)
    assert recorder.messages[0].data == b"..x\r\n"


# --- smtp-sink and swaks -----------------------------------------------------------------------


def test_smtp_sink_dumps_each_message(smtp_sink: SmtpSink) -> None:
    with smtplib.SMTP(smtp_sink.host, smtp_sink.port, local_hostname="client.test") as client:
        client.sendmail("a@example.com", ["b@example.org", "c@example.org"], b"S: 1\r\n\r\n.x\r\n")
        client.sendmail("a@example.com", ["d@example.org"], b"S: 2\r\n\r\nhi\r\n")
    messages = smtp_sink.wait_for_messages(2)
    assert len(messages) == 2
    by_subject = {m.lines[0]: m for m in messages}
    first = by_subject[b"S: 1"]
    assert first.helo == "client.test"
    assert first.mail_from.startswith("<a@example.com>")
    assert first.rcpts == ("<b@example.org>", "<c@example.org>")
    assert first.text == b"S: 1\n\n.x\n"  # LF endings, dot-stuffing undone
    assert by_subject[b"S: 2"].rcpts == ("<d@example.org>",)


def test_smtp_sink_can_be_told_to_reject(make_smtp_sink: Callable[..., SmtpSink]) -> None:
    sink = make_smtp_sink("-f", "RCPT")
    with smtplib.SMTP(sink.host, sink.port) as client:
        client.ehlo()
        client.mail("a@example.com")
        assert client.rcpt("b@example.org")[0] // 100 == 5


def test_swaks_sends_to_smtp_sink(smtp_sink: SmtpSink) -> None:
    result = swaks(
        "--server", smtp_sink.address, "--from", "a@example.com", "--to", "b@example.org",
        "--header", "Subject: swaks", "--body", "hello from swaks",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = smtp_sink.wait_for_messages(1)
    assert message.rcpts == ("<b@example.org>",)
    assert b"hello from swaks" in message.text


def test_a_missing_binary_fails_the_test_and_names_the_package() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install postfix.*make test"):
        require_binary("/nonexistent/smtp-sink", "postfix")
