"""Per-client limits end to end: 421 4.7.0 and close over a limit, counted in the log; and a
flood of connections from one address does not keep a client from another address out."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Callable

import trio

from peers.client import SmtpClient
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import BODY, SENDER

MakeRecorder = Callable[..., Recorder]
FLOOD = 10_000
BATCH = 100


async def connect_from(source: str, server: RunningMoxy) -> SmtpClient:
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream(server.host, server.port, local_address=source)
    return SmtpClient(stream)


def connection_events(server: RunningMoxy, reason: str) -> list[str]:
    return [line for line in server.log_lines()
            if line.split(" ")[1:2] == ["connection"] and f" reason={reason} " in line]


async def test_connections_per_ip_over_the_limit_get_421_470_and_others_are_served(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy({"example.org": make_recorder()}, limits={"connections_per_ip": 2})
    first = await connect_from("127.0.0.2", server)
    second = await connect_from("127.0.0.2", server)
    assert (await first.reply()).code == 220
    assert (await second.reply()).code == 220
    async with await connect_from("127.0.0.2", server) as third:
        refused = await third.reply()
        assert (refused.code, refused.enhanced) == (421, "4.7.0")
        await third.expect_closed()
    async with await connect_from("127.0.0.3", server) as other:
        assert (await other.reply()).code == 220
    await first.aclose()
    # The place is free again once the server has seen the close.
    with trio.fail_after(10):
        while True:
            async with await connect_from("127.0.0.2", server) as again:
                if (await again.reply()).code == 220:
                    break
            await trio.sleep(0.05)
    await second.aclose()
    await eventually(lambda: len(connection_events(server, "connections-per-ip")) >= 1,
                     what="a connection event for the refusal")


async def test_messages_per_ip_rate_closes_the_session_with_421(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, limits={"messages_per_ip_rate": 2})
    async with await connect_from("127.0.0.2", server) as client:
        await client.greeting_and_ehlo()
        for _ in range(2):
            _envelope, final = await client.send_message(SENDER, ["user@example.org"], BODY)
            assert final is not None and final.code == 250, client.dump()
        over = await client.command(f"MAIL FROM:<{SENDER}>")
        assert (over.code, over.enhanced) == (421, "4.7.0"), client.dump()
        await client.expect_closed()
    async with await connect_from("127.0.0.3", server) as other:  # another client's own count
        await other.greeting_and_ehlo()
        _envelope, final = await other.send_message(SENDER, ["user@example.org"], BODY)
        assert final is not None and final.code == 250
    assert len(upstream.messages) == 3
    await eventually(lambda: len(connection_events(server, "message-rate-per-ip")) == 1,
                     what="a connection event for the refusal")


async def test_a_flood_from_one_address_does_not_keep_another_address_out(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """10,000 connections from 127.0.0.2, all kept open: 50 (the default per-address cap) get
    sessions, the rest 421 4.7.0; a client from 127.0.0.3 is then served at once. Without the
    per-address cap, the flood would take every place of `limits.connections`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = FLOOD + 1000  # the flood's sockets, the server's side, the test's own files
    assert hard >= needed, f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})  # defaults: 50 per address, 1000 in all
    try:
        with contextlib.ExitStack() as flood:

            async def connect() -> None:
                sock = trio.socket.socket()
                flood.enter_context(sock)
                await sock.bind(("127.0.0.2", 0))
                await sock.connect((server.host, server.port))

            for _ in range(FLOOD // BATCH):  # BATCH connections at a time, all kept open
                async with trio.open_nursery() as nursery:
                    for _ in range(BATCH):
                        nursery.start_soon(connect)
            # Every connection has been answered (220 or 421) once this client is served: the
            # server accepts in order.
            with trio.fail_after(30):
                async with await connect_from("127.0.0.3", server) as client:
                    await client.greeting_and_ehlo()
                    _envelope, final = await client.send_message(
                        SENDER, ["user@example.org"], BODY
                    )
                    assert final is not None and final.code == 250, client.dump()
                    await client.command("QUIT")
            assert len(upstream.messages) == 1

            def refused() -> int:
                return len(connection_events(server, "connections-per-ip"))

            await eventually(lambda: refused() == FLOOD - 50, timeout=30,
                             what=f"{FLOOD - 50} refusals in the log")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
