"""Server-level limits and routing failures: what the client hears, and that Moxy carries on."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable

import pytest
import trio

from moxy.config import load_config
from moxy.lookup.base import BadRouteData, LookupFailed, Route, parse_destinations
from moxy.server import serve
from peers.client import SmtpClient
from peers.moxy import StartMoxy
from peers.recorder import Recorder

from .helpers import SENDER, open_session

MakeRecorder = Callable[..., Recorder]


async def test_connections_over_the_limit_get_421_and_are_closed(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy({"example.org": make_recorder()}, limits={"connections": 2})
    first = await open_session(server)
    second = await open_session(server)
    async with await SmtpClient.connect(server.host, server.port) as third:
        refused = await third.reply()
        assert (refused.code, refused.lines[0][:5]) == (421, "4.3.2")
        assert await third.expect_closed() == b""  # and nothing more: closed
    await first.aclose()
    # A place is free again: the next connection is served.
    with trio.fail_after(5):
        while True:
            async with await SmtpClient.connect(server.host, server.port) as again:
                if (await again.reply()).code == 220:
                    break
            await trio.sleep(0.05)
    await second.aclose()


async def test_a_flood_over_the_connection_limit_is_not_a_log_line_each(
    moxy: StartMoxy, make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """500 refusals wrote 500 warnings; as for the per-client limits, one line per 10 s says
    how many (each refusal stays an event and a metric)."""
    server = await moxy({"example.org": make_recorder()}, limits={"connections": 1})
    async with await open_session(server):
        for _ in range(20):
            async with await SmtpClient.connect(server.host, server.port) as refused:
                assert (await refused.reply()).code == 421
    lines = [r.getMessage() for r in caplog.records if "connection limit" in r.getMessage()]
    assert lines == ["connection limit: refused 1 connection (latest from 127.0.0.1: "
                     "limits.connections = 1)"], lines


class ScriptedRouter:
    """A Router (the Protocol sessions use) that fails in a chosen way per recipient."""

    def __init__(self, destination: str) -> None:
        self.groups = parse_destinations(destination)

    async def route(self, recipient: str) -> Route | None:
        local = recipient.split("@")[0]
        if local == "down":
            raise LookupFailed("test backend: no answer within 2s")
        if local == "bad":
            raise BadRouteData("test backend: key 'bad@example.org': bad value")
        if local == "bug":
            raise RuntimeError("a bug in a route source")
        return Route(self.groups, key=recipient, source="test")


async def test_routing_failures_are_temporary_and_other_recipients_are_unaffected(
    write_config: Callable[..., object], make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    config = load_config(write_config({"example.org": upstream}))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, config, router=ScriptedRouter(upstream.address))
        )
        async with await open_session(address) as client:
            assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
            replies = {
                local: await client.command(f"RCPT TO:<{local}@example.org>")
                for local in ("down", "bad", "bug", "fine")
            }
            assert (replies["down"].code, replies["down"].lines[0][:5]) == (451, "4.4.3")
            assert (replies["bad"].code, replies["bad"].lines[0][:5]) == (451, "4.3.0")
            assert (replies["bug"].code, replies["bug"].lines[0][:5]) == (451, "4.3.0")
            assert replies["fine"].code == 250
            assert (await client.command("DATA")).code == 354
            await client.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
            assert (await client.reply()).code == 250
        nursery.cancel_scope.cancel()
    [message] = upstream.messages
    assert message.rcpts == ["fine@example.org"]


def flood_without_reading(host: str, port: int) -> str:
    """Pipeline NOOPs and never read a reply: how does it end?"""
    with socket.create_connection((host, port)) as sock:
        sock.settimeout(15)
        try:
            for _ in range(20_000):  # up to 120 MB of commands
                sock.sendall(b"NOOP\r\n" * 1000)
        except ConnectionError:
            return "closed by moxy"
        except TimeoutError:
            return "stuck"
    return "never blocked"


async def test_a_client_that_never_reads_its_replies_is_dropped_after_client_command(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy({"example.org": make_recorder()}, timeouts={"client_command": 1.0})
    outcome = await trio.to_thread.run_sync(flood_without_reading, server.host, server.port)
    assert outcome == "closed by moxy"
