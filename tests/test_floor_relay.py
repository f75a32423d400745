"""The trio floor relay of the benchmarks (benchmarks/floor_relay.py) is a correct relay for
what the benchmark sends: Moxy's cost is compared with it, so it must not be cheaper by
skipping work a relay has to do."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from peers.client import SmtpClient, stuff
from peers.recorder import DISCONNECT, Recorder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import floor_relay


async def _relay(nursery: trio.Nursery, recorder: Recorder, pool: int = 4) -> int:
    relay = floor_relay.Relay((recorder.host, recorder.port), pool, 10.0)
    port: int = await nursery.start(floor_relay.serve, ("127.0.0.1", 0), relay)
    return port


@pytest.fixture
async def relay_and_recorder(
    make_recorder: Callable[..., Recorder], nursery: trio.Nursery
) -> AsyncIterator[tuple[int, Recorder]]:
    recorder = make_recorder(rcpt_script={"refused@example.test": "550 5.1.1 No such user"})
    yield await _relay(nursery, recorder), recorder
    nursery.cancel_scope.cancel()


async def _client(port: int) -> SmtpClient:
    client = await SmtpClient.connect("127.0.0.1", port)
    await client.greeting_and_ehlo()
    return client


def _body(data: bytes | None) -> bytes:
    """What the client sent, after the floor's Received header (two lines)."""
    assert data is not None and data.startswith(b"Received: from "), data
    return data.split(b"\r\n", 2)[2]


async def _eventually(condition: Callable[[], object]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.01)


async def test_pipelined_dot_stuffed_message_arrives_unchanged(
    relay_and_recorder: tuple[int, Recorder],
) -> None:
    port, recorder = relay_and_recorder
    body = stuff(b"Subject: x\r\n\r\n.leading dot\r\n..two\r\n.\r\nend")
    client = await _client(port)
    await client.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
                      b"RCPT TO:<refused@example.test>\r\nDATA\r\n")
    codes = [r.code for r in await client.replies(4)]
    assert codes == [250, 250, 550, 354]
    # The end of data and the next command in one write, as a pipelining client may send.
    await client.send(body + b".\r\nNOOP\r\n")
    assert [r.code for r in await client.replies(2)] == [250, 250]
    await client.aclose()
    [message] = recorder.delivered
    assert _body(message.data) == body
    assert message.rcpts == ["b@example.test"]


@pytest.mark.parametrize("pieces", [
    [b"line\r\n", b".", b"\r\n"],
    [b"line\r", b"\n.\r\n"],
    [b"line\r\n.\r", b"\n"],
    [b"l", b"i", b"n", b"e", b"\r", b"\n", b".", b"\r", b"\n"],
])
async def test_end_of_data_split_across_reads(
    relay_and_recorder: tuple[int, Recorder], pieces: list[bytes]
) -> None:
    port, recorder = relay_and_recorder
    client = await _client(port)
    for line in ("MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>", "DATA"):
        await client.command(line)
    for piece in pieces:
        await client.send(piece)
        await trio.sleep(0.02)  # each its own read
    assert (await client.reply()).code == 250
    [message] = recorder.delivered
    assert _body(message.data) == b"line\r\n"


async def test_empty_message_and_rset(relay_and_recorder: tuple[int, Recorder]) -> None:
    port, recorder = relay_and_recorder
    client = await _client(port)
    await client.command("MAIL FROM:<a@example.test>")
    await client.command("RCPT TO:<b@example.test>")
    assert (await client.command("RSET")).code == 250
    assert (await client.command("DATA")).code == 554  # the transaction is gone
    _, final = await client.send_message("c@example.test", ["d@example.test"], b"")
    assert final is not None and final.code == 250
    [message] = recorder.delivered
    assert (message.mail_from, message.rcpts, _body(message.data)) == ("c@example.test",
                                                                       ["d@example.test"], b"")
    assert recorder.verbs(0).count("RSET") == 1  # before the second MAIL, in its write


async def test_destination_refusing_data_is_passed_back(
    make_recorder: Callable[..., Recorder], nursery: trio.Nursery
) -> None:
    recorder = make_recorder({"data": "554 5.7.1 Not from you"})
    client = await _client(await _relay(nursery, recorder))
    envelope, final = await client.send_message("a@example.test", ["b@example.test"], b"x\r\n")
    assert envelope[-1].code == 554 and final is None
    assert recorder.delivered == []
    nursery.cancel_scope.cancel()


async def test_client_gone_mid_body_delivers_nothing(
    relay_and_recorder: tuple[int, Recorder],
) -> None:
    port, recorder = relay_and_recorder
    client = await _client(port)
    for line in ("MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>", "DATA"):
        await client.command(line)
    await client.send(b"half a message\r\n")
    await client.aclose()
    await _eventually(lambda: recorder.connections and recorder.connections[0].closed.is_set())
    assert recorder.messages == []
    # The next session gets a new upstream connection (the abandoned one was not pooled).
    client = await _client(port)
    _, final = await client.send_message("a@example.test", ["b@example.test"], b"whole\r\n")
    assert final is not None and final.code == 250
    assert len(recorder.connections) == 2 and len(recorder.delivered) == 1


async def test_pooled_connection_reused_and_replaced_when_gone(
    make_recorder: Callable[..., Recorder], nursery: trio.Nursery
) -> None:
    # The first connection's second MAIL is answered by a disconnect.
    recorder = make_recorder({"mail": ["250 2.1.0 Ok", DISCONNECT, "250 2.1.0 Ok"]})
    port = await _relay(nursery, recorder)
    for n in range(3):
        client = await _client(port)
        _, final = await client.send_message("a@example.test", ["b@example.test"], b"%d\r\n" % n)
        assert final is not None and final.code == 250
        await client.command("QUIT")
        await client.aclose()
        await trio.sleep(0.05)  # the session ends and hands its connection back
    assert [_body(m.data) for m in recorder.delivered] == [b"0\r\n", b"1\r\n", b"2\r\n"]
    # The first (pooled, then dropped), the replacement (pooled, then reused).
    assert len(recorder.connections) == 2
    nursery.cancel_scope.cancel()


async def test_large_message_streams_intact(
    make_recorder: Callable[..., Recorder], nursery: trio.Nursery
) -> None:
    recorder = make_recorder(keep_data=False)
    client = await _client(await _relay(nursery, recorder))
    body = stuff(b"".join(b"%07d .line of text\r\n" % i for i in range(200_000)))  # ~4.8 MB
    _, final = await client.send_message("a@example.test", ["b@example.test"], body)
    assert final is not None and final.code == 250
    [message] = recorder.delivered
    header = floor_relay.received(b"client.test", "127.0.0.1")
    assert message.head.startswith(header[:60])
    assert message.size == len(header) + len(body)
    nursery.cancel_scope.cancel()


async def test_messages_on_one_client_connection(relay_and_recorder: tuple[int, Recorder]) -> None:
    port, recorder = relay_and_recorder
    client = await _client(port)
    for n in range(3):
        _, final = await client.send_message(f"s{n}@example.test", [f"r{n}@example.test"],
                                             b"%d\r\n" % n)
        assert final is not None and final.code == 250
    assert [(m.mail_from, m.rcpts, _body(m.data)) for m in recorder.delivered] == [
        (f"s{n}@example.test", [f"r{n}@example.test"], b"%d\r\n" % n) for n in range(3)
    ]
    assert recorder.verbs(0).count("RSET") == 0  # a finished transaction needs none


async def test_a_refused_sender_answers_every_rcpt(
    make_recorder: Callable[..., Recorder], nursery: trio.Nursery
) -> None:
    recorder = make_recorder({"mail": ["550 5.7.1 Not you", "250 2.1.0 Ok"]})
    client = await _client(await _relay(nursery, recorder))
    await client.command("MAIL FROM:<a@example.test>")
    replies = [await client.command(f"RCPT TO:<r{n}@example.test>") for n in range(3)]
    assert [r.code for r in replies] == [550, 550, 550]
    assert recorder.verbs(0).count("RCPT") == 1  # only the one pipelined with MAIL
    assert (await client.command("DATA")).code == 554
    assert (await client.command("RSET")).code == 250
    # The next transaction resets the destination's state first and goes through.
    _, final = await client.send_message("b@example.test", ["c@example.test"], b"x\r\n")
    assert final is not None and final.code == 250
    assert recorder.verbs(0)[-4:-2] == ["RSET", "MAIL"]
    nursery.cancel_scope.cancel()
