"""`limits.idle_upstreams`: upstream connections kept between client sessions, and their limits."""

from __future__ import annotations

from collections.abc import Callable

import trio

from peers.client import smtplib_send
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import DISCONNECT, Recorder, delay
from peers.waiting import eventually

from .helpers import BODY, SENDER, open_session

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
    # Each final reply takes half a second, so the three sessions are in flight together (on a
    # busy machine one could otherwise finish before another starts, and share its connection).
    upstream = make_recorder({"end_of_data": delay(0.5)})
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


async def test_a_connection_given_back_while_a_leg_waits_at_the_cap_frees_its_place(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """With `destinations.concurrency` sessions at once, one session's leg may start before
    another's connection is back in the pool: it waits for a place under the cap. Kept idle,
    the connection given back would hold that place while the leg waits, and the leg would
    get 451 4.4.5 at the end of `concurrency_wait` (this happened under `make bench`)."""
    upstream = make_recorder()
    server = await moxy(
        {"example.org": upstream},
        limits={"idle_upstreams": 4},
        destinations={"concurrency": 1, "concurrency_wait": 20},
    )
    async with await open_session(server) as first:
        _, final = await first.send_message(SENDER, ["user@example.org"], BODY)
        assert final is not None and final.code == 250, first.dump()
        # `first`'s connection, kept for its next transaction, holds the only place.
        async with await open_session(server) as second, trio.open_nursery() as nursery:
            await second.command(f"MAIL FROM:<{SENDER}>")
            waited: list[float] = []

            async def rcpt() -> None:
                start = trio.current_time()
                reply = await second.command("RCPT TO:<user@example.org>", timeout=30)
                assert reply.code == 250, second.dump()
                waited.append(trio.current_time() - start)

            nursery.start_soon(rcpt)
            await trio.sleep(0.5)  # the second leg waits for the place
            assert not waited
            await first.command("QUIT")  # its clean connection goes back
        assert waited and waited[0] < 10, waited  # not the 20 s wait
    # The connection given back was closed with QUIT (not kept) so that the place was free.
    # Moxy does not wait for the reply to QUIT: the recorder may read it a little later.
    await eventually(lambda: upstream.verbs(0)[-1] == "QUIT", what="QUIT on the first connection")
    assert len(upstream.connections) == 2
