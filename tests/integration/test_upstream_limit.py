"""`limits.upstream_connections`: all the upstream connections of a process, pooled and in use.
At the limit the pool gives up its longest-idle connection; with nothing idle, a leg gets 451
4.3.0 at once (this host's shortage, not the destination's), and the limit is said in the log
at most every ten seconds. Without it, recipients fanned out over many destinations filled the
open-file limit, and then accept() stalled for every client."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import trio

from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import DISCONNECT, Recorder
from peers.waiting import eventually

from .helpers import BODY, SENDER, open_session, send_one

MakeRecorder = Callable[..., Recorder]


async def delivered(moxy: RunningMoxy, rcpt: str) -> None:
    outcome = await send_one(moxy, [rcpt])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript


async def test_at_the_limit_the_longest_idle_pooled_connection_makes_room(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    a, b, c = make_recorder(), make_recorder(), make_recorder()
    server = await moxy(
        {"a.example": a, "b.example": b, "c.example": c},
        limits={"idle_upstreams": 4, "upstream_connections": 2},
    )
    await delivered(server, "u@a.example")
    await delivered(server, "u@b.example")  # both connections now idle in the pool
    await delivered(server, "u@c.example")  # a third: a's, idle longest, is closed for it
    assert [len(r.messages) for r in (a, b, c)] == [1, 1, 1]
    await trio.to_thread.run_sync(a.wait_closed, 0)
    assert a.verbs(0)[-1] == "QUIT"
    assert not b.connections[0].closed.is_set()
    await delivered(server, "u@b.example")  # b's pooled connection serves again
    assert len(b.connections) == 1


async def test_at_the_limit_with_nothing_idle_a_recipient_gets_451_at_once(
    moxy: StartMoxy, make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "moxy")
    a, b = make_recorder(), make_recorder()
    server = await moxy(
        {"a.example": a, "b.example": b},
        limits={"idle_upstreams": 0, "upstream_connections": 1},
    )
    async with await open_session(server) as first:
        assert (await first.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await first.command("RCPT TO:<u@a.example>")).code == 250  # holds the one
        async with await open_session(server) as second:
            assert (await second.command(f"MAIL FROM:<{SENDER}>")).code == 250
            with trio.fail_after(5):  # no wait for a place: refused now
                refused = await second.command("RCPT TO:<u@b.example>")
            assert (refused.code, refused.lines[0][:5]) == (451, "4.3.0"), second.dump()
            assert not b.connections
            await first.command("QUIT")  # its connection gets QUIT: the place is free
            await trio.to_thread.run_sync(a.wait_closed, 0)
            # A leg's failure holds for the rest of its transaction: a new one tries again.
            assert (await second.command("RSET")).code == 250
            assert (await second.command(f"MAIL FROM:<{SENDER}>")).code == 250
            accepted = await second.command("RCPT TO:<u@b.example>")
            assert accepted.code == 250, second.dump()
    # Said once, as a warning; the leg's own line is a debug one (a flood would be a line
    # per recipient).
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if "upstream_connections" in r.getMessage()]
    assert said[0] == ("WARNING", "upstream connections: 1 open, as many as "
                       "limits.upstream_connections allows, none idle: 1 leg(s) refused with "
                       "451 4.3.0 since this was last said"), said
    assert {level for level, _ in said[1:]} == {"DEBUG"}, said


async def test_failed_and_dropped_connections_give_their_place_back(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """With room for one connection, each way a connection can end (refused greeting, a
    destination gone mid-transaction, a client gone mid-message, connect refused) must give
    its place back: one place kept by mistake and every later recipient would get 451."""
    good = make_recorder()
    refusing = make_recorder({"greeting": "554 5.3.2 not now"})
    vanishing = make_recorder({"rcpt": DISCONNECT})
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connect refused
    server = await moxy(
        {"good.example": good, "refusing.example": refusing, "vanishing.example": vanishing,
         "nowhere.example": f"127.0.0.1:{port}"},
        limits={"idle_upstreams": 0, "upstream_connections": 1},
    )
    for rcpt in ("u@refusing.example", "u@vanishing.example", "u@nowhere.example"):
        outcome = await send_one(server, [rcpt])
        assert outcome.rcpt[0].code >= 400, outcome.transcript
    async with await open_session(server) as client:  # gone in the middle of its data
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<u@good.example>")).code == 250
        assert (await client.command("DATA")).code == 354
        await client.send(BODY[: len(BODY) // 2])
    await eventually(lambda: good.connections and good.connections[0].closed.is_set(),
                     timeout=5, what="the abandoned leg closed")
    for _ in range(3):
        await delivered(server, "u@good.example")
    assert len(good.messages) == 3
