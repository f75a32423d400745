"""The stream's socket calls: the native build's (moxy._sockio, C) and the pure-Python
fallbacks (moxy.stream.recv_fallback, send_fallback), side by side on real socket pairs."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator

import pytest
import trio

from moxy import native, stream
from moxy.stream import Stream, StreamBroken

Recv = Callable[[int, int], "bytes | None"]
Send = Callable[[int, "bytes | bytearray | memoryview"], int]

_PAIRS: list[tuple[str, Recv, Send]] = [
    ("python", stream.recv_fallback, stream.send_fallback)
]
if "moxy._sockio" in native.compiled():
    from moxy import _sockio

    _PAIRS.append(("c", _sockio.recv, _sockio.send))
# else a pure-Python checkout: `make test` always builds it, and conftest.py fails the run
# under MOXY_EXPECT_NATIVE=1 when it is missing.


@pytest.fixture(params=_PAIRS, ids=[name for name, _, _ in _PAIRS])
def calls(request: pytest.FixtureRequest) -> tuple[Recv, Send]:
    _, recv, send = request.param
    return recv, send


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_the_native_build_uses_the_c_calls() -> None:
    if "moxy._sockio" not in native.compiled():
        pytest.skip("pure Python: no C socket calls")
    assert (stream._recv, stream._send) == (_sockio.recv, _sockio.send)


def test_what_was_sent_is_received(
    calls: tuple[Recv, Send], pair: tuple[socket.socket, ...]
) -> None:
    recv, send = calls
    a, b = pair
    assert send(a.fileno(), b"250 2.0.0 Ok\r\n") == 14
    assert send(a.fileno(), memoryview(b"xx354 go\r\n")[2:]) == 8
    assert send(a.fileno(), bytearray(b"!")) == 1
    assert recv(b.fileno(), 5) == b"250 2"
    assert recv(b.fileno(), 100) == b".0.0 Ok\r\n354 go\r\n!"


def test_nothing_yet_is_none_and_nothing_taken_is_zero(
    calls: tuple[Recv, Send], pair: tuple[socket.socket, ...]
) -> None:
    recv, send = calls
    a, b = pair
    assert recv(b.fileno(), 100) is None  # not an exception, not b""
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    total = 0
    while (sent := send(a.fileno(), b"x" * 65536)) > 0:
        total += sent
    assert sent == 0 and total > 0  # the kernel's buffers are full: it takes nothing now
    received = 0
    while (data := recv(b.fileno(), 1 << 20)) is not None:
        received += len(data)
    assert received == total


def test_the_end_of_the_stream_is_empty_bytes(
    calls: tuple[Recv, Send], pair: tuple[socket.socket, ...]
) -> None:
    recv, _ = calls
    a, b = pair
    a.sendall(b"last")
    a.shutdown(socket.SHUT_WR)
    assert recv(b.fileno(), 100) == b"last"
    assert recv(b.fileno(), 100) == b""


def test_errors_are_oserrors_with_their_errno(
    calls: tuple[Recv, Send], pair: tuple[socket.socket, ...]
) -> None:
    recv, send = calls
    a, b = pair
    b.close()
    with pytest.raises(OSError) as gone:
        send(a.fileno(), b"hello")  # EPIPE, and no SIGPIPE killed the test run
    assert gone.value.errno == errno.EPIPE
    with pytest.raises(OSError) as closed:
        recv(-1, 10)
    assert closed.value.errno == errno.EBADF
    with pytest.raises(OSError) as closed:
        send(-1, b"x")
    assert closed.value.errno == errno.EBADF


def test_the_c_calls_refuse_what_is_not_theirs() -> None:
    if "moxy._sockio" not in native.compiled():
        pytest.skip("pure Python: no C socket calls")
    with pytest.raises(TypeError):
        _sockio.recv(0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _sockio.send(0, "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _sockio.recv(0, -1)


async def test_a_closed_stream_never_uses_its_old_descriptor_number() -> None:
    a, b = socket.socketpair()
    closed = Stream(a)
    number = closed.fd
    await closed.aclose()
    # The system gives the number to the next socket, as it would to a new connection.
    c, d = socket.socketpair()
    try:
        assert number in (c.fileno(), d.fileno())
        with pytest.raises(StreamBroken):
            await closed.send_within(b"QUIT\r\n", 1.0)
        with pytest.raises(StreamBroken):
            await closed.receive_within(100, 1.0)
        d.setblocking(False)
        c.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing reached the new connection
            (d if number == c.fileno() else c).recv(100)
    finally:
        for s in (b, c, d):
            s.close()
    await trio.lowlevel.checkpoint()
