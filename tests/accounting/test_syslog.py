"""The syslog sink against real listeners: a UDP socket, a unix datagram socket (as /dev/log
is), a TCP socket with octet-counted frames; and a syslog that is not there yet."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from integration.helpers import SENDER, send_one
from moxy.accounting.syslog import facility_code
from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import parse_text_line

MakeRecorder = Callable[..., Recorder]

# <PRI>Mmm dd hh:mm:ss [host ]tag[pid]: body
_MESSAGE_RE = re.compile(
    r"<(?P<pri>\d+)>(?P<stamp>[A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d) (?P<host>\S+ )?"
    r"(?P<tag>[^\[ ]+)\[(?P<pid>\d+)\]: (?P<body>.*)"
)


def parse(datagram: bytes) -> re.Match[str]:
    match = _MESSAGE_RE.fullmatch(datagram.decode())
    assert match is not None, datagram
    return match


def event_of(match: re.Match[str]) -> dict[str, object]:
    # The body is the text log line without its timestamp: put one back to read it.
    return parse_text_line("2026-01-01T00:00:00.000Z " + match["body"])


async def receive_datagrams(sock: trio.socket.SocketType, count: int) -> list[bytes]:
    with trio.fail_after(10):
        return [await sock.recv(65536) for _ in range(count)]


def test_facility_codes_are_rfc_3164s() -> None:
    assert [facility_code(f) for f in ("kern", "mail", "cron", "authpriv", "local0", "local7")] \
        == [0, 2, 9, 10, 16, 23]


async def test_events_reach_a_udp_syslog_with_facility_tag_and_host(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    listener = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    with listener:
        server = await moxy(
            {"example.org": make_recorder()},
            accounting={"sinks": ["file", "syslog"]},
            **{"accounting.syslog": {"address": f"udp://127.0.0.1:{port}",
                                     "facility": "local3", "tag": "moxytest"}},
        )
        outcome = await send_one(server, ["user@example.org"])
        assert outcome.final is not None and outcome.final.code == 250
        leg, message = (parse(d) for d in await receive_datagrams(listener, 2))
    assert int(leg["pri"]) == 19 * 8 + 6  # local3.info
    assert leg["tag"] == "moxytest" and leg["host"] == socket.gethostname().split(".")[0] + " "
    assert event_of(leg)["kind"] == "leg" and event_of(message)["kind"] == "message"
    assert event_of(message)["from"] == SENDER and event_of(message)["code"] == 250
    # The same event as the file sink's line, timestamp aside.
    await eventually(lambda: len(server.log_lines()) == 2, what="2 log lines")
    assert server.log_lines()[1].split(" ", 1)[1] == message["body"]


async def test_events_reach_a_unix_datagram_socket_without_a_host_name(
    moxy: StartMoxy, make_recorder: MakeRecorder, tmp_path: Path
) -> None:
    path = tmp_path / "log.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await listener.bind(str(path))
    with listener:
        server = await moxy(
            {"example.org": make_recorder()},
            accounting={"sinks": ["syslog"]}, **{"accounting.syslog": {"address": str(path)}},
        )
        outcome = await send_one(server, ["user@example.org", "nobody@nowhere.test"])
        assert outcome.final is not None and outcome.final.code == 250
        records = [parse(d) for d in await receive_datagrams(listener, 3)]
    assert [event_of(r)["kind"] for r in records] == ["refused", "leg", "message"]
    assert all(int(r["pri"]) == 2 * 8 + 6 and r["host"] is None for r in records)  # mail.info
    assert all(r["tag"] == "moxy" for r in records)
    assert not server.log_file.exists()  # "file" is not among the sinks


async def test_events_reach_a_tcp_syslog_in_octet_counted_frames(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    server = await moxy(
        {"example.org": make_recorder()},
        accounting={"sinks": ["syslog"]},
        **{"accounting.syslog": {"address": f"tcp://127.0.0.1:{port}"}},
    )
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250
    received = b""
    with trio.fail_after(10):
        stream = await listeners[0].accept()
        while received.count(b"]: ") < 2:
            received += await stream.receive_some(65536)
    await stream.aclose()
    await listeners[0].aclose()
    frames = []
    while received:
        length, _, rest = received.partition(b" ")
        frames.append(rest[: int(length)])
        received = rest[int(length):]
    assert [event_of(parse(f))["kind"] for f in frames] == ["leg", "message"]


async def test_mail_flows_while_syslog_is_missing_and_events_arrive_once_it_is_there(
    moxy: StartMoxy, make_recorder: MakeRecorder, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "later.sock"
    server = await moxy(
        {"example.org": make_recorder()},
        accounting={"sinks": ["syslog"]}, **{"accounting.syslog": {"address": str(path)}},
    )
    def logged(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    for _ in range(3):  # syslog not there: dropped, logged once
        outcome = await send_one(server, ["user@example.org"])
        assert outcome.final is not None and outcome.final.code == 250
    # Events are written a moment later, in a batch: syslog must be found missing first.
    await eventually(lambda: logged("is unreachable"), what="an unreachable message")
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await listener.bind(str(path))
    with listener:
        # The sink reconnects within about a second; until then events are dropped.
        with trio.fail_after(15):
            while True:
                await send_one(server, ["user@example.org"])
                with trio.move_on_after(0.5):
                    first = parse(await listener.recv(65536))
                    break
        assert event_of(first)["kind"] in ("leg", "message")
        # Still listening: the rest of the batch (the message's other event) arrives too.
        await eventually(lambda: logged("reachable again"), what="a reachable-again message")
    assert len(logged("is unreachable")) == 1
    assert re.search(r"[1-9]\d* events dropped", logged("reachable again")[0])
