"""Dead-destination memory and per-destination concurrency (docs/semantics.md, "Destinations
that are down"): one sender pays for a dark destination, the next ones hear 451 at once, one
attempt finds out when it is back, and a dark domain never holds more than its cap of Moxy's
connections. Timings are asserted with wide margins: "at once" is under a second where the
timeout is two or more."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from peers import dark
from peers.client import ConnectionLost, ServerReply, SmtpClient
from peers.moxy import MoxyProcess, RunningMoxy, StartMoxy, routes_text
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import BODY, SENDER, Outcome, open_session, send_one

MakeRecorder = Callable[..., Recorder]

FAST = 1.0  # an answer "at once", on a loaded machine
TIMEOUT = 2.0  # the stage timeout a dark destination costs


async def timed_send(server: RunningMoxy, rcpt: str = "user@example.org") -> tuple[Outcome, float]:
    start = time.monotonic()
    outcome = await send_one(server, [rcpt])
    return outcome, time.monotonic() - start


def rcpt_of(outcome: Outcome) -> tuple[int, str | None]:
    reply = outcome.rcpt[0]
    return reply.code, reply.enhanced


@contextlib.contextmanager
def dark_destination(kind: str) -> Iterator[str]:
    if kind == "refusing":
        yield dark.refusing_address()
    else:
        with (dark.black_hole() if kind == "black hole" else dark.silent_listener()) as address:
            yield address


@pytest.mark.parametrize("kind", ["black hole", "silent", "refusing"])
async def test_one_sender_waits_for_a_dark_destination_the_next_ones_hear_451_at_once(
    moxy: StartMoxy, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.DEBUG, "moxy")
    with dark_destination(kind) as address:
        server = await moxy(
            {"example.org": address},
            timeouts={"upstream_connect": TIMEOUT, "upstream_greeting": TIMEOUT},
        )
        first, waited = await timed_send(server)
        assert rcpt_of(first) == (451, "4.4.1"), first.transcript
        if kind != "refusing":
            assert waited >= TIMEOUT * 0.9
        for _ in range(3):
            outcome, waited = await timed_send(server)
            assert rcpt_of(outcome) == (451, "4.4.1"), outcome.transcript
            assert "recently failed" in outcome.rcpt[0].text
            assert waited < FAST
    assert f"destination {address} marked down for 30s" in caplog.text
    # Logged once, at the marking: the recipients refused while it is down are not a line
    # each at the default level (200,000 lines in 20 minutes, seen).
    skipped = [r for r in caplog.records if r.getMessage().startswith("upstream ")
               and ": down: " in r.getMessage()]
    assert len(skipped) == 3 and all(r.levelno == logging.DEBUG for r in skipped), [
        (r.levelname, r.getMessage()) for r in caplog.records]


async def test_the_dead_set_holds_addresses_after_resolution(
    moxy: StartMoxy, make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = make_recorder()
    dead_port = dark.refusing_address().rsplit(":", 1)[1]
    server = await moxy({
        "example.org": f"localhost:{dead_port}",
        "example.net": f"127.0.0.1:{dead_port}",
        "example.com": f"localhost:{upstream.port}",
    })
    first, _ = await timed_send(server, "user@example.org")
    assert rcpt_of(first) == (451, "4.4.1")
    assert f"destination 127.0.0.1:{dead_port} marked down" in caplog.text
    # Another route naming the same address by its IP is known down too.
    other, _ = await timed_send(server, "user@example.net")
    assert "recently failed" in other.rcpt[0].text, other.transcript
    named, _ = await timed_send(server, "user@example.com")  # a host name that answers
    assert named.final is not None and named.final.code == 250, named.transcript


async def test_failover_skips_a_dead_first_alternative_at_once(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    backup = make_recorder()
    with dark.black_hole() as hole:
        server = await moxy(
            {"example.org": f"{hole}|{backup.address}"}, timeouts={"upstream_connect": TIMEOUT}
        )
        first, waited = await timed_send(server)
        assert first.final is not None and first.final.code == 250, first.transcript
        assert waited >= TIMEOUT * 0.9
        second, waited = await timed_send(server)
        assert second.final is not None and second.final.code == 250, second.transcript
        assert waited < FAST
    assert len(backup.messages) == 2


async def test_recovery_is_noticed_once_the_down_time_is_up(
    moxy: StartMoxy, make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = make_recorder({"greeting": ["554 5.3.2 Not now", "220 recorder.test ESMTP"]})
    server = await moxy({"example.org": upstream}, destinations={"down_time": 1.0})
    first, _ = await timed_send(server)
    assert rcpt_of(first) == (451, "4.4.1") and "at greeting" in first.rcpt[0].text
    second, _ = await timed_send(server)
    assert "recently failed" in second.rcpt[0].text, second.transcript
    assert len(upstream.connections) == 1  # the second sender did not try it
    await trio.sleep(1.2)
    third, _ = await timed_send(server)
    assert third.final is not None and third.final.code == 250, third.transcript
    assert len(upstream.messages) == 1
    assert f"destination {upstream.address} up again" in caplog.text


async def test_one_attempt_finds_out_and_the_others_do_not_pile_on(
    moxy: StartMoxy, caplog: pytest.LogCaptureFixture
) -> None:
    with dark.black_hole() as hole:
        server = await moxy(
            {"example.org": hole},
            timeouts={"upstream_connect": TIMEOUT},
            destinations={"down_time": 0.5},
        )
        await timed_send(server)  # marks it down
        await trio.sleep(0.7)  # the down time is up: the next leg may try
        waits: list[float] = []
        outcomes: list[Outcome] = []

        async def one() -> None:
            outcome, waited = await timed_send(server)
            outcomes.append(outcome)
            waits.append(waited)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
    assert all(rcpt_of(o) == (451, "4.4.1") for o in outcomes)
    waits.sort()
    assert waits[0] < FAST and waits[1] < FAST, waits  # told at once: the retry is under way
    assert waits[2] >= TIMEOUT * 0.9, waits  # the one retry waited for the connect timeout
    assert f"destination {hole} still down (2 failures), marked down for 1s" in caplog.text


async def test_a_route_change_is_obeyed_at_once(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    dead = dark.refusing_address()
    server = await moxy({"example.org": dead}, routes={"reload_interval": 0.1})
    first, _ = await timed_send(server)
    assert rcpt_of(first) == (451, "4.4.1")
    upstream = make_recorder()
    routes = server.config_path.parent / "routes"
    routes.write_text(routes_text({"example.org": upstream}))
    with trio.fail_after(10):  # until the file watcher has seen the change
        while True:
            outcome, _ = await timed_send(server)
            if outcome.final is not None:
                break
            assert "recently failed" in outcome.rcpt[0].text, outcome.transcript
            await trio.sleep(0.05)
    assert outcome.final.code == 250, outcome.transcript  # the new address has no history
    assert len(upstream.messages) == 1


async def _rcpt_only(server: RunningMoxy, rcpt: str) -> tuple[ServerReply, float]:
    async with await open_session(server) as client:
        await client.command(f"MAIL FROM:<{SENDER}>")
        start = time.monotonic()
        reply = await client.command(f"RCPT TO:<{rcpt}>")
        return reply, time.monotonic() - start


async def test_past_the_concurrency_cap_a_recipient_waits_briefly_then_gets_451_4_4_5(
    moxy: StartMoxy,
) -> None:
    with dark.silent_listener() as silent:
        server = await moxy(
            {"example.org": silent},
            timeouts={"upstream_greeting": 2.5},
            destinations={"concurrency": 2, "concurrency_wait": 0.3},
        )
        results: list[tuple[ServerReply, float]] = []

        async def one() -> None:
            results.append(await _rcpt_only(server, "user@example.org"))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
    busy = [(r, w) for r, w in results if r.enhanced == "4.4.5"]
    timed_out = [(r, w) for r, w in results if r.enhanced == "4.4.1"]
    assert len(busy) == 2 and len(timed_out) == 2, results
    assert all(r.code == 451 and 0.25 <= w < 2.0 for r, w in busy), busy
    assert all(w >= 2.2 for _, w in timed_out), timed_out


async def test_a_destination_override_sets_its_own_cap(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    with dark.silent_listener() as silent:
        server = await moxy(
            {"example.org": silent, "example.net": make_recorder()},
            timeouts={"upstream_greeting": 2.0},
            destinations={"concurrency_wait": 0.2},
            **{f'destinations.override."{silent}"': {"concurrency": 1}},
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_rcpt_only, server, "user@example.org")  # holds the only slot
            await trio.sleep(0.3)
            reply, waited = await _rcpt_only(server, "user@example.org")
            assert (reply.code, reply.enhanced) == (451, "4.4.5")
            assert waited < 1.5
            other = await send_one(server, ["user@example.net"])  # the default cap elsewhere
            assert other.final is not None and other.final.code == 250, other.transcript


async def test_a_flood_to_a_dark_domain_does_not_stop_mail_to_another(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """12 senders loop on a domain whose server swallows SYNs, with only 8 connections: without
    the cap they would all sit in a 10 s connect and every other sender would get 421."""
    live = make_recorder()
    with dark.black_hole() as hole:
        server = await moxy(
            {"dark.example": hole, "live.example": live},
            limits={"connections": 8},
            timeouts={"upstream_connect": 10.0},
            destinations={"concurrency": 2, "concurrency_wait": 0.2},
        )
        stop = trio.Event()

        async def flood() -> None:
            for _ in range(200):  # bounded, whatever happens
                if stop.is_set():
                    return
                with contextlib.suppress(AssertionError, OSError, trio.BrokenResourceError):
                    await send_one(server, ["someone@dark.example"])
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(flood)
            await trio.sleep(0.5)  # the dark destination's two slots are taken
            start = time.monotonic()
            final = await _send_until_admitted(server, "user@live.example", deadline=6.0)
            waited = time.monotonic() - start
            stop.set()
            nursery.cancel_scope.cancel()
    assert final.code == 250, final
    assert waited < 6.0
    assert len(live.messages) == 1


async def _send_until_admitted(server: RunningMoxy, rcpt: str, deadline: float) -> ServerReply:
    """Send one message, connecting again while Moxy is at its connection limit (421)."""
    with trio.fail_after(deadline):
        while True:
            client = await SmtpClient.connect(server.host, server.port)
            async with client:
                try:
                    greeting = await client.reply()
                except (ConnectionLost, trio.BrokenResourceError):
                    greeting = ServerReply(421, ("closed",))  # refused and closed at once
                if greeting.code == 421:
                    await trio.sleep(0.02)
                    continue
                assert (await client.command("EHLO client.test")).code == 250
                _, final = await client.send_message(SENDER, [rcpt], BODY)
                assert final is not None, client.dump()
                return final


# --- seeing and clearing the dead set -------------------------------------------------------


async def moxy_cli(config: Path, *args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "moxy", "destinations", *args, "-c", str(config)],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_the_dead_set_is_listed_and_cleared_through_the_control_socket(
    moxy: StartMoxy, make_recorder: MakeRecorder, short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = make_recorder({"greeting": ["421 4.3.2 Not now", "220 recorder.test ESMTP"]})
    dead = dark.refusing_address()
    server = await moxy(
        {"example.org": upstream, "example.net": dead},
        destinations={"control_socket": str(short_tmp / "control")},
    )
    assert (short_tmp / "control").is_socket()
    status, out, err = await moxy_cli(server.config_path, "list")
    assert (status, out, err) == (0, "", "")
    await timed_send(server, "user@example.org")
    await timed_send(server, "user@example.net")
    status, out, err = await moxy_cli(server.config_path, "list")
    assert status == 0, err
    lines = sorted(out.splitlines())
    assert len(lines) == 2, out
    assert any(line.startswith(f"{upstream.address}  down since ") and "1 failures" in line
               and "greeting: service closing" in line for line in lines), out
    assert any(line.startswith(f"{dead}  down since ") and "Connection refused" in line
               for line in lines), out

    status, out, err = await moxy_cli(server.config_path, "clear", upstream.address)
    assert (status, out.strip()) == (0, f"cleared {upstream.address}"), err
    assert f"destination {upstream.address} cleared" in caplog.text
    outcome, _ = await timed_send(server, "user@example.org")  # tried again at once
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript

    status, out, err = await moxy_cli(server.config_path, "clear", upstream.address)
    assert (status, out, err) == (1, "", f"moxy: {upstream.address} is not marked down\n")
    status, out, err = await moxy_cli(server.config_path, "clear")
    assert (status, out.strip()) == (0, f"cleared {dead}"), err
    status, out, err = await moxy_cli(server.config_path, "list")
    assert (status, out) == (0, "")


async def test_destinations_cli_without_a_control_socket_or_a_server_says_so(
    write_config: Callable[..., Path], short_tmp: Path
) -> None:
    unset = write_config({"example.org": "127.0.0.1:25"})
    status, out, err = await moxy_cli(unset, "list")
    assert status == 2 and out == ""
    assert err.startswith("moxy: ") and "control_socket is not set" in err
    assert err.count("\n") == 1
    not_running = write_config(
        {"example.org": "127.0.0.1:25"},
        destinations={"control_socket": str(short_tmp / "nobody")},
    )
    status, out, err = await moxy_cli(not_running, "list")
    assert status == 3 and out == ""
    assert err == (f"moxy: cannot ask the server at {short_tmp / 'nobody'}: No such file or "
                   "directory (is Moxy running?)\n")


async def test_with_workers_each_worker_answers_on_its_own_socket(
    moxy_process: Callable[..., MoxyProcess], short_tmp: Path
) -> None:
    dead = dark.refusing_address()
    running = moxy_process(
        {"example.org": dead},
        server={"workers": 2},
        destinations={"control_socket": str(short_tmp / "control")},
    )
    sockets = [short_tmp / "control.0", short_tmp / "control.1"]
    await eventually(lambda: all(p.is_socket() for p in sockets), what="both control sockets")
    outcome = await send_one((running.host, running.port), ["user@example.org"])
    assert rcpt_of(outcome) == (451, "4.4.1")
    status, out, err = await moxy_cli(running.config_path, "list")
    assert status == 0, err
    [line] = out.splitlines()  # the worker that had the session knows; the other does not
    assert line.startswith(("worker 0: ", "worker 1: ")) and f": {dead}  down since " in line
    status, out, err = await moxy_cli(running.config_path, "clear")
    assert (status, out) == (0, f"{line[:10]}cleared {dead}\n"), err
    assert running.stop() == 0
    assert not any(p.exists() for p in sockets)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_control_socket_that_cannot_be_made_is_one_line(
    write_config: Callable[..., Path], workers: int, short_tmp: Path
) -> None:
    """A missing directory is a configuration error (exit 2), found by check-config too; a
    socket that cannot be bound all the same (here: a directory in its place) stops the start
    with exit status 1."""
    config = write_config(
        {"example.org": "127.0.0.1:25"},
        server={"workers": workers},
        destinations={"control_socket": "/nonexistent/moxy/control"},
    )
    for command in ("check-config", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", "moxy", command, "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert (result.returncode, result.stderr) == (2, (
            f"moxy: {config}: destinations.control_socket: directory /nonexistent/moxy does "
            "not exist\n"
        )), command
    suffix = "" if workers == 1 else ".0"
    (short_tmp / f"control{suffix}").mkdir()
    config.write_text(config.read_text().replace("/nonexistent/moxy", str(short_tmp)))
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"moxy: cannot listen on control socket {short_tmp}/control{suffix}: Address already in "
        "use"
    )
    assert "Traceback" not in result.stderr


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: a unix socket path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="moxy-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
