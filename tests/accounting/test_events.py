"""The events a real session produces, as the file sink writes them: text and JSON lines,
refused recipients for every reason, connections Moxy refuses or ends."""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from integration.helpers import BODY, SENDER, open_session, send_one
from moxy.accounting.dispatch import Accounting
from moxy.accounting.events import LEG_AND_MESSAGE, DeliveryEvent, count_events, expand
from moxy.accounting.filesink import FileSink
from moxy.accounting.settings import FileSinkSettings
from moxy.config import load_config
from moxy.server import serve
from peers.client import SmtpClient
from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.sink import free_port
from peers.tls import TlsFiles
from peers.waiting import eventually

from .helpers import json_records, parse_text_line, text_records

MakeRecorder = Callable[..., Recorder]


def kinds(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == kind]


async def test_json_lines_carry_the_same_fields_as_the_text_lines(
    write_config: Callable[..., Path], make_recorder: MakeRecorder, tmp_path: Path
) -> None:
    upstream = make_recorder()
    text_log, json_log = tmp_path / "events.log", tmp_path / "events.jsonl"
    accounting = Accounting([
        FileSink(FileSinkSettings(text_log), name="text"),
        FileSink(FileSinkSettings(json_log, format="json"), name="json"),
    ])
    config = load_config(write_config({"example.org": upstream}, server={"node": "mx-7"}))
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, config, accounting=accounting)
        )
        outcome = await send_one(address, ["user@example.org", "nobody@elsewhere.test"])
        assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
        await eventually(lambda: len(json_records(json_log)) == 3, what="3 JSON lines")
        await eventually(lambda: len(text_records(text_log)) == 3, what="3 text lines")
        nursery.cancel_scope.cancel()
    texts, jsons = text_records(text_log), json_records(json_log)
    assert texts == jsons
    assert [r["kind"] for r in jsons] == ["refused", "leg", "message"]
    leg = jsons[1]
    assert leg["node"] == "mx-7" and leg["from"] == SENDER and leg["to"] == ["user@example.org"]
    assert leg["dest"] == upstream.address and leg["code"] == 250 and leg["size"] > len(BODY)
    assert jsons[0]["to"] == ["nobody@elsewhere.test"] and jsons[0]["reason"] == "relay-denied"


async def test_the_json_format_is_chosen_in_accounting_file_and_goes_to_the_log_file(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    # [accounting.file] without path: the file of [log] file (moxy.log in the test config).
    server = await moxy({"example.org": make_recorder()}, **{"accounting.file": {"format": "json"}})
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250
    await eventually(lambda: len(json_records(server.log_file)) == 2, what="2 JSON lines")
    leg, message = json_records(server.log_file)
    assert (leg["kind"], message["kind"]) == ("leg", "message")
    assert message["to"] == ["user@example.org"] and message["code"] == 250


async def test_every_refused_recipient_is_an_event_with_its_reason(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    good, other = make_recorder(), make_recorder()
    refusing = make_recorder({"rcpt": "550 5.1.1 No such user here"})
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: the leg fails at connect
    server = await moxy(
        {"example.org": good, "other.org": other, "refusing.org": refusing, "down.org": closed},
        proxy={"split_destinations": True},
        limits={"recipients": 2},
    )
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        codes = [
            (await client.command(f"RCPT TO:<{rcpt}>")).code
            # The first accepted recipient fixes the destinations (split_destinations).
            for rcpt in ("x@nowhere.test", "b@refusing.org", "c@down.org", "a@example.org",
                         "d@other.org", "e@example.org", "f@example.org")
        ]
        await client.command("QUIT")
    assert codes == [550, 550, 451, 250, 452, 250, 452]

    def refused() -> list[dict[str, Any]]:
        return kinds(text_records(server.log_file), "refused")

    await eventually(lambda: len(refused()) == 5, what="5 refused events")
    by_rcpt = {r["to"][0]: r for r in refused()}
    assert {rcpt: (r["reason"], r["code"]) for rcpt, r in by_rcpt.items()} == {
        "x@nowhere.test": ("relay-denied", 550),
        "b@refusing.org": ("destination-refused", 550),
        "c@down.org": ("destination-unavailable", 451),
        "d@other.org": ("policy", 452),  # split_destinations
        "f@example.org": ("policy", 452),  # limits.recipients
    }
    assert by_rcpt["b@refusing.org"]["dest"] == refusing.address
    assert by_rcpt["b@refusing.org"]["reply"].startswith("550 5.1.1 No such user here")
    assert by_rcpt["b@refusing.org"]["route"] == refusing.address
    assert by_rcpt["c@down.org"]["dest"] == closed
    assert by_rcpt["x@nowhere.test"]["dest"] == "-"
    assert all(r["from"] == SENDER and r["stage"] == "rcpt" for r in refused())


async def test_a_failed_route_lookup_is_a_refused_event(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = await moxy(
        {}, routes={"chain": ["redis"]}, **{"routes.redis": {"url": dead_redis, "timeout": 1.0}}
    )
    async with await open_session(server) as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        reply = await client.command("RCPT TO:<user@example.org>")
        assert reply.code == 451, client.dump()
    await eventually(lambda: kinds(text_records(server.log_file), "refused"), what="an event")
    [event] = kinds(text_records(server.log_file), "refused")
    assert (event["reason"], event["code"], event["to"]) == (
        "lookup-failed", 451, ["user@example.org"]
    )


async def test_a_connection_over_the_limit_is_a_connection_event(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy({"example.org": make_recorder()}, limits={"connections": 1},
                        server={"node": "edge-1"})
    async with (
        await open_session(server),
        await SmtpClient.connect(server.host, server.port) as refused,
    ):
        assert (await refused.reply()).code == 421
    await eventually(lambda: kinds(text_records(server.log_file), "connection"), what="event")
    [event] = kinds(text_records(server.log_file), "connection")
    assert (event["reason"], event["code"], event["client"], event["node"]) == (
        "connection-limit", 421, "127.0.0.1", "edge-1"
    )
    assert event["reply"].startswith("421 4.3.2")


async def test_sessions_moxy_ends_are_connection_events(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy(
        {"example.org": make_recorder()}, limits={"errors": 1}, timeouts={"client_command": 0.5}
    )
    async with await open_session(server) as client:  # too many protocol errors
        await client.command("BOGUS")
        assert (await client.command("BOGUS")).code == 421
    async with await open_session(server, helo="sleepy.test") as client:  # says nothing
        assert (await client.reply(timeout=10)).code == 421

    def events() -> list[dict[str, Any]]:
        return kinds(text_records(server.log_file), "connection")

    await eventually(lambda: len(events()) == 2, what="2 connection events")
    errors, timeout = sorted(events(), key=lambda e: e["reason"])
    assert (errors["reason"], errors["code"], errors["helo"]) == ("protocol-errors", 421,
                                                                  "client.test")
    assert (timeout["reason"], timeout["code"], timeout["helo"]) == ("timeout", 421,
                                                                     "sleepy.test")
    assert timeout["session"] != errors["session"]


@pytest.mark.parametrize("after", ["handshake", "starttls"])
async def test_a_tls_session_moxy_ends_is_a_connection_event_that_says_so(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles, after: str
) -> None:
    """After the handshake, a client that says nothing: its event had `tls=-`. After STARTTLS,
    a client that never starts the handshake: no event at all."""
    server = await moxy(
        {"example.org": make_recorder()}, timeouts={"client_command": 0.5},
        tls={"cert": str(tls_files.cert), "key": str(tls_files.key)},
    )
    async with await open_session(server) as client:
        assert (await client.command("STARTTLS")).code == 220
        if after == "handshake":
            await client.start_tls(ssl.create_default_context(cafile=str(tls_files.ca)))
            assert (await client.command("EHLO over-tls.test")).code == 250
            assert (await client.reply(timeout=10)).code == 421  # then says nothing
        else:
            assert await client.expect_closed() == b""  # no ClientHello
    await eventually(lambda: kinds(text_records(server.log_file), "connection"), what="event")
    [event] = kinds(text_records(server.log_file), "connection")
    if after == "handshake":
        assert (event["reason"], event["helo"]) == ("timeout", "over-tls.test")
        assert event["tls"].startswith("TLSv1.3:TLS_"), event
    else:
        assert (event["reason"], event["stage"], event["code"]) == ("timeout", "tls", 0)


def test_text_line_parser_reads_routes_with_spaces() -> None:
    line = ('2026-11-25T22:40:18.105Z message node=mx1 session=S1 id=S1.1 client=192.0.2.7 '
            'helo=h from=<> to=<a@x>,<b@y> dest=- route=1.2.3.4:25 5.6.7.8:25|9.9.9.9:25 '
            'size=10 code=451 stage=end-of-data reason=- tls=- duration=0.250 reply="451 x=y z"')
    record = parse_text_line(line)
    assert record["route"] == "1.2.3.4:25 5.6.7.8:25|9.9.9.9:25"
    assert record["to"] == ["a@x", "b@y"] and record["from"] == ""
    assert record["reply"] == "451 x=y z"


async def test_a_one_leg_message_is_handed_over_as_one_entry_that_expands_to_its_two_events(
    write_config: Callable[..., Path], make_recorder: MakeRecorder,
) -> None:
    plain, mirror = make_recorder(), make_recorder()
    config_path = write_config({"example.org": plain, "example.net": [plain, mirror]})
    accounting = Accounting([FileSink(FileSinkSettings(path=config_path.parent / "x.log"))])
    handed: list[tuple[Any, ...]] = []
    accounting.emit = lambda *fields: handed.append(fields)  # before the dispatcher
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, load_config(config_path), accounting=accounting))
        one = await send_one(address, ["a@example.org"])
        two = await send_one(address, ["b@example.net"])
        assert one.final is not None and one.final.code == 250
        assert two.final is not None and two.final.code == 250
        nursery.cancel_scope.cancel()
    assert [entry[0] for entry in handed] == [LEG_AND_MESSAGE, "leg", "leg", "message"]
    assert count_events(handed) == 5
    events = expand(handed)
    assert [e.kind for e in events] == ["leg", "message", "leg", "leg", "message"]
    leg, message = events[0], events[1]
    # Exactly the two events the session would have made apart.
    assert leg.destination == plain.address and leg.size > message.size > 0
    assert (leg.code, leg.stage, leg.recipients) == (250, "end-of-data", ("a@example.org",))
    assert (message.destination, message.code, message.stage) == ("-", 250, "end-of-data")
    assert message.reply.startswith("250 ") and leg.reply.startswith("250 ")
    shared = ("session_id", "message_id", "client_ip", "helo", "mail_from", "recipients",
              "route", "duration", "node", "tls", "time")
    assert [getattr(leg, f) for f in shared] == [getattr(message, f) for f in shared]
    assert all(type(e) is DeliveryEvent for e in events)


def test_expand_keeps_plain_fields_and_events_as_they_are() -> None:
    event = DeliveryEvent(
        kind="refused", session_id="s", message_id="", client_ip="192.0.2.1", helo="h",
        mail_from="f@x", recipients=("r@y",), destination="-", route="", size=0, code=550,
        reply="550 no", stage="rcpt", duration=0.0, node="n", reason="relay-denied", time=1.5,
    )
    assert expand([event, tuple(event)]) == [event, event]
    assert count_events([event, tuple(event)]) == 2
    assert count_events([]) == 0 and expand([]) == []


def test_a_one_leg_entry_gives_its_leg_the_destinations_tls_and_its_message_the_clients() -> None:
    entry = (
        LEG_AND_MESSAGE, "s", "s.1", "192.0.2.1", "h", "f@x", ("r@y",), "mx.y:25", "mx.y:25",
        120, 250, "250 queued", "end-of-data", 0.5, "n", "", "TLSv1.2:ECDHE-RSA-AES128-GCM-SHA256",
        1.5, 100, 250, "250 2.0.0 Ok", "TLSv1.3:TLS_AES_256_GCM_SHA384",
    )
    leg, message = expand([entry])
    assert (leg.kind, leg.tls, leg.size) == ("leg", "TLSv1.3:TLS_AES_256_GCM_SHA384", 120)
    assert (message.kind, message.tls, message.size) == (
        "message", "TLSv1.2:ECDHE-RSA-AES128-GCM-SHA256", 100)
