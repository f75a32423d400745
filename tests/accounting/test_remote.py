"""Accounting in a process of its own (`[accounting] process`, moxy.accounting.remote and
.host): every event reaches the sinks, at shutdown too and past the pipe's buffer; SIGUSR1's
reopen reaches the accounting process; signals sent to the process group do not end it early;
a dead accounting process is counted, logged and started again; the frames on the pipes."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from moxy.accounting import host, pipe
from moxy.accounting.dispatch import Accounting
from moxy.accounting.remote import RemoteAccounting, _write, accounting_for
from moxy.config import ConfigError, load_config
from peers.waiting import eventually

from .events import leg
from .helpers import text_records

WriteConfig = Callable[..., Path]


def _config(write_config: WriteConfig, **accounting: object) -> tuple[RemoteAccounting, Path]:
    path = write_config({}, accounting={"interval": 0.05, **accounting})
    config = load_config(path)
    log = config.file_sink.path
    assert log is not None
    return RemoteAccounting(config), log


def _events(count: int, start: int = 0) -> list[tuple[str, int]]:
    return [(f"d{n}.test:25", n) for n in range(start, start + count)]


def _emit(remote: RemoteAccounting, events: list[tuple[str, int]]) -> None:
    for destination, size in events:
        remote.emit(*leg(destination, ("rcpt@example.org",), size))


def _sizes(log: Path) -> list[int]:
    return [record["size"] for record in text_records(log)] if log.exists() else []


async def _kill_and_see_it_replaced(remote: RemoteAccounting) -> None:
    pid = remote.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await eventually(lambda: remote.pid not in (None, pid), timeout=10,
                     what="a new accounting process")


@pytest.fixture(autouse=True)
def _warnings_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="moxy.accounting")


def _host_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


async def test_every_event_reaches_the_message_log_through_the_accounting_process(
    write_config: WriteConfig,
) -> None:
    remote, log = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        _emit(remote, _events(50))
        await eventually(lambda: len(_sizes(log)) == 50, what="50 lines in the log")
        assert remote.pid is not None and remote.pid != os.getpid()
        await eventually(lambda: remote.stats()["file"].backlog == 0, what="backlog reported")
        nursery.cancel_scope.cancel()
    assert _sizes(log) == list(range(50))
    assert remote.stats()["file"].dropped == 0


async def test_at_shutdown_everything_emitted_is_written_even_beyond_the_pipes_buffer(
    write_config: WriteConfig,
) -> None:
    # 20,000 events are about 2 MB of frames, thirty times a pipe's 64 KB: the sender waits
    # for the accounting process, which writes them all before it exits.
    remote, log = _config(write_config, queue=50_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        pid = remote.pid
        _emit(remote, _events(20_000))
        nursery.cancel_scope.cancel()
    assert pid is not None and not _host_alive(pid)
    assert _sizes(log) == list(range(20_000))
    assert remote.stats()["file"] == remote.stats()["file"].__class__(backlog=0, dropped=0)


async def test_sigusr1s_reopen_reaches_the_accounting_process(write_config: WriteConfig) -> None:
    remote, log = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        _emit(remote, _events(3))
        await eventually(lambda: len(_sizes(log)) == 3, what="3 lines")
        rotated = log.with_name("moxy.log.1")
        log.rename(rotated)
        remote.reopen()
        await eventually(lambda: log.exists(), what="the log opened again")
        _emit(remote, _events(2, start=3))
        await eventually(lambda: len(_sizes(log)) == 2, what="2 lines in the new log")
        nursery.cancel_scope.cancel()
    assert _sizes(rotated) == [0, 1, 2] and _sizes(log) == [3, 4]


async def test_signals_to_the_process_group_leave_the_accounting_process_to_the_server(
    write_config: WriteConfig,
) -> None:
    # systemd and a terminal's Ctrl-C signal every process of the group at once: the
    # accounting process must stay until the serving process has sent the last events.
    remote, log = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        pid = remote.pid
        assert pid is not None
        await trio.sleep(1.0)  # it has started: its handlers are in place
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            os.kill(pid, signum)
        await trio.sleep(0.3)
        assert _host_alive(pid) and remote.pid == pid
        _emit(remote, _events(5))
        nursery.cancel_scope.cancel()
    assert _sizes(log) == [0, 1, 2, 3, 4]


async def test_a_dead_accounting_process_is_logged_counted_and_started_again(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    remote, log = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        _emit(remote, _events(4))
        await eventually(lambda: len(_sizes(log)) == 4, what="4 lines")
        await eventually(lambda: remote.stats()["file"].backlog == 0, what="all confirmed")
        await _kill_and_see_it_replaced(remote)
        assert "the accounting process ended (signal 9)" in caplog.text
        assert "starting the accounting process again in 1s" in caplog.text
        _emit(remote, _events(3, start=4))
        await eventually(lambda: len(_sizes(log)) == 7, what="7 lines")
        nursery.cancel_scope.cancel()
    assert _sizes(log) == list(range(7))
    # It had confirmed and written everything before it was killed: nothing counted as lost.
    # (What a dead one had not confirmed, or still held, is counted as dropped.)
    assert remote.stats()["file"].dropped == 0


def test_accounting_for_runs_a_process_only_when_asked_and_there_are_sinks(
    write_config: WriteConfig,
) -> None:
    default = load_config(write_config({}))
    assert default.accounting.process is True
    assert isinstance(accounting_for(default), RemoteAccounting)
    here = load_config(write_config({}, accounting={"process": False}))
    assert type(accounting_for(here)) is Accounting
    none = load_config(write_config({}, accounting={"sinks": []}))
    assert type(accounting_for(none)) is Accounting
    assert type(accounting_for(attrs.evolve(
        default, accounting=attrs.evolve(default.accounting, sinks=())))) is Accounting


def test_process_must_be_a_boolean(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match="process"):
        load_config(write_config({}, accounting={"process": "yes"}))


async def _frames_of(data: list[bytes]) -> list[tuple[bytes, bytes]]:
    send, receive = trio.testing.memory_stream_one_way_pair()
    out: list[tuple[bytes, bytes]] = []

    async def feed() -> None:
        for piece in data:
            await send.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()
        await send.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            async for item in pipe.frames(receive):
                out.append(item)
        except pipe.FrameError as exc:
            nursery.cancel_scope.cancel()
            error = exc
        else:
            return out
    raise error


async def test_frames_survive_any_split_into_reads() -> None:
    wire = pipe.frame(pipe.CONFIG, b"abc") + pipe.frame(pipe.REOPEN) + pipe.frame(
        pipe.STATS, b"x" * 70_000)
    expected = [(pipe.CONFIG, b"abc"), (pipe.REOPEN, b""), (pipe.STATS, b"x" * 70_000)]
    assert await _frames_of([wire]) == expected
    assert await _frames_of([wire[i:i + 1] for i in range(20)] + [wire[20:]]) == expected


async def test_garbage_or_a_cut_frame_is_an_error_not_data() -> None:
    with pytest.raises(pipe.FrameError, match="not a frame"):
        await _frames_of([b"Xgarbage"])
    with pytest.raises(pipe.FrameError, match="ended inside a frame"):
        await _frames_of([pipe.frame(pipe.EVENTS, b"12345")[:-1]])


async def test_events_a_dead_accounting_process_never_confirmed_are_counted_as_dropped(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    remote, log = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        await eventually(lambda: "file" in remote._host, what="a first report")
        pid = remote.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it neither reads nor reports any more
        _emit(remote, _events(6))
        await eventually(lambda: remote._packer.entries == 0, what="the events sent")
        assert remote.stats()["file"].backlog == 6
        await _kill_and_see_it_replaced(remote)
        assert remote.stats()["file"] == remote.stats()["file"].__class__(backlog=0, dropped=6)
        assert "up to 6 events sent to it may be lost" in caplog.text
        nursery.cancel_scope.cancel()
    assert _sizes(log) == []


async def test_events_left_when_no_accounting_process_can_take_them_are_logged_at_shutdown(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    remote, log = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        pid = remote.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await eventually(lambda: "starting the accounting process again" in caplog.text,
                         what="the restart's wait")
        _emit(remote, _events(3))  # while no accounting process runs
        nursery.cancel_scope.cancel()
    assert "accounting: 3 events not written at shutdown (no accounting process)" in caplog.text
    assert remote.stats()["file"].dropped == 3
    _emit(remote, _events(2, start=3))  # once stopped: lost, and counted
    assert remote.stats()["file"].dropped == 5
    assert _sizes(log) == []


def test_sessions_events_beyond_half_a_queue_are_counted_as_lost(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    remote, _ = _config(write_config, queue=20)  # no accounting process takes them
    _emit(remote, _events(15))
    assert remote.stats()["file"] == remote.stats()["file"].__class__(backlog=10, dropped=5)
    errors = [r.getMessage() for r in caplog.records if "lost before" in r.getMessage()]
    assert errors == ["accounting: events lost before reaching any sink (the event loop is "
                      "far behind, or accounting has stopped), until they flow again"]  # once


def test_each_episode_of_lost_events_is_logged_at_once_and_summed_when_it_is_over(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    """Not at multiples of 10,000 of a running total: the first loss at once, and the
    episode's count at the clock's first look without a loss."""
    remote, _ = _config(write_config, queue=20)  # no accounting process takes them
    for emitted, episode in ((15, 5), (3, 3)):  # 10 are held, no more: the rest are lost
        caplog.clear()
        _emit(remote, _events(emitted))
        assert len([r for r in caplog.records if "lost before" in r.getMessage()]) == 1
        remote._losses_over()  # a look after losses: the episode goes on
        assert not [r for r in caplog.records if "sinks again" in r.getMessage()]
        remote._losses_over()  # a look without a loss since the last: over
        summary = [r.getMessage() for r in caplog.records if "sinks again" in r.getMessage()]
        assert summary == [f"accounting: events reach the sinks again; {episode} events "
                           "lost before reaching any sink"]


def test_the_accounting_process_finds_the_same_moxy(monkeypatch: pytest.MonkeyPatch) -> None:
    import site

    import moxy
    from moxy.accounting import remote as remote_module

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setattr(moxy, "__file__", "/opt/checkout/src/moxy/__init__.py")
    assert remote_module._environment()["PYTHONPATH"] == "/opt/checkout/src:/elsewhere"
    # Installed: the interpreter finds it in its site-packages, which must not come first.
    installed = Path(site.getsitepackages()[0])
    monkeypatch.setattr(moxy, "__file__", str(installed / "moxy" / "__init__.py"))
    assert remote_module._environment()["PYTHONPATH"] == "/elsewhere"


def test_a_configuration_that_cannot_be_sent_keeps_the_sinks_in_this_process(
    write_config: WriteConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    config = load_config(write_config({}))
    unsendable = attrs.evolve(config, path=lambda: None)  # type: ignore[arg-type]  # in code
    assert type(accounting_for(unsendable)) is Accounting
    assert "cannot be passed to an accounting process" in caplog.text


def test_the_accounting_process_writes_what_came_before_garbage_and_exits_non_zero(
    write_config: WriteConfig,
) -> None:
    config = load_config(write_config({}))
    log = config.file_sink.path
    assert log is not None
    good = pipe.events_frames([tuple(leg("d.test:25", ("r@example.org",), 7))])
    done = subprocess.run(
        [sys.executable, "-m", "moxy.accounting.host"],
        input=pipe.frame(pipe.CONFIG, pickle.dumps(config)) + good + b"Xgarbage",
        capture_output=True, timeout=30, check=False,
    )
    assert done.returncode == 1, done.stderr
    assert b"from the serving process: not a frame" in done.stderr
    assert _sizes(log) == [7]


async def test_the_pipe_to_the_accounting_process_holds_over_a_megabyte(
    write_config: WriteConfig,
) -> None:
    """So that the accounting process can be paced: read a few times a second, not woken by
    every write (host._Paced)."""
    remote, _ = _config(write_config)
    async with trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        assert remote.pid is not None
        stdin = os.open(f"/proc/{remote.pid}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert pipe.capacity(stdin) >= max(pipe.PIPE_SIZE, host.ENOUGH)
        finally:
            os.close(stdin)
        nursery.cancel_scope.cancel()
    with open(os.devnull, "rb") as not_a_pipe:
        assert pipe.capacity(not_a_pipe.fileno()) == 0


async def test_while_events_flow_the_pipe_is_read_once_a_pause_and_at_once_when_idle() -> None:
    read, write = os.pipe()
    paced = host._Paced(trio.lowlevel.FdStream(read), pause=0.5, size=1 << 16)
    try:
        os.write(write, b"a")
        started = trio.current_time()
        assert await paced.receive_some() == b"a"
        assert trio.current_time() - started < 0.4  # idle until now: read at once

        async def later() -> None:
            await trio.sleep(0.05)
            os.write(write, b"c")

        async with trio.open_nursery() as nursery:
            os.write(write, b"b")
            nursery.start_soon(later)
            started = trio.current_time()
            # Read at once, this would be b"b" alone.
            assert await paced.receive_some() == b"bc"
            assert trio.current_time() - started >= 0.5
    finally:
        os.close(write)
        await paced.aclose()


def test_the_collector_leaves_what_the_accounting_process_was_made_of_alone() -> None:
    """After its setup, the accounting process freezes what exists (modules, clients) out of
    the collector's reach and collects young objects every YOUNG allocations."""
    code = ("import gc; from moxy.accounting import host; host._settle_gc(); "
            "print(gc.get_freeze_count() > 1000, gc.get_threshold()[0])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["True", str(host.YOUNG)]


async def test_a_batch_larger_than_the_pipe_arrives_whole_and_a_closed_reader_is_an_error() -> None:
    """The clock writes straight into the pipe; what it does not take goes through send_all,
    in order, and a reader gone is trio's BrokenResourceError (as send_all says it)."""
    read_end, write_end = os.pipe()
    data = bytes(range(256)) * 1024  # 256 KiB: four times what a default pipe holds
    got = bytearray()
    async with trio.lowlevel.FdStream(read_end) as reader, \
            trio.lowlevel.FdStream(write_end) as writer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, writer, data)
            while len(got) < len(data):
                got += await reader.receive_some(1 << 16)
        assert got == data
        await _write(writer, b"small")
        assert await reader.receive_some() == b"small"
        await reader.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await _write(writer, b"nobody reads this")
