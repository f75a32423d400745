"""The dispatcher: a stuck sink never delays mail, a full queue drops and counts (logged once
per outage), queued events are written at shutdown, sinks are made by name."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from integration.helpers import send_one
from moxy.accounting.dispatch import WINDOW, Accounting
from moxy.accounting.events import DeliveryEvent, discard
from moxy.accounting.filesink import FileSink
from moxy.accounting.sinks import build_sink
from moxy.accounting.syslog import SyslogSink
from moxy.config import ConfigError, load_config
from moxy.server import serve
from peers.recorder import Recorder
from peers.waiting import eventually

from .helpers import GatedSink, text_records

MakeRecorder = Callable[..., Recorder]
WriteConfig = Callable[..., Path]


async def start(
    nursery: trio.Nursery, config_path: Path, accounting: Accounting
) -> tuple[str, int]:
    config = load_config(config_path)
    address: tuple[str, int]
    [address, *_] = await nursery.start(functools.partial(serve, config, accounting=accounting))
    return address


async def test_a_stuck_sink_delays_no_mail_and_its_overflow_is_counted_and_logged_once(
    write_config: WriteConfig, make_recorder: MakeRecorder, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = make_recorder()
    stuck = GatedSink("stuck")
    config_path = write_config({"example.org": upstream})
    file = FileSink(load_config(config_path).file_sink)
    accounting = Accounting([stuck, file], queue=4)
    async with trio.open_nursery() as nursery:
        address = await start(nursery, config_path, accounting)
        with trio.fail_after(30):  # generous: the point is that none of them waits on `stuck`
            for _ in range(6):
                outcome = await send_one(address, ["user@example.org"])
                assert outcome.final is not None and outcome.final.code == 250
        assert len(upstream.messages) == 6
        # 12 events, taken from the sessions every half second: at most a queue's worth is
        # held by the stuck write, at most 4 wait in the queue, the rest are dropped.
        await eventually(lambda: accounting.stats()["stuck"].backlog <= 4, what="no intake")
        stats = accounting.stats()["stuck"]
        assert stats.dropped >= 4 and stats.backlog + stats.dropped <= 12, stats
        # The other sink is not held up by the stuck one.
        assert accounting.stats()["file"].dropped == 0
        await eventually(lambda: len(text_records(config_path.parent / "moxy.log")) == 12,
                         what="12 lines in the file sink")
        overflow = [r for r in caplog.records if "not keeping up" in r.getMessage()]
        assert len(overflow) == 1 and overflow[0].levelno == logging.ERROR
        assert "stuck" in overflow[0].getMessage()
        stuck.gate.set()
        await eventually(lambda: len(stuck.written) == 12 - stats.dropped, what="the queue")
        await eventually(lambda: any("caught up" in r.getMessage() for r in caplog.records),
                         what="a caught-up message")
        # A second outage is logged again, once (12 events: more than a stuck write and
        # the queue hold).
        stuck.gate = trio.Event()
        for _ in range(6):
            await send_one(address, ["user@example.org"])

        def overflows() -> int:
            return len([r for r in caplog.records if "not keeping up" in r.getMessage()])

        await eventually(lambda: overflows() >= 2, what="a second overflow message")
        assert overflows() == 2
        stuck.gate.set()
        nursery.cancel_scope.cancel()
    assert stuck.closed


async def test_events_queued_at_shutdown_are_written_before_serve_returns(
    write_config: WriteConfig, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    slow = GatedSink("slow", delay=0.2)
    slow.gate.set()
    accounting = Accounting([slow])
    async with trio.open_nursery() as nursery:
        address = await start(nursery, write_config({"example.org": upstream}), accounting)
        for _ in range(5):
            await send_one(address, ["user@example.org"])
        assert len(slow.written) < 10  # most are still queued behind the slow writes
        nursery.cancel_scope.cancel()
    assert [e.kind for e in slow.written] == ["leg", "message"] * 5
    assert slow.closed


class BrokenSink(GatedSink):
    """A sink with a bug: every write raises."""

    async def write(self, batch: object) -> None:
        raise RuntimeError("a bug in a sink")


async def test_a_sink_that_raises_is_logged_once_and_harms_neither_mail_nor_other_sinks(
    write_config: WriteConfig, make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = make_recorder()
    good = GatedSink("good")
    good.gate.set()
    accounting = Accounting([BrokenSink("broken"), good])
    async with trio.open_nursery() as nursery:
        address = await start(nursery, write_config({"example.org": upstream}), accounting)
        for _ in range(3):
            outcome = await send_one(address, ["user@example.org"])
            assert outcome.final is not None and outcome.final.code == 250
        await eventually(lambda: len(good.written) == 6, what="6 events in the good sink")
        await eventually(lambda: accounting.stats()["broken"].dropped == 6, what="6 drops")
        nursery.cancel_scope.cancel()
    failures = [r for r in caplog.records if "broken: write failed" in r.getMessage()]
    assert len(failures) == 1


def event(n: int) -> DeliveryEvent:
    return DeliveryEvent(
        kind="message", session_id="S", message_id=f"S.{n}", client_ip="127.0.0.1", helo="",
        mail_from="", recipients=(), destination="-", route="", size=0, code=250, reply="",
        stage="end-of-data", duration=0.0,
    )


async def test_events_reach_the_sinks_in_batches_and_in_order() -> None:
    one, two = GatedSink("one"), GatedSink("two")
    one.gate.set()
    two.gate.set()
    accounting = Accounting([one, two])
    async with trio.open_nursery() as nursery:
        await nursery.start(accounting.run)
        for n in range(300):  # a burst, as sessions emit them between two looks
            accounting.emit(*event(n))
        await eventually(lambda: len(one.written) == 300, what="300 events")
        await eventually(lambda: len(two.written) == 300, what="300 events")
        for n in range(300, 2000):  # more than a batch: the clock looks at once
            accounting.emit(*event(n))
        with trio.fail_after(WINDOW / 2):
            await eventually(lambda: len(one.written) >= 512, what="a full batch at once")
        await eventually(lambda: len(one.written) == 2000, what="2000 events")
        nursery.cancel_scope.cancel()
    assert [e.message_id for e in one.written] == [f"S.{n}" for n in range(2000)]
    assert two.written == one.written
    assert one.writes <= 8  # one wake-up per batch, not one per event
    assert one.closed and two.closed


async def test_without_sinks_sessions_make_no_events_and_mail_flows(
    write_config: WriteConfig, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    accounting = Accounting([])
    assert accounting.emit is discard  # what SessionEvents looks for before making an event
    async with trio.open_nursery() as nursery:
        address = await start(nursery, write_config({"example.org": upstream}), accounting)
        outcome = await send_one(address, ["user@example.org", "nobody@elsewhere.test"])
        assert outcome.final is not None and outcome.final.code == 250
        nursery.cancel_scope.cancel()
    assert len(upstream.messages) == 1
    assert accounting.stats() == {}


def test_emit_after_shutdown_counts_a_drop() -> None:
    sink = GatedSink("late")
    sink.gate.set()
    accounting = Accounting([sink], queue=10)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(accounting.run)
            nursery.cancel_scope.cancel()

    trio.run(main)
    accounting.emit(*DeliveryEvent(
        kind="message", session_id="S", message_id="", client_ip="127.0.0.1", helo="",
        mail_from="", recipients=(), destination="-", route="", size=0, code=250, reply="",
        stage="end-of-data", duration=0.0,
    ))
    assert accounting.stats()["late"].dropped == 1


def test_sinks_are_made_by_name_from_their_tables(write_config: WriteConfig) -> None:
    config = load_config(write_config(
        {}, accounting={"sinks": ["file", "syslog"], "interval": 2.0},
        **{"accounting.syslog": {"address": "udp://127.0.0.1:5514", "tag": "mx"}},
    ))
    accounting = Accounting.from_config(config)
    assert accounting.window == 2.0  # [accounting] interval
    file, syslog = (lane.sink for lane in accounting.lanes)
    assert isinstance(file, FileSink) and file.path == config.log.file
    assert isinstance(syslog, SyslogSink) and syslog.tag == "mx"
    assert syslog.target == "127.0.0.1:5514" and syslog.transport == "udp"
    nothing = load_config(write_config({}, accounting={"sinks": []}))
    assert Accounting.from_config(nothing).lanes == []


@pytest.mark.parametrize("name", ["gdbm", "redis"])
def test_a_sink_missing_from_the_installation_is_a_config_error(
    name: str, write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As if its module were not installed (None in sys.modules makes the import fail).
    monkeypatch.setitem(sys.modules, f"moxy.accounting.{name}", None)
    tables = {"accounting.gdbm": {"path": str(tmp_path / "acct.db")}} if name == "gdbm" else {}
    config = load_config(write_config({}, accounting={"sinks": [name]}, **tables))
    with pytest.raises(ConfigError) as caught:
        build_sink(name, config)
    assert caught.value.errors == [
        f"accounting.sinks: the {name!r} sink is not part of this Moxy installation"
    ]
