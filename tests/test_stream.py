"""The hot path's byte stream and an upstream connection's reply reading over real sockets
(socket pairs): the paths that compute a deadline only when a call must wait."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import trio

from moxy.config import Timeouts
from moxy.connection import Connection, LegError, UpstreamSettings
from moxy.lookup.base import Destination, DestinationGroup
from moxy.smtp.replies import Reply
from moxy.stream import CANCEL_EVERY, Stream, StreamTimeout
from moxy.upstream import Leg
from peers.dark import black_hole, refusing_address
from smtp.splits import split_at


@pytest.fixture
def pair() -> Iterator[tuple[Stream, socket.socket]]:
    """A Stream and the plain socket at the other end."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    stream = Stream(ours)
    yield stream, theirs
    stream.socket.close()
    theirs.close()


async def test_receive_within_takes_what_arrived_without_a_deadline(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, peer = pair
    peer.send(b"250 Ok\r\n")
    assert await stream.receive_within(1024, 5.0) == b"250 Ok\r\n"
    assert stream.deadline == 0.0


async def test_receive_within_waits_and_keeps_its_deadline(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, peer = pair

    async def answer_later() -> None:
        await trio.sleep(0.05)
        peer.send(b"late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        started = trio.current_time()
        assert await stream.receive_within(1024, 30.0) == b"late"
    assert started + 30.0 <= stream.deadline <= trio.current_time() + 30.0


async def test_receive_within_times_out(pair: tuple[Stream, socket.socket]) -> None:
    stream, _ = pair
    with pytest.raises(StreamTimeout):
        await stream.receive_within(1024, 0.05)


async def test_receive_within_is_interruptible_like_receive(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, _ = pair

    async def interrupt_later() -> None:
        await trio.sleep(0.05)
        stream.interrupt()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(interrupt_later)
        with pytest.raises(StreamTimeout):
            await stream.receive_within(1024, 30.0, interruptible=True)
    with pytest.raises(StreamTimeout):  # and every later wait
        await stream.receive_within(1024, 30.0, interruptible=True)


async def test_send_within_waits_for_a_slow_reader_and_sends_everything(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, peer = pair
    data = bytes(range(256)) * 40000  # ~10 MB: far more than the socket buffers hold
    received = bytearray()

    async def read_all() -> None:
        while len(received) < len(data):
            await trio.lowlevel.wait_readable(peer)
            received.extend(peer.recv(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await stream.send_within(data, 30.0)
    assert received == data


async def test_send_within_times_out_when_the_peer_never_reads(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, _ = pair
    with pytest.raises(StreamTimeout):
        await stream.send_within(b"x" * (32 << 20), 0.2)



async def test_a_cancelled_reader_notices_within_cancel_every_reads(
    pair: tuple[Stream, socket.socket],
) -> None:
    """A client that never lets a read wait cannot keep a cancelled session going: a read asks
    about cancellation on every CANCEL_EVERY-th call, and any read that must wait does."""
    stream, peer = pair
    peer.send(b"x" * (4 * CANCEL_EVERY))
    reads = 0
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            while True:
                await stream.receive_within(1, 5.0)
                reads += 1
    assert reads < CANCEL_EVERY
    stream.socket.recv(4096)  # the rest: now a read must wait
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await stream.receive_within(1, 5.0)

# -- Connection.read_reply over a socket -----------------------------------------------------


def connection(stream: Stream, command_timeout: float = 30.0) -> Connection:
    timeouts = Timeouts(upstream_command=command_timeout)
    return Connection(stream, Destination("127.0.0.1", 25), UpstreamSettings("moxy.test", timeouts))


WIRE = b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n250 2.1.0 Ok\r\n"


@pytest.mark.parametrize("point", range(1, len(WIRE)))
async def test_replies_split_across_reads_at_any_offset(
    pair: tuple[Stream, socket.socket], point: int
) -> None:
    stream, peer = pair
    conn = connection(stream)

    async def write_in_two() -> None:
        for piece in split_at(WIRE, point):
            peer.send(piece)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write_in_two)
        first = await conn.read_reply("ehlo", 30.0, more=True)  # as if two were pipelined
        second = await conn.read_reply("mail", 30.0)
    assert first == Reply(250, ("mx.example", "PIPELINING", "SIZE 100"))
    assert second == Reply(250, ("2.1.0 Ok",))


async def test_a_reply_beyond_the_ones_asked_for_is_out_of_step(
    pair: tuple[Stream, socket.socket],
) -> None:
    stream, peer = pair
    conn = connection(stream)
    peer.send(WIRE)  # two replies, where one command was sent
    with pytest.raises(LegError) as caught:
        await conn.read_reply("ehlo", 1.0)
    assert caught.value.stage == "ehlo"
    assert caught.value.detail.startswith("out of step: 14 octets after the reply")


async def test_a_reply_left_half_written_times_out(pair: tuple[Stream, socket.socket]) -> None:
    stream, peer = pair
    conn = connection(stream)
    peer.send(b"250-mx.example\r\n250-PIPE")
    with pytest.raises(LegError) as caught:
        await conn.read_reply("ehlo", 0.1)
    assert (caught.value.stage, caught.value.detail) == ("ehlo", "no reply within 0.1s")


async def test_a_close_mid_reply_is_a_lost_leg(pair: tuple[Stream, socket.socket]) -> None:
    stream, peer = pair
    conn = connection(stream)
    peer.send(b"250-mx.example\r\n")
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(LegError) as caught:
        await conn.read_reply("ehlo", 5.0)
    assert caught.value.detail == "connection closed by upstream"


# -- Stream.connect ------------------------------------------------------------------------------


async def test_connect_over_loopback_is_ready_at_once_and_sets_nodelay() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        stream = await Stream.connect(socket.AF_INET, listener.getsockname(), 5.0)
        try:
            assert stream.socket.getpeername() == listener.getsockname()
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            peer, _ = listener.accept()
            with peer:
                peer.sendall(b"220 hi\r\n")
                assert await stream.receive_within(100, 5.0) == b"220 hi\r\n"
        finally:
            await stream.aclose()


async def test_connect_refused_is_an_oserror() -> None:
    host, port = refusing_address().rsplit(":", 1)
    with pytest.raises(OSError):
        await Stream.connect(socket.AF_INET, (host, int(port)), 5.0)


async def test_connect_that_hangs_times_out() -> None:
    with black_hole() as address:
        host, port = address.rsplit(":", 1)
        with pytest.raises(StreamTimeout):
            await Stream.connect(socket.AF_INET, (host, int(port)), 0.2)


# -- the commit point -------------------------------------------------------------------------


async def test_a_cancelled_leg_never_sends_the_end_of_data_sequence(
    pair: tuple[Stream, socket.socket],
) -> None:
    """Writes are no cancellation points (stream.py); the end-of-data write checks first, so a
    session cancelled at shutdown cannot commit a message whose verdict it would never read."""
    stream, peer = pair
    conn = connection(stream)
    leg = Leg(DestinationGroup((conn.destination,)), conn.settings)
    leg.conn, leg.in_data = conn, True
    await leg.send_body(b"Subject: x\r\n\r\nbody\r\n")  # a write, even inside a cancelled scope
    with trio.CancelScope() as scope:
        scope.cancel()
        await leg.send_body(b"more\r\n")
        with pytest.raises(trio.Cancelled):
            await leg.finish(b"tail\r\n")
    assert peer.recv(4096) == b"Subject: x\r\n\r\nbody\r\nmore\r\n"  # no tail, no ".\r\n"
