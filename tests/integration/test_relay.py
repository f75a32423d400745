"""[relay]: trusted networks with a smarthost, accounting-only mode, and the relay-probe address
forms, from trusted and untrusted client addresses on loopback (127.0.0.2, 127.0.0.3)."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio

from moxy.config import load_config
from moxy.server import serve
from peers.client import ServerReply, SmtpClient
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import BODY, SENDER

MakeRecorder = Callable[..., Recorder]
TRUSTED = "127.0.0.2"
UNTRUSTED = "127.0.0.3"

# Addresses that ask the destination to relay further (sender-specified routing), and a
# source route, which names a domain only to be ignored (RFC 5321 §4.1.1.3).
PROBES = [
    "user%elsewhere.test@example.org",
    '"user@elsewhere.test"@example.org',
    "elsewhere.test!user@example.org",
]
SOURCE_ROUTED = "@example.org:user@elsewhere.test"


async def connect_from(source: str, server: RunningMoxy) -> SmtpClient:
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream(server.host, server.port, local_address=source)
    client = SmtpClient(stream)
    assert (await client.greeting_and_ehlo()).code == 250
    return client


async def rcpts(client: SmtpClient, addresses: Sequence[str]) -> dict[str, ServerReply]:
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    replies = {a: await client.command(f"RCPT TO:<{a}>") for a in addresses}
    return replies


def denied(reply: ServerReply) -> bool:
    return (reply.code, reply.enhanced) == (550, "5.7.1") and "Relaying denied" in reply.text


async def deliver(client: SmtpClient) -> ServerReply:
    assert (await client.command("DATA")).code == 354
    await client.send(BODY + b".\r\n")
    return await client.reply()


async def test_trusted_clients_relay_through_the_smarthost_others_are_denied(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    routed, smarthost = make_recorder(), make_recorder()
    server = await moxy(
        {"example.org": routed},
        relay={"trusted_networks": [f"{TRUSTED}/32"],
               # a failover group: the first alternative refuses connections
               "smarthost": f"127.0.0.1:1|{smarthost.address}"},
    )
    async with await connect_from(UNTRUSTED, server) as client:
        replies = await rcpts(client, ["user@elsewhere.test", *PROBES, SOURCE_ROUTED,
                                       "user@example.org"])
        assert all(denied(replies[a]) for a in ["user@elsewhere.test", *PROBES, SOURCE_ROUTED]), (
            client.dump()
        )
        assert replies["user@example.org"].code == 250
        assert (await deliver(client)).code == 250
    async with await connect_from(TRUSTED, server) as client:
        replies = await rcpts(client, ["user@elsewhere.test", "user@example.org", PROBES[0]])
        assert all(r.code == 250 for r in replies.values()), client.dump()
        assert (await deliver(client)).code == 250
    # A route still wins for a trusted client; only recipients without one go to the smarthost.
    assert [m.rcpts for m in smarthost.messages] == [["user@elsewhere.test"]]
    assert [m.rcpts for m in routed.messages] == [
        ["user@example.org"], ["user@example.org", PROBES[0]]
    ]


async def test_accounting_only_without_routes_serves_and_reloads(
    write_config: Callable[..., Path], make_recorder: MakeRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`[routes]` may be left out in accounting-only mode (docs/configuration.md): serving
    and a reload refused that ("CachedRouter needs at least one route source")."""
    caplog.set_level(logging.INFO, logger="moxy")
    mta = make_recorder()
    path = write_config({}, relay={"accounting_only": mta.address})
    path.write_text(re.sub(r"\[routes\]\n[^[]*", "", path.read_text()))
    assert "routes" not in path.read_text()
    send_reload, reloads = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, load_config(path), reloads=reloads)
        )
        await send_reload.send(None)
        await eventually(lambda: "reloaded" in caplog.text, what="the reload")
        assert "reload failed" not in caplog.text
        async with await SmtpClient.connect(*address) as client:
            assert (await client.greeting_and_ehlo()).code == 250
            assert (await rcpts(client, ["a@any.test"]))["a@any.test"].code == 250
            assert (await deliver(client)).code == 250
        nursery.cancel_scope.cancel()
    [message] = mta.messages
    assert message.rcpts == ["a@any.test"]


async def test_accounting_only_sends_every_domain_to_one_destination(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    mta, unused = make_recorder(), make_recorder()
    server = await moxy(
        {"example.org": unused}, relay={"accounting_only": mta.address}
    )
    async with await connect_from(UNTRUSTED, server) as client:
        replies = await rcpts(client, ["a@example.org", "b@any.test", "c@other.example", *PROBES])
        assert [replies[a].code for a in ["a@example.org", "b@any.test", "c@other.example"]] == [
            250, 250, 250
        ]
        assert all(denied(replies[a]) for a in PROBES), client.dump()
        assert (await deliver(client)).code == 250
    [message] = mta.messages
    assert message.rcpts == ["a@example.org", "b@any.test", "c@other.example"]
    assert unused.messages == []

    def legs() -> list[str]:
        return [line for line in server.log_lines() if line.split(" ")[1:2] == ["leg"]]

    await eventually(lambda: len(legs()) == 1, what="the leg's log line")  # written behind
    assert f"dest={mta.address}" in legs()[0]
