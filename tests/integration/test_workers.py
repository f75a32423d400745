"""`[server] workers = N`: a master and N worker processes sharing the listening sockets."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import trio

from moxy import __version__
from peers.client import SmtpClient, smtplib_send
from peers.moxy import MoxyProcess
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import SENDER, open_session

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


async def test_a_worker_that_cannot_start_waits_longer_each_time_and_a_stop_is_heard(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    """The routes file broken since the start: the running workers keep their routes, but one
    killed cannot start again. It was restarted every second forever, and the master, asleep
    in that second with its signals blocked, merged two SIGTERMs into one (no stop at once)."""
    moxy = moxy_process({"example.org": make_recorder()}, server={"workers": 2})
    (moxy.config_path.parent / "routes").write_text("example.org mx..bad\n")
    os.kill(min(workers_of(moxy.process.pid)), signal.SIGKILL)
    await eventually(lambda: "starting it again in 4s" in moxy.stderr(), timeout=20,
                     what="the third restart's longer wait")
    assert "starting it again in 1s" in moxy.stderr()
    assert "starting it again in 2s" in moxy.stderr()
    moxy.process.send_signal(signal.SIGTERM)
    moxy.process.send_signal(signal.SIGTERM)
    moxy.stopped_by_test = True
    assert await trio.to_thread.run_sync(moxy.process.wait, 5) == 0


def test_sigterm_stops_the_master_and_every_worker(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    moxy = moxy_process({"example.org": make_recorder()}, server={"workers": 3})
    workers = workers_of(moxy.process.pid)
    assert len(workers) == 3
    assert moxy.stop(signal.SIGTERM) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    # The master's first line names the version and the configuration, its last says stopped.
    lines = moxy.stderr().splitlines()
    assert any(f"moxy {__version__} master {moxy.process.pid}: 3 workers listening on " in line
               and line.endswith(f"(configuration {moxy.config_path})") for line in lines)
    assert lines[-1].endswith(f"moxy {__version__} stopped"), lines[-3:]


async def half_a_message(moxy: MoxyProcess, subject: str) -> SmtpClient:
    """A session inside DATA, the first half of its body sent. (Its Moxy needs a
    `client_data` longer than the test's signals take on a busy machine: at the suite's 10 s
    the session once timed out first, 421 4.4.2.)"""
    client = await open_session((moxy.host, moxy.port))
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command("RCPT TO:<user@example.org>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(f"Subject: {subject}\r\n\r\nfirst half\r\n".encode())
    return client


async def test_a_stop_signal_to_the_whole_process_group_drains_the_workers_gracefully(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    """Ctrl-C and systemd's default KillMode signal every process of the group: each worker
    gets the signal itself and the master's word to drain too. That must not count as a second
    signal (which stops at once): a message in DATA still finishes."""
    upstream = make_recorder()
    moxy = moxy_process({"example.org": upstream}, server={"workers": 2},
                        timeouts={"shutdown_grace": 10, "client_data": 60})
    async with await half_a_message(moxy, "group") as client:
        for pid in (moxy.process.pid, *workers_of(moxy.process.pid)):  # as kill(-pgid) does
            os.kill(pid, signal.SIGTERM)
        await trio.sleep(1.0)
        await client.send(b"second half\r\n.\r\n")
        assert (await client.reply()).code == 250, client.dump()
    [message] = upstream.messages
    assert message.data is not None and message.data.endswith(b"first half\r\nsecond half\r\n")
    moxy.stopped_by_test = True
    try:
        status = await trio.to_thread.run_sync(moxy.process.wait, 15)
    except subprocess.TimeoutExpired:
        moxy.process.kill()
        raise AssertionError(f"moxy did not stop:\n{moxy.stderr()}") from None
    assert status == 0, moxy.stderr()
    assert "stopping now" not in moxy.stderr()


async def test_a_second_stop_signal_to_the_master_stops_the_workers_at_once(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    """The master passes both on: a message still in DATA is abandoned, never delivered."""
    upstream = make_recorder()
    moxy = moxy_process({"example.org": upstream}, server={"workers": 2},
                        timeouts={"shutdown_grace": 30, "client_data": 60})
    async with await half_a_message(moxy, "twice") as client:
        moxy.process.send_signal(signal.SIGTERM)
        await eventually(lambda: "draining workers" in moxy.stderr(), what="the first")
        moxy.process.send_signal(signal.SIGTERM)
        moxy.stopped_by_test = True
        assert await trio.to_thread.run_sync(moxy.process.wait, 15) == 0
        # No 250: told 421, the client will send it again.
        assert (await client.expect_closed()).startswith(b"421 4.3.2 ")
    assert not upstream.messages
    # The worker with the session stopped at once; the idle one may have ended already.
    assert moxy.stderr().count("SIGUSR2 again, stopping now") >= 1
