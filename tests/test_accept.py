"""The accept loop of a plain listener (src/moxy/accept.py): a burst of connections accepted in
batches from one wake-up, each a non-blocking Stream with TCP_NODELAY and the client's
address; out of file descriptors, it pauses and goes on; session ids stay unique."""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import resource
import socket
import weakref

import pytest
import trio
import trio.testing

from moxy.accept import ACCEPT_BATCH, SessionTasks, accept_loop
from moxy.stream import Stream
from moxy.trace import new_session_id


async def _listener() -> tuple[trio.SocketListener, tuple[str, int]]:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    host, port = listener.socket.getsockname()[:2]
    return listener, (host, port)


async def test_a_burst_is_accepted_in_batches() -> None:
    listener, address = await _listener()
    count = 2 * ACCEPT_BATCH + 5
    clients = [socket.create_connection(address) for _ in range(count)]  # queued, not accepted
    seen: list[tuple[Stream, str]] = []
    tasks_at_first: list[int] = []
    done = trio.Event()
    try:
        async with trio.open_nursery() as nursery:

            async def handle(stream: trio.SocketStream | Stream, client_ip: str) -> None:
                assert isinstance(stream, Stream)
                if not seen:  # the loop accepted a whole batch before any session ran
                    tasks_at_first.append(len(nursery.child_tasks))
                seen.append((stream, client_ip))
                if len(seen) == count:
                    done.set()

            nursery.start_soon(accept_loop, listener, handle, nursery)
            with trio.fail_after(10):
                await done.wait()
            nursery.cancel_scope.cancel()
        assert tasks_at_first[0] >= ACCEPT_BATCH
        for stream, client_ip in seen:
            assert client_ip == "127.0.0.1"
            assert stream.socket.getblocking() is False
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        # Each Stream is the client's connection: bytes go through.
        stream, _ = seen[0]
        peers = {c.getsockname(): c for c in clients}
        peer = peers[stream.socket.getpeername()]
        await stream.send(b"220 hi\r\n", trio.current_time() + 5)
        assert peer.recv(100) == b"220 hi\r\n"
        for stream, _ in seen:
            await stream.aclose()
    finally:
        for c in clients:
            c.close()
        await listener.aclose()


async def test_out_of_file_descriptors_pauses_then_accepts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener, address = await _listener()
    client = socket.create_connection(address)
    seen: list[str] = []
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)  # the descriptor accept() would get
    os.close(lowest)
    caplog.set_level(logging.ERROR, logger="moxy")
    try:
        async with trio.open_nursery() as nursery:

            async def handle(stream: trio.SocketStream | Stream, client_ip: str) -> None:
                seen.append(client_ip)
                await stream.aclose()

            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, limits[1]))
            try:
                nursery.start_soon(accept_loop, listener, handle, nursery)
                with trio.fail_after(10):
                    while "pausing 100 ms" not in caplog.text:
                        await trio.sleep(0.01)
                assert seen == []
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            with trio.fail_after(10):  # the connection waited in the backlog meanwhile
                while not seen:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert seen == ["127.0.0.1"]
        assert "accept: Too many open files; pausing 100 ms" in caplog.text
    finally:
        client.close()
        await listener.aclose()


def test_session_ids_are_unique_and_short() -> None:
    ids = [new_session_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9A-F]{12}", i) for i in ids)
    counters = [int(i[6:], 16) for i in ids]
    assert counters == list(range(counters[0], counters[0] + 1000))  # the counter, in order


def test_session_ids_past_the_sixth_counter_digit_grow(monkeypatch: pytest.MonkeyPatch) -> None:
    import itertools

    from moxy import trace

    monkeypatch.setattr(trace, "_ids", itertools.count(0xFFFFFF))
    first, second = new_session_id(), new_session_id()
    assert re.fullmatch(r"[0-9A-F]{6}FFFFFF", first)
    assert re.fullmatch(r"[0-9A-F]{6}1000000", second)


async def test_a_session_task_takes_the_next_connection_once_its_own_has_ended() -> None:
    served: list[tuple[object, str]] = []
    done = trio.Event()

    async def handle(stream: object, client_ip: str) -> None:
        served.append((trio.lowlevel.current_task(), client_ip))
        await trio.lowlevel.checkpoint()
        if len(served) == 3:
            done.set()

    async with trio.open_nursery() as nursery:
        sessions = SessionTasks(nursery, keep=4)
        sessions.start_soon(handle, "s1", "192.0.2.1")  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        assert len(sessions.idle) == 1  # its connection over, the task waits
        sessions.start_soon(handle, "s2", "192.0.2.2")  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        sessions.start_soon(handle, "s3", "192.0.2.3")  # type: ignore[arg-type]
        await done.wait()
        nursery.cancel_scope.cancel()  # the waiting task ends with the nursery
    assert [ip for _, ip in served] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
    assert len({task for task, _ in served}) == 1  # one task served all three
    assert sessions.idle == []


async def test_busy_session_tasks_mean_new_ones_and_only_keep_of_them_wait() -> None:
    release = trio.Event()
    tasks: set[object] = set()

    async def handle(stream: object, client_ip: str) -> None:
        tasks.add(trio.lowlevel.current_task())
        await release.wait()

    async with trio.open_nursery() as nursery:
        sessions = SessionTasks(nursery, keep=2)
        for n in range(5):  # all at once: none has ended, so five tasks
            sessions.start_soon(handle, f"s{n}", "192.0.2.9")  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        assert len(tasks) == 5 and sessions.idle == []
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(sessions.idle) == 2  # the other three ended
        nursery.cancel_scope.cancel()
    assert sessions.idle == []


async def test_a_waiting_session_task_keeps_nothing_of_its_last_connection() -> None:
    """Its stream (with the closed socket) and the handler are let go while it waits."""

    class Connection:
        pass

    async def handle(stream: object, client_ip: str) -> None:
        await trio.lowlevel.checkpoint()

    connection = Connection()
    gone = weakref.ref(connection)
    async with trio.open_nursery() as nursery:
        sessions = SessionTasks(nursery, keep=4)
        sessions.start_soon(handle, connection, "192.0.2.1")  # type: ignore[arg-type]
        del connection
        await trio.testing.wait_all_tasks_blocked()
        assert len(sessions.idle) == 1
        gc.collect()
        assert gone() is None
        nursery.cancel_scope.cancel()


async def test_accept_pauses_for_want_of_descriptors_are_said_once_per_ten_seconds(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pause lasts 100 ms: a line per pause was ten ERROR lines a second while a flood
    lasted. The next line says how many pauses came since."""
    import errno

    from moxy import accept

    caplog.set_level(logging.ERROR, logger="moxy")
    monkeypatch.setattr(accept._PAUSES, "last", -math.inf)
    monkeypatch.setattr(accept._PAUSES, "count", 0)
    emfile = OSError(errno.EMFILE, "Too many open files")
    for _ in range(3):
        await accept._accept_failed(emfile)
    assert [r.getMessage() for r in caplog.records] == [
        "accept: Too many open files; pausing 100 ms (1 pause(s) since this was last said)"
    ]
    accept._PAUSES.last = -math.inf  # ten seconds on
    await accept._accept_failed(emfile)
    assert caplog.records[-1].getMessage() == (
        "accept: Too many open files; pausing 100 ms (3 pause(s) since this was last said)"
    )
