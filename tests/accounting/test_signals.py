"""`moxy serve` as a process: SIGUSR1 reopens the message log (logrotate), SIGTERM writes every
pending event before the process exits, with and without worker processes."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest
import trio

from integration.helpers import SENDER, open_session
from peers.client import smtplib_send
from peers.moxy import MoxyProcess
from peers.recorder import Recorder
from peers.waiting import eventually

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]


async def send(moxy: MoxyProcess, n: int) -> None:
    message = f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode()
    refused = await trio.to_thread.run_sync(
        smtplib_send, moxy.host, moxy.port, SENDER, ["user@example.org"], message
    )
    assert refused == {}


async def send_many(moxy: MoxyProcess, count: int) -> None:
    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(send, moxy, n)


def lines(moxy: MoxyProcess, name: str = "moxy.log") -> list[str]:
    try:
        return (moxy.log_file.parent / name).read_text().splitlines()
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_reopens_the_message_log_after_it_was_moved_away(
    moxy_process: StartProcess, make_recorder: MakeRecorder, workers: int
) -> None:
    moxy = moxy_process({"example.org": make_recorder()}, server={"workers": workers})
    await send_many(moxy, 3)
    await eventually(lambda: len(lines(moxy)) == 6, what="6 lines in moxy.log")
    moxy.log_file.rename(moxy.log_file.with_name("moxy.log.1"))  # what logrotate does
    os.kill(moxy.process.pid, signal.SIGUSR1)
    await eventually(
        lambda: moxy.stderr().count("reopening the message log") == workers,
        what=f"{workers} reopen messages",
    )
    await send_many(moxy, 6)
    await eventually(lambda: len(lines(moxy)) == 12, what="12 lines in the new moxy.log")
    assert len(lines(moxy, "moxy.log.1")) == 6
    assert sum(" message " in line for line in lines(moxy)) == 6
    assert moxy.process.poll() is None  # SIGUSR1 did not stop anything


async def test_sigterm_writes_the_events_of_a_message_finished_during_the_drain(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    moxy = moxy_process({"example.org": upstream}, timeouts={"shutdown_grace": 20})
    busy = await open_session((moxy.host, moxy.port))
    assert (await busy.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await busy.command("RCPT TO:<user@example.org>")).code == 250
    assert (await busy.command("DATA")).code == 354
    await busy.send(b"Subject: drain\r\n\r\nfirst half\r\n")
    moxy.stopped_by_test = True
    moxy.process.send_signal(signal.SIGTERM)
    await eventually(lambda: "shutting down" in moxy.stderr(), what="the drain to start")
    await busy.send(b"second half\r\n.\r\n")
    assert (await busy.reply()).code == 250
    await busy.aclose()
    assert await trio.to_thread.run_sync(moxy.process.wait, 15) == 0
    kinds = [line.split(" ")[1] for line in lines(moxy)]
    assert kinds == ["leg", "message"], lines(moxy)
    assert all(" code=250 " in line for line in lines(moxy))


async def test_sigterm_with_workers_writes_every_workers_events(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    moxy = moxy_process({"example.org": make_recorder()}, server={"workers": 2},
                        **{"accounting.file": {"format": "json"}})
    await send_many(moxy, 16)
    assert moxy.stop(signal.SIGTERM, timeout=20) == 0  # at once: no waiting for the log
    records = lines(moxy)
    assert sum('"kind":"message"' in line for line in records) == 16
    assert sum('"kind":"leg"' in line for line in records) == 16
