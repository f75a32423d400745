"""`limits.idle_upstreams`: upstream connections kept between client sessions, and their limits."""

from __future__ import annotations

from collections.abc import Callable

import trio

from peers.client import smtplib_send
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import DISCONNECT, Recorder
from peers.waiting import eventually

from .helpers import SENDER

MakeRecorder = Callable[..., Recorder]


async def send(moxy: RunningMoxy, n: int, rcpt: str = "user@example.org") -> None:
    message = f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode()
    refused = await trio.to_thread.run_sync(
        smtplib_send, moxy.host, moxy.port, SENDER, [rcpt], message
    )
    assert refused == {}


async def test_without_pooling_each_client_session_has_its_own_upstream_session(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"idle_upstreams": 0})
    await send(server, 1)
    await send(server, 2)
    assert len(upstream.messages) == 2
    assert len(upstream.connections) == 2
    upstream.wait_closed(0)
    assert upstream.verbs(0)[-1] == "QUIT"


async def test_a_pooled_connection_serves_the_next_client_session(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"idle_upstreams": 4})
    for n in range(3):
        await send(server, n)
    assert len(upstream.messages) == 3
    assert len(upstream.connections) == 1
    # One greeting and EHLO for three client sessions, and no QUIT in between.
    assert upstream.verbs(0).count("EHLO") == 1
    assert "QUIT" not in upstream.verbs(0)


async def test_an_idle_pooled_connection_gets_quit_after_upstream_idle(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy(
        {"example.org": upstream},
        limits={"idle_upstreams": 4},
        timeouts={"upstream_idle": 0.3},
    )
    await send(server, 1)
    await eventually(lambda: upstream.verbs(0)[-1] == "QUIT", timeout=5, what="QUIT")
    await send(server, 2)
    assert len(upstream.connections) == 2


async def test_a_pooled_connection_closed_by_the_destination_is_replaced_transparently(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    # The second MAIL (the first on the pooled connection) finds the connection gone.
    upstream = make_recorder({"mail": ["250 2.1.0 Ok", DISCONNECT, "250 2.1.0 Ok"]})
    server = await moxy({"example.org": upstream}, limits={"idle_upstreams": 4})
    await send(server, 1)
    await send(server, 2)
    assert [m.data.split(b"message ")[1] for m in upstream.messages if m.data] == [
        b"1\r\n", b"2\r\n"
    ]
    assert len(upstream.connections) == 2


async def test_the_pool_keeps_at_most_idle_upstreams_per_destination(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"idle_upstreams": 1})
    # Three sessions at once need three connections; only one is kept afterwards.
    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(send, server, n)
    assert len(upstream.connections) == 3
    await eventually(
        lambda: sum(1 for c in upstream.connections if c.closed.is_set()) == 2,
        timeout=5, what="two connections closed",
    )
