"""The GDBM accounting log on real GDBM files: totals per destination and recipient, a reader
in another process while Moxy writes, two writers sharing a file, a file that cannot be written."""

from __future__ import annotations

import dbm.gnu
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from moxy.accounting import gdbm
from moxy.accounting.base import SinkStats
from moxy.accounting.gdbm import GdbmLogError, GdbmSink, Totals, read_log
from moxy.accounting.settings import GdbmSinkSettings

from .events import leg, refused
from .helpers import file_size_limit


def sink_at(path: Path) -> GdbmSink:
    return GdbmSink(GdbmSinkSettings(path=path, flush_interval=0.0))


async def test_totals_per_destination_and_recipient(tmp_path: Path) -> None:
    path = tmp_path / "acct.db"
    sink = sink_at(path)
    t0 = 1_764_600_000.0
    await sink.write([
        leg("a.example:25", ("bob@Example.org", "carol@example.org"), 1000, when=t0),
        leg("b.example:25", ("bob@example.org",), 1010, when=t0 + 5),  # a mirror's second leg
        leg("a.example:25", ("bob@example.org",), 400, code=451, when=t0 + 6),  # failed
        refused("dave@example.org"),
    ])
    await sink.tick()
    assert sink.stats().backlog == 0
    assert read_log(path) == {
        "dest:a.example:25": Totals(1, 1000, int(t0), int(t0)),
        "dest:b.example:25": Totals(1, 1010, int(t0) + 5, int(t0) + 5),
        "rcpt:bob@example.org": Totals(2, 2010, int(t0), int(t0) + 5),
        "rcpt:carol@example.org": Totals(1, 1000, int(t0), int(t0)),
    }
    # Later flushes add to what the file holds, also across a new sink (a restarted Moxy).
    await sink.write([leg("a.example:25", ("carol@example.org",), 50, when=t0 + 60)])
    await sink.aclose()
    again = sink_at(path)
    await again.write([leg("a.example:25", ("carol@example.org",), 7, when=t0 + 120)])
    await again.aclose()
    totals = read_log(path)
    assert totals["dest:a.example:25"] == Totals(3, 1057, int(t0), int(t0) + 120)
    assert totals["rcpt:carol@example.org"] == Totals(3, 1057, int(t0), int(t0) + 120)
    with dbm.gnu.open(str(path), "ru") as db:  # the documented value format
        assert db[b"dest:b.example:25"] == f"1 1010 {int(t0) + 5} {int(t0) + 5}".encode()


READER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from moxy.accounting.gdbm import read_log
    path, seconds = Path(sys.argv[1]), float(sys.argv[2])
    reads, seen = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end or reads < 5:
        if path.exists():
            totals = read_log(path)
            reads += 1
            t = totals.get("dest:mx.example:25")
            if t is not None:
                assert t.size == 100 * t.messages, t   # every copy carried 100 bytes
                seen.append(t.messages)
        time.sleep(0.005)
    print(json.dumps({"reads": reads, "seen": seen}))
""")


async def test_a_reader_in_another_process_while_moxy_writes(tmp_path: Path) -> None:
    """moxystats' reader opens the file without a lock while the sink flushes it about every
    20 ms: every read succeeds, sees consistent totals, and never goes backwards; the writer is
    never kept out."""
    path = tmp_path / "acct.db"
    sink = sink_at(path)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path), "2.0"], stdout=subprocess.PIPE, text=True
    )
    # A second reader holding the file open the whole time does not block the writer either.
    await sink.write([leg("mx.example:25", ("a@example.org",), 100)])
    await sink.tick()
    held = dbm.gnu.open(str(path), "ru")  # noqa: SIM115 (open across the whole loop)
    written = 1
    with trio.move_on_after(2.5):
        while reader.poll() is None:
            batch = [leg("mx.example:25", (f"r{i % 500}@example.org",), 100) for i in range(50)]
            await sink.write(batch)
            written += len(batch)
            await sink.tick()
            assert sink.stats().backlog == 0  # written, not held back by a reader
            await trio.sleep(0.02)
    held.close()
    output, _ = await trio.to_thread.run_sync(reader.communicate)
    assert reader.returncode == 0
    result = json.loads(output)
    assert result["reads"] >= 5
    assert result["seen"] == sorted(result["seen"])
    assert len(set(result["seen"])) >= 2  # it did read while the totals were growing
    assert read_log(path)["dest:mx.example:25"].messages == written


async def test_two_writers_share_one_file(tmp_path: Path) -> None:
    """Two worker processes each have a sink on the same file: the writer's lock serialises
    them, and the totals add up."""
    path = tmp_path / "acct.db"
    sinks = [sink_at(path), sink_at(path)]

    async def run(sink: GdbmSink, size: int) -> None:
        for _ in range(40):
            await sink.write([leg("mx.example:25", ("a@example.org",), size)])
            await sink.tick()
        await sink.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, sinks[0], 1)
        nursery.start_soon(run, sinks[1], 2)
    assert read_log(path)["dest:mx.example:25"].messages == 80
    assert read_log(path)["dest:mx.example:25"].size == 120


async def test_a_file_that_cannot_be_written_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "moxy.accounting")
    path = tmp_path / "missing-dir" / "acct.db"
    sink = sink_at(path)
    for _ in range(3):
        await sink.write([leg("mx.example:25", ("a@example.org",), 10)])
        await sink.tick()
    assert sink.stats().backlog == 2
    path.parent.mkdir()
    await sink.tick()
    assert sink.stats().backlog == 0
    assert read_log(path)["dest:mx.example:25"].messages == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot write GDBM log" in m]) == 1, messages
    assert len([m for m in messages if "writable again" in m]) == 1, messages


async def test_beyond_max_pending_keys_an_unwritable_file_drops_whole_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_PENDING keys are held while the file cannot be written: an event whose new
    keys do not fit is dropped whole; one adding only to held keys still counts."""
    monkeypatch.setattr(gdbm, "MAX_PENDING", 3)
    path = tmp_path / "missing-dir" / "acct.db"
    sink = sink_at(path)
    for i in range(5):  # the destination and r0, r1 fit; r2, r3, r4 do not
        await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 10)])
        await sink.tick()
    await sink.write([leg("mx.example:25", ("r1@example.org",), 10)])
    assert (sink.stats().backlog, sink.stats().dropped) == (3, 3)
    path.parent.mkdir()
    await sink.tick()
    totals = read_log(path)
    assert sorted(totals) == ["dest:mx.example:25", "rcpt:r0@example.org", "rcpt:r1@example.org"]
    assert (totals["dest:mx.example:25"].messages, totals["rcpt:r1@example.org"].messages) == (3, 2)


def test_read_log_reports_a_missing_or_foreign_file(tmp_path: Path) -> None:
    with pytest.raises(GdbmLogError, match="no such file"):
        read_log(tmp_path / "nope.db")
    (tmp_path / "text.db").write_text("not a database\n")
    with pytest.raises(GdbmLogError, match="cannot read GDBM log"):
        read_log(tmp_path / "text.db", tries=2, wait=0.01)


async def test_a_flush_failing_part_way_adds_nothing_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The file cannot grow in the middle of a flush (a full disk): the keys stored before
    the failure are not held for the next flush, which adds only the others."""
    caplog.set_level(logging.INFO, "moxy.accounting")
    path = tmp_path / "acct.db"
    sink = sink_at(path)
    await sink.write([leg("mx.example:25", ("a@example.org",), 10)])
    await sink.tick()
    await sink.write([leg("mx.example:25", (f"r{i}@example.org",), 10) for i in range(2000)])
    with file_size_limit(path.stat().st_size):
        await sink.tick()
    assert 0 < sink.stats().backlog < 2001  # the destination and some recipients were stored
    await sink.tick()
    assert sink.stats() == SinkStats(backlog=0, dropped=0)
    totals = read_log(path)
    assert len(totals) == 2002
    dest = totals["dest:mx.example:25"]
    assert (dest.messages, dest.size) == (2001, 20010)  # not 4001: none added twice
    assert {t.messages for k, t in totals.items() if k.startswith("rcpt:")} == {1}
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot write GDBM log" in m]) == 1, messages
    assert [m for m in messages if "writable again" in m] == [
        f"accounting: GDBM log {path} writable again, 0 events dropped meanwhile"]


async def test_a_damaged_file_is_logged_once_and_its_events_counted_as_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """GDBM finds the file malformed: retrying cannot help, so the sums are dropped and
    counted (not held, and re-added to what the file still takes, flush after flush)."""
    caplog.set_level(logging.INFO, "moxy.accounting")
    path = tmp_path / "acct.db"
    with dbm.gnu.open(str(path), "c") as db:
        for i in range(50):
            db[f"rcpt:{i}@example.org".encode()] = b"1 10 1764600000 1764600000"
    with path.open("r+b") as f:  # overwrite its hash directory
        f.seek(4096)
        f.write(b"\xff" * 512)
    sink = sink_at(path)
    for n in (3, 2):
        await sink.write([leg("mx.example:25", ("b@example.org",), 10)] * n)
        await sink.tick()
    assert sink.stats() == SinkStats(backlog=0, dropped=5)
    messages = [r.getMessage() for r in caplog.records]
    damaged = [m for m in messages if "is damaged" in m]
    assert len(damaged) == 1 and str(path) in damaged[0], messages
    path.rename(tmp_path / "acct.db.broken")  # the operator moves it away: a new file starts
    await sink.write([leg("mx.example:25", ("b@example.org",), 10)])
    await sink.tick()
    assert read_log(path)["dest:mx.example:25"].messages == 1
    assert caplog.records[-1].getMessage() == (
        f"accounting: GDBM log {path} writable again, 5 events dropped meanwhile")
