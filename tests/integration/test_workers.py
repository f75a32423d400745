"""`[server] workers = N`: a master and N worker processes sharing the listening sockets."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import trio

from peers.client import smtplib_send
from peers.moxy import MoxyProcess
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import SENDER

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]


def workers_of(master: int) -> set[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children}


async def send(moxy: MoxyProcess, n: int) -> None:
    message = f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode()
    refused = await trio.to_thread.run_sync(
        smtplib_send, moxy.host, moxy.port, SENDER, ["user@example.org"], message
    )
    assert refused == {}


async def test_workers_share_the_listener_and_every_message_is_delivered_once(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    moxy = moxy_process({"example.org": upstream}, server={"workers": 2})
    assert len(workers_of(moxy.process.pid)) == 2
    async with trio.open_nursery() as nursery:
        for n in range(20):
            nursery.start_soon(send, moxy, n)
    assert sorted(m.data.split(b"message ")[1] for m in upstream.messages if m.data) == sorted(
        f"{n}\r\n".encode() for n in range(20)
    )
    # The workers share one message log; every line is whole (one write() per batch). The log
    # is written in the background, so its last lines may land just after the last 250.
    def message_lines() -> list[str]:
        return [line for line in moxy.log_file.read_text().splitlines() if " message " in line]

    await eventually(lambda: len(message_lines()) == 20, what="20 message log lines")
    assert all(line.endswith('"') and line.count(" session=") == 1 for line in message_lines())


async def test_a_worker_that_dies_is_replaced_and_mail_keeps_flowing(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    moxy = moxy_process({"example.org": upstream}, server={"workers": 2})
    before = workers_of(moxy.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    await eventually(
        lambda: len(workers_of(moxy.process.pid) - {victim}) == 2,
        timeout=10, what="a replacement worker",
    )
    for n in range(4):
        await send(moxy, n)
    assert len(upstream.messages) == 4
    assert "ended (killed by SIGKILL); starting it again" in moxy.stderr()


def test_sigterm_stops_the_master_and_every_worker(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    moxy = moxy_process({"example.org": make_recorder()}, server={"workers": 3})
    workers = workers_of(moxy.process.pid)
    assert len(workers) == 3
    assert moxy.stop(signal.SIGTERM) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
