"""Graceful shutdown: no new connections, idle sessions get 421, a message in DATA is finished
within `timeouts.shutdown_grace`, and one that is not is never delivered in part."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from moxy.config import load_config
from moxy.server import serve
from peers.client import SmtpClient
from peers.moxy import MoxyProcess
from peers.recorder import HANG, Recorder
from peers.tls import TlsFiles

from .helpers import SENDER, open_session

MakeRecorder = Callable[..., Recorder]
HEAD = b"Subject: shutdown\r\n\r\nfirst half\r\n"
TAIL = b"second half\r\n.\r\n"


async def start_in_data(address: tuple[str, int]) -> SmtpClient:
    client = await open_session(address)
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command("RCPT TO:<user@example.org>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(HEAD)
    return client


async def test_shutdown_lets_a_message_in_data_finish_and_tells_idle_sessions_421(
    write_config: Callable[..., Path], make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    config = load_config(write_config({"example.org": upstream}, timeouts={"shutdown_grace": 20}))
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(functools.partial(serve, config, shutdown=shutdown))
        idle = await open_session(address)
        busy = await start_in_data(address)
        shutdown.set()

        goodbye = await idle.reply()
        assert (goodbye.code, goodbye.lines[0][:5]) == (421, "4.3.2")
        with pytest.raises(OSError):  # the listener is closed: no new sessions
            await SmtpClient.connect(*address)
        await busy.send(TAIL)
        assert (await busy.reply()).code == 250  # finished, and delivered
        after = await busy.reply()
        assert (after.code, after.lines[0][:5]) == (421, "4.3.2")
        # serve() returns by itself once the sessions are gone, well within the grace time.
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.05)
    [message] = upstream.messages
    assert message.data is not None
    assert message.data.endswith(b"Subject: shutdown\r\n\r\nfirst half\r\nsecond half\r\n")


def shutdown_events(config_path: Path) -> list[str]:
    log = (config_path.parent / "moxy.log").read_text().splitlines()
    return [line for line in log if " reason=shutdown " in line]


async def test_a_message_not_finished_within_the_grace_time_is_not_delivered(
    write_config: Callable[..., Path], make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    path = write_config({"example.org": upstream}, timeouts={"shutdown_grace": 0.5})
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(functools.partial(serve, load_config(path),
                                                              shutdown=shutdown))
        stalled = await start_in_data(address)
        shutdown.set()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.05)
        goodbye = await stalled.reply()  # told, then the connection is gone
        assert (goodbye.code, goodbye.lines[0][:5]) == (421, "4.3.2")
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the session is gone: writes fail once the RST is back
                await stalled.send(TAIL)
                await trio.sleep(0.01)
    upstream.wait_closed(0)
    assert upstream.messages == []
    [event] = shutdown_events(path)
    assert " message " in event and " stage=data " in event and " code=421 " in event
    size = int(event.split(" size=")[1].split()[0])
    assert 0 < size <= len(HEAD)  # the body as far as it came (a last CRLF may be held back)


async def test_a_verdict_not_heard_within_the_grace_time_is_logged_as_a_possible_duplicate(
    write_config: Callable[..., Path], make_recorder: MakeRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = make_recorder({"end_of_data": HANG})  # has the whole message, never answers
    path = write_config({"example.org": upstream}, timeouts={"shutdown_grace": 0.5})
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(functools.partial(serve, load_config(path),
                                                              shutdown=shutdown))
        client = await start_in_data(address)
        await client.send(TAIL)
        with trio.fail_after(5):
            while not upstream.messages:  # the end of data has reached the destination
                await trio.sleep(0.01)
        shutdown.set()
        goodbye = await client.reply()
        assert (goodbye.code, goodbye.lines[0][:5]) == (421, "4.3.2")
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.05)
    [event] = shutdown_events(path)
    assert " message " in event and " stage=end-of-data " in event and " code=421 " in event
    assert "duplicate possible" in caplog.text


async def test_a_client_waiting_for_a_destinations_answer_at_the_end_of_the_grace_hears_421(
    write_config: Callable[..., Path], make_recorder: MakeRecorder
) -> None:
    """Its RCPT still unanswered (the destination hangs): the connection was simply closed."""
    upstream = make_recorder({"rcpt": HANG})
    path = write_config({"example.org": upstream},
                        timeouts={"shutdown_grace": 0.5, "upstream_rcpt": 30})
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(functools.partial(serve, load_config(path),
                                                              shutdown=shutdown))
        client = await open_session(address)
        # Pipelined: MAIL's reply waits to go with the RCPT's (RFC 2920), owed all the same.
        await client.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<user@example.org>\r\n".encode())
        with trio.fail_after(5):
            while not upstream.connections or "RCPT" not in upstream.verbs(0):
                await trio.sleep(0.01)
        shutdown.set()
        assert (await client.reply()).code == 250
        goodbye = await client.reply()
        assert (goodbye.code, goodbye.lines[0][:5]) == (421, "4.3.2")
        assert await client.expect_closed() == b""


async def test_a_connection_still_owing_its_proxy_header_does_not_hold_the_stop(
    write_config: Callable[..., Path], make_recorder: MakeRecorder
) -> None:
    path = write_config(
        {"example.org": make_recorder()}, timeouts={"shutdown_grace": 60, "client_command": 60},
        server={"listen_proxy": ["127.0.0.1:0"], "proxy_protocol_from": ["127.0.0.0/8"]},
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(serve, load_config(path),
                                                      shutdown=shutdown))
        async with await SmtpClient.connect(*bound[-1]) as balancer:
            await balancer.send(b"PROXY TCP4 192.0.2.1")  # and the rest never comes
            await trio.sleep(0.2)
            shutdown.set()
            with trio.fail_after(10):
                while nursery.child_tasks:
                    await trio.sleep(0.05)
            assert await balancer.expect_closed() == b""


async def test_a_starttls_handshake_that_stalls_does_not_hold_the_stop(
    write_config: Callable[..., Path], make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    """A client that says STARTTLS and then nothing held a graceful stop for the whole
    shutdown grace (30 s by default): the handshake was the one wait the drain could not cut."""
    path = write_config(
        {"example.org": make_recorder()}, timeouts={"shutdown_grace": 60, "client_command": 60},
        tls={"cert": str(tls_files.cert), "key": str(tls_files.key)},
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(functools.partial(serve, load_config(path),
                                                              shutdown=shutdown))
        stalled = await open_session(address)
        assert (await stalled.command("STARTTLS")).code == 220  # and no ClientHello
        shutdown.set()
        with trio.fail_after(10):
            while nursery.child_tasks:
                await trio.sleep(0.05)
        assert await stalled.expect_closed() == b""


def test_sigterm_drains_and_the_process_exits_0(
    moxy_process: Callable[..., MoxyProcess], make_recorder: MakeRecorder
) -> None:
    moxy = moxy_process({"example.org": make_recorder()})
    assert moxy.stop(signal.SIGTERM) == 0
    assert "stopping (again to stop at once)" in moxy.stderr()
