"""`moxy serve` as a real process, driven by real clients (swaks, smtplib), and its listeners."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from moxy import __version__
from peers.client import smtplib_send
from peers.moxy import MoxyProcess, StartMoxy
from peers.recorder import Recorder
from peers.sink import SmtpSink, swaks

from .helpers import BODY, HOSTNAME, SENDER, body_of, check_received, send_one, split_received

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]


def swaks_to(moxy: MoxyProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return swaks("--server", f"{moxy.host}:{moxy.port}", "--helo", "swaks.test", *args)


def test_swaks_through_moxy_serve_to_smtp_sink(
    moxy_process: StartProcess, smtp_sink: SmtpSink
) -> None:
    moxy = moxy_process({"example.org": smtp_sink})
    result = swaks_to(
        moxy, "--from", SENDER, "--to", "user@example.org",
        "--header", "Subject: swaks through moxy", "--body", "Hello from swaks.",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr + moxy.stderr()
    [message] = smtp_sink.wait_for_messages(1)
    assert message.rcpts == ("<user@example.org>",)
    assert message.text.startswith(b"Received: from swaks.test ")
    assert f"by {HOSTNAME} ".encode() in message.text
    assert b"Subject: swaks through moxy\n" in message.text
    assert b"\nHello from swaks.\n" in message.text


def test_swaks_pipelining_two_domains_to_one_sink(
    moxy_process: StartProcess, smtp_sink: SmtpSink
) -> None:
    moxy = moxy_process({"example.org": smtp_sink, "example.net": smtp_sink})
    result = swaks_to(moxy, "--pipeline", "--from", SENDER, "--to", "a@example.org,b@example.net")
    assert result.returncode == 0, result.stdout + result.stderr
    [message] = smtp_sink.wait_for_messages(1)
    assert message.rcpts == ("<a@example.org>", "<b@example.net>")


def test_swaks_to_an_unknown_domain_is_refused(
    moxy_process: StartProcess, smtp_sink: SmtpSink
) -> None:
    moxy = moxy_process({"example.org": smtp_sink})
    result = swaks_to(moxy, "--from", SENDER, "--to", "user@unknown.example")
    assert result.returncode != 0, result.stdout
    assert "<** 550 5.7.1" in result.stdout, result.stdout
    assert smtp_sink.messages() == []


async def test_smtplib_through_moxy_serve_to_a_recorder(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    import trio

    upstream = make_recorder()
    moxy = moxy_process({"example.org": upstream})
    message = b"Subject: smtplib\r\n\r\nHello.\r\n.dot\r\n"
    refused = await trio.to_thread.run_sync(
        smtplib_send, moxy.host, moxy.port, SENDER, ["user@example.org"], message
    )
    assert refused == {}
    [received] = upstream.messages
    assert received.data is not None
    header, rest = split_received(received.data)
    check_received(header, helo="smtplib.test")
    assert rest == b"Subject: smtplib\r\n\r\nHello.\r\n..dot\r\n"


def test_moxy_serve_stops_cleanly_on_sigterm(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    moxy = moxy_process({"example.org": make_recorder()})
    assert moxy.stop(signal.SIGTERM) == 0, moxy.stderr()
    # The first line names the version and the configuration, the last says stopped.
    lines = moxy.stderr().splitlines()
    assert any(f"moxy {__version__} listening on 127.0.0.1:{moxy.port} " in line
               and line.endswith(f"; configuration {moxy.config_path})") for line in lines)
    assert lines[-1].endswith(f"moxy {__version__} stopped"), lines[-3:]


def test_moxy_serve_raises_its_open_file_limit_to_the_hard_one(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    """A shell's soft limit of 1024 under a hard one of a million left clients refused for
    want of descriptors; `moxy serve` takes what the hard limit allows, as nginx and Go do."""
    import resource
    from pathlib import Path

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1024, f"RLIMIT_NOFILE hard limit {hard}: raise it (ulimit -Hn)"
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the child inherits
    try:
        moxy = moxy_process({"example.org": make_recorder()})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{moxy.process.pid}/limits").read_text().splitlines()
    [line] = [ln for ln in limits if ln.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)], line
    assert "open-file limit" not in moxy.stderr()


def test_check_config_accepts_the_suite_config(
    write_config: Callable[..., object], make_recorder: MakeRecorder
) -> None:
    path = write_config({"example.org": make_recorder()})
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- listeners -------------------------------------------------------------------------------


async def test_one_process_listens_with_the_workers_backlog(
    moxy: StartMoxy, make_recorder: MakeRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/configuration.md: a backlog of 1024 (workers.BACKLOG); one process used trio's
    default, the kernel's maximum, so the backlog depended on how Moxy was started."""
    import trio

    from moxy import workers

    backlogs: list[int | None] = []
    listen = trio.open_tcp_listeners

    async def spy(port: int, *, host: str | None = None,
                  backlog: int | None = None) -> list[trio.SocketListener]:
        backlogs.append(backlog)
        return await listen(port, host=host, backlog=backlog)

    monkeypatch.setattr(trio, "open_tcp_listeners", spy)
    await moxy({"example.org": make_recorder()})
    assert backlogs == [workers.BACKLOG] == [1024]


async def test_ipv6_listen_on_loopback(moxy: StartMoxy, make_recorder: MakeRecorder) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, listen=["[::1]:0"])
    assert [host for host, _ in server.bound] == ["::1"]
    outcome = await send_one(("::1", server.port), ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    [message] = upstream.messages
    assert message.data is not None
    header, _ = split_received(message.data)
    assert b"IPv6:::1" in header, header
    assert body_of(message) == BODY


async def test_listen_on_ipv4_and_ipv6_at_once(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, listen=["127.0.0.1:0", "[::1]:0"])
    assert sorted(host for host, _ in server.bound) == ["127.0.0.1", "::1"]
    for address in server.bound:
        outcome = await send_one(address, ["user@example.org"])
        assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert len(upstream.delivered) == 2
