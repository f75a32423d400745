"""Reloading the configuration (SIGHUP): new sessions get the new settings and routes, a message
in progress finishes under the ones it started with, and a configuration that does not load
leaves the old one serving, with one log line saying why."""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import signal
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from moxy.config import load_config
from moxy.server import serve
from peers.client import SmtpClient
from peers.moxy import MoxyProcess
from peers.recorder import Recorder
from peers.tls import make_tls_files
from peers.waiting import eventually

from .helpers import SENDER, open_session

MakeRecorder = Callable[..., Recorder]
HEAD = b"Subject: reload\r\n\r\nbefore the reload\r\n"
TAIL = b"after the reload\r\n.\r\n"


def reconfigure(config: Path, new_destination: str) -> None:
    """The banner changes, and example.org moves to another routes file and destination."""
    (config.parent / "routes2").write_text(f"example.org {new_destination}\n")
    text = config.read_text()
    assert 'banner = "ESMTP before"' in text and 'file = "routes"' in text
    config.write_text(text.replace('banner = "ESMTP before"', 'banner = "ESMTP after"')
                      .replace('file = "routes"', 'file = "routes2"'))


async def start_in_data(address: tuple[str, int]) -> SmtpClient:
    client = await open_session(address)
    assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await client.command("RCPT TO:<user@example.org>")).code == 250
    assert (await client.command("DATA")).code == 354
    await client.send(HEAD)
    return client


async def banner(address: tuple[str, int]) -> str:
    async with await SmtpClient.connect(*address) as client:
        return (await client.reply()).lines[0]


async def send(address: tuple[str, int]) -> int:
    async with await open_session(address) as client:
        _, final = await client.send_message(SENDER, ["user@example.org"], b"Subject: x\r\n\r\n")
        await client.command("QUIT")
        return final.code if final is not None else 0


async def test_reload_serves_new_sessions_with_the_new_configuration_and_finishes_old_ones(
    write_config: Callable[..., Path], make_recorder: MakeRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="moxy")
    old, new = make_recorder(), make_recorder()
    path = write_config({"example.org": old}, server={"banner": "ESMTP before"})
    send_reload, reloads = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, load_config(path), reloads=reloads)
        )
        assert await banner(address) == "mx.moxy.test ESMTP before"
        busy = await start_in_data(address)
        idle = await open_session(address)  # a session between messages keeps its settings too
        reconfigure(path, new.address)
        await send_reload.send(None)
        await eventually(lambda: "reloaded" in caplog.text, what="the reload")
        assert await banner(address) == "mx.moxy.test ESMTP after"
        assert await send(address) == 250
        await busy.send(TAIL)
        assert (await busy.reply()).code == 250
        await busy.aclose()
        assert (await idle.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await idle.command("RCPT TO:<user@example.org>")).code == 250
        await idle.command("QUIT")
        await idle.aclose()
        # The old configuration's route sources are closed once its last session has ended.
        await eventually(lambda: "configuration 1: last session ended" in caplog.text,
                         what="the old configuration's end")
        nursery.cancel_scope.cancel()
    [finished] = old.messages
    assert finished.data is not None and finished.data.endswith(HEAD.split(b"\r\n\r\n")[1]
                                                                 + TAIL[:-3])
    assert len(new.messages) == 1


async def test_a_reload_unfreezes_what_the_start_froze(
    write_config: Callable[..., Path], make_recorder: MakeRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`moxy serve` freezes what its start made (gc.freeze); the configuration a reload
    replaces is part of it and must become collectable again."""
    caplog.set_level(logging.INFO, logger="moxy")
    path = write_config({"example.org": make_recorder()}, server={"banner": "ESMTP before"})
    send_reload, reloads = trio.open_memory_channel[None](1)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve, load_config(path), reloads=reloads))
            gc.freeze()  # as daemon._main does once serve() has started
            assert gc.get_freeze_count() > 0
            await send_reload.send(None)
            await eventually(lambda: "reloaded" in caplog.text, what="the reload")
            assert gc.get_freeze_count() == 0
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()


async def test_a_configuration_that_does_not_load_leaves_the_old_one_serving(
    write_config: Callable[..., Path], make_recorder: MakeRecorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = make_recorder()
    path = write_config({"example.org": upstream}, server={"banner": "ESMTP before"})
    send_reload, reloads = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, load_config(path), reloads=reloads)
        )
        for broken in ("[limits]\nrecipients = 'ten'\n", "not toml ["):
            path.write_text(path.read_text().replace("[limits]", "") + broken)
            caplog.clear()
            await send_reload.send(None)
            await eventually(lambda: caplog.records, what="a log line")
            [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert record.getMessage().startswith(
                f"reload failed, still serving the previous configuration: {path}: "
            )
            assert "\n" not in record.getMessage()
            assert await banner(address) == "mx.moxy.test ESMTP before"
            assert await send(address) == 250
        # A broken routes file too: its line is named.
        path.write_text('[routes]\nfile = "routes"\n')
        (path.parent / "routes").write_text("example.org mx..bad\n")
        caplog.clear()
        await send_reload.send(None)
        await eventually(lambda: caplog.records, what="a log line")
        assert "routes:1:" in caplog.records[0].getMessage()
        assert await send(address) == 250
        nursery.cancel_scope.cancel()
    assert len(upstream.messages) == 3


# --- the signal, in a real process -----------------------------------------------------------


def stderr_lines(moxy: MoxyProcess, text: str) -> list[str]:
    return [line for line in moxy.stderr().splitlines() if text in line]


async def test_sighup_during_a_message_reloads_and_the_message_completes(
    moxy_process: Callable[..., MoxyProcess], make_recorder: MakeRecorder
) -> None:
    old, new = make_recorder(), make_recorder()
    moxy = moxy_process({"example.org": old}, server={"banner": "ESMTP before"})
    address = (moxy.host, moxy.port)
    busy = await start_in_data(address)
    reconfigure(moxy.config_path, new.address)
    moxy.process.send_signal(signal.SIGHUP)
    await eventually(lambda: stderr_lines(moxy, "reloaded"), timeout=10, what="the reload")
    assert await banner(address) == "mx.moxy.test ESMTP after"
    await busy.send(TAIL)
    assert (await busy.reply()).code == 250
    await busy.aclose()
    assert await send(address) == 250
    assert (len(old.messages), len(new.messages)) == (1, 1)
    # Broken now: one line, and the reloaded configuration keeps serving.
    moxy.config_path.write_text("[server\n")
    moxy.process.send_signal(signal.SIGHUP)
    await eventually(lambda: stderr_lines(moxy, "reload failed"), timeout=10, what="the line")
    assert len(stderr_lines(moxy, "reload failed")) == 1
    assert await send(address) == 250
    assert len(new.messages) == 2
    assert moxy.process.poll() is None


async def test_sighup_with_workers_reloads_every_worker_and_the_master_checks_first(
    moxy_process: Callable[..., MoxyProcess], make_recorder: MakeRecorder
) -> None:
    old, new = make_recorder(), make_recorder()
    moxy = moxy_process({"example.org": old}, server={"banner": "ESMTP before", "workers": 2})
    address = (moxy.host, moxy.port)
    reconfigure(moxy.config_path, new.address)
    moxy.process.send_signal(signal.SIGHUP)
    await eventually(lambda: len(stderr_lines(moxy, "reloaded")) == 2, timeout=10,
                     what="both workers' reloads")
    for _ in range(4):  # whichever worker takes it
        assert await banner(address) == "mx.moxy.test ESMTP after"
        assert await send(address) == 250
    assert (len(old.messages), len(new.messages)) == (0, 4)
    moxy.config_path.write_text("[server\n")
    moxy.process.send_signal(signal.SIGHUP)
    await eventually(lambda: stderr_lines(moxy, "reload failed"), timeout=10, what="the line")
    await trio.sleep(0.5)  # workers would log theirs by now if the master had passed it on
    assert len(stderr_lines(moxy, "reload failed")) == 1
    assert len(stderr_lines(moxy, "reloaded")) == 2
    assert await send(address) == 250


def _children(pid: int) -> list[int]:
    return [int(child) for child in
            Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_a_worker_started_again_after_a_reload_keeps_the_restart_only_settings(
    moxy_process: Callable[..., MoxyProcess], make_recorder: MakeRecorder
) -> None:
    """[accounting] waits for the next restart of Moxy: a worker the master starts again after
    a reload must not take it up on its own (its message log stays in the started format)."""
    recorder = make_recorder()
    moxy = moxy_process({"example.org": recorder}, server={"workers": 2},
                        accounting={"process": False})
    address = (moxy.host, moxy.port)
    text = moxy.config_path.read_text()
    moxy.config_path.write_text(text + '\n[accounting.file]\nformat = "json"\n')
    moxy.process.send_signal(signal.SIGHUP)
    await eventually(lambda: len(stderr_lines(moxy, "reloaded")) == 2, timeout=10,
                     what="both workers' reloads")
    assert len(stderr_lines(moxy, "[accounting] changed; it takes effect at the next "
                                  "restart")) == 2
    workers = _children(moxy.process.pid)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    await eventually(lambda: len(stderr_lines(moxy, "starting it again")) == 2, timeout=10,
                     what="both workers started again")
    for _ in range(3):
        assert await send(address) == 250

    def message_lines() -> list[str]:
        return [line for line in moxy.log_file.read_text().splitlines()
                if " message " in line or '"message"' in line]

    await eventually(lambda: len(message_lines()) == 3, timeout=10, what="3 messages logged")
    assert all(" message node=" in line and not line.startswith("{")
               for line in message_lines()), message_lines()


def _starttls_verifies(address: tuple[str, int], ca: Path) -> bool:
    """Blocking: does Moxy's STARTTLS certificate verify against `ca`?"""
    with smtplib.SMTP(*address, "reload.test", timeout=10) as smtp:
        try:
            smtp.starttls(context=ssl.create_default_context(cafile=str(ca)))
        except ssl.SSLCertVerificationError:
            return False
        return True


async def test_reload_reads_the_certificates_again(
    write_config: Callable[..., Path], make_recorder: MakeRecorder, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="moxy")
    first, second = make_tls_files(tmp_path / "first"), make_tls_files(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key"):
        shutil.copy(tmp_path / "first" / name, live / name)
    path = write_config(
        {"example.org": make_recorder()},
        tls={"cert": str(live / "server.crt"), "key": str(live / "server.key")},
    )
    send_reload, reloads = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, load_config(path), reloads=reloads)
        )
        assert await trio.to_thread.run_sync(_starttls_verifies, address, first.ca)
        # The certificate is renewed in place (as certbot does), then Moxy is told to reload.
        for name in ("server.crt", "server.key"):
            shutil.copy(tmp_path / "second" / name, live / name)
        await send_reload.send(None)
        await eventually(lambda: "reloaded" in caplog.text, what="the reload")
        assert await trio.to_thread.run_sync(_starttls_verifies, address, second.ca)
        assert not await trio.to_thread.run_sync(_starttls_verifies, address, first.ca)
        nursery.cancel_scope.cancel()


def _break_tls(live: Path, other: Path, how: str) -> None:
    """The certificate files in `live` made unusable, as a renewal gone wrong leaves them."""
    if how == "missing":
        (live / "server.key").unlink()
    elif how == "garbage":
        (live / "server.crt").write_text("not a certificate\n")
    else:  # "mismatch": another certificate's key
        shutil.copy(other / "server.key", live / "server.key")


@pytest.mark.parametrize("how", ["missing", "garbage", "mismatch"])
async def test_a_reload_whose_certificate_cannot_be_used_keeps_the_old_one_serving(
    write_config: Callable[..., Path], make_recorder: MakeRecorder, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, how: str,
) -> None:
    """The certificate was read only once the new generation was built, after the checks: a
    bad one ended the server with a traceback (and every worker, again at each restart)."""
    first, _ = make_tls_files(tmp_path / "first"), make_tls_files(tmp_path / "other")
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "first", live)
    path = write_config(
        {"example.org": make_recorder()}, server={"banner": "ESMTP before"},
        tls={"cert": str(live / "server.crt"), "key": str(live / "server.key")},
    )
    send_reload, reloads = trio.open_memory_channel[None](1)
    async with trio.open_nursery() as nursery:
        [address, *_] = await nursery.start(
            functools.partial(serve, load_config(path), reloads=reloads)
        )
        _break_tls(live, tmp_path / "other", how)
        path.write_text(path.read_text().replace("ESMTP before", "ESMTP after"))
        await send_reload.send(None)
        await eventually(lambda: "reload failed" in caplog.text, what="the log line")
        [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert record.getMessage().startswith(
            f"reload failed, still serving the previous configuration: {path}: tls."
        ), record.getMessage()
        assert await banner(address) == "mx.moxy.test ESMTP before"
        assert await trio.to_thread.run_sync(_starttls_verifies, address, first.ca)
        assert await send(address) == 250
        nursery.cancel_scope.cancel()


async def test_with_workers_the_master_reads_the_certificate_before_passing_a_reload_on(
    moxy_process: Callable[..., MoxyProcess], make_recorder: MakeRecorder, tmp_path: Path
) -> None:
    first = make_tls_files(tmp_path / "first")
    live = tmp_path / "live"
    shutil.copytree(tmp_path / "first", live)
    moxy = moxy_process(
        {"example.org": make_recorder()}, server={"workers": 2},
        tls={"cert": str(live / "server.crt"), "key": str(live / "server.key")},
    )
    address = (moxy.host, moxy.port)
    (live / "server.crt").write_text("not a certificate\n")
    moxy.process.send_signal(signal.SIGHUP)
    await eventually(lambda: stderr_lines(moxy, "reload failed"), timeout=10, what="the line")
    await trio.sleep(0.5)  # workers would log theirs by now if the master had passed it on
    assert len(stderr_lines(moxy, "reload failed")) == 1
    assert "tls.cert" in stderr_lines(moxy, "reload failed")[0]
    assert not stderr_lines(moxy, "Traceback") and not stderr_lines(moxy, "ended (")
    for _ in range(4):  # whichever worker takes it
        assert await trio.to_thread.run_sync(_starttls_verifies, address, first.ca)
        assert await send(address) == 250
