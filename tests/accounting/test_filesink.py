"""The file sink on its own: a full disk, reopening a moved file, standard error (lines are
written by its own thread: `aclose` waits for them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from moxy.accounting.events import DeliveryEvent
from moxy.accounting.filesink import HAND_EVENTS, IN_FLIGHT, FileSink
from moxy.accounting.settings import FileSinkSettings
from peers.waiting import eventually

from .helpers import file_size_limit

EVENT = DeliveryEvent(
    kind="message", session_id="S1", message_id="S1.1", client_ip="192.0.2.7", helo="c.test",
    mail_from="s@c.test", recipients=("a@x.test",), destination="-", route="127.0.0.1:25",
    size=10, code=250, reply="250 ok", stage="end-of-data", duration=0.1, node="n1",
)


async def test_a_full_disk_drops_events_counts_them_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = FileSink(FileSinkSettings(Path("/dev/full")))  # every write: ENOSPC
    await sink.write([EVENT] * 3)
    await sink.write([EVENT])
    await sink.aclose()
    assert sink.stats().dropped == 4
    errors = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert errors == ["cannot write the message log /dev/full: No space left on device; "
                      "dropping events until it works again"]


async def test_a_disk_that_fills_mid_batch_leaves_no_merged_line_and_counts_what_it_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk fills in the middle of a batch: what went out counts as written (the whole
    batch was counted as dropped), the line cut short is ended before the next one (the next
    line ran into it, and moxylogalyze lost both), and the recovery line gives this outage's
    drops (it gave every drop since the start)."""
    path = tmp_path / "moxy.log"
    sink = FileSink(FileSinkSettings(path))
    await sink.write([EVENT])
    await sink.aclose()  # the line is written, the file is this long:
    line = path.stat().st_size
    sink = FileSink(FileSinkSettings(path))
    sink._dropped = sink._dropped_before = 7  # drops of an earlier outage, long over
    with file_size_limit(line * 3 + line // 2):  # room for 2.5 more lines
        await sink.write([EVENT] * 5)
        await eventually(lambda: sink.stats().dropped > 7, what="the failed write")
    assert sink.stats().dropped == 7 + 3  # the half line and the two that found no room
    await sink.write([EVENT] * 2)  # room again
    await sink.aclose()
    lines = path.read_bytes().split(b"\n")
    assert len(lines[3]) < len(lines[0]) and lines[3] == lines[0][: len(lines[3])]
    assert lines[:3] + lines[4:] == [lines[0]] * 5 + [b""], lines  # whole, none merged
    recovered = [r.getMessage() for r in caplog.records if "written again" in r.getMessage()]
    assert recovered == [f"message log {path} is written again; 3 events dropped meanwhile"]


async def test_reopen_follows_a_moved_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink(FileSinkSettings(path, format="json"))
    await sink.write([EVENT])
    # The writer thread has written it (and so opened the file) before logrotate moves it.
    await eventually(lambda: sink.stats().backlog == 0, what="the first line written")
    path.rename(tmp_path / "events.jsonl.1")
    await sink.write([EVENT])  # still the old file, as until logrotate's signal
    await sink.reopen()
    await sink.write([EVENT, EVENT])
    await sink.aclose()
    assert len((tmp_path / "events.jsonl.1").read_text().splitlines()) == 2
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == [EVENT.to_dict()] * 2


async def test_without_a_path_lines_go_to_standard_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    sink = FileSink(FileSinkSettings(None))
    await sink.write([EVENT])
    await sink.reopen()  # nothing to reopen
    await sink.aclose()
    assert capfd.readouterr().err == EVENT.to_log_line() + "\n"


async def test_a_stuck_file_holds_up_neither_the_loop_nor_more_than_a_bounded_backlog(
    tmp_path: Path,
) -> None:
    """A FIFO nobody reads: the writer thread blocks in open() as on a hung disk. `write`
    hands batches over until IN_FLIGHT events wait, then waits itself (so the dispatcher's
    queue fills and drops); once read, every line arrives, in order."""
    path = tmp_path / "fifo"
    os.mkfifo(path)
    sink = FileSink(FileSinkSettings(path))
    batch = [EVENT] * 512
    with trio.fail_after(5):  # the loop is not blocked: handing over is immediate
        for _ in range(IN_FLIGHT // 512):
            await sink.write(batch)
    assert sink.stats().backlog == IN_FLIGHT
    with trio.move_on_after(0.3) as waited:
        await sink.write(batch)
    assert waited.cancelled_caught  # beyond the bound the sink waits instead of growing
    received: list[bytes] = []

    def read() -> None:
        with open(path, "rb") as fifo:
            received.extend(iter(lambda: fifo.read(65536), b""))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, read)
        await eventually(lambda: sink.stats().backlog == 0, what="the backlog written")
        with trio.fail_after(5):
            await sink.aclose()  # closes the FIFO: the reader sees its end
    lines = b"".join(received).decode().splitlines()
    assert lines == [EVENT.to_log_line()] * IN_FLIGHT
    assert sink.stats().dropped == 0


# --- handing lines over to the writer thread ------------------------------------------------

def lines_in(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def test_lines_are_held_for_a_moment_and_handed_over_by_tick(tmp_path: Path) -> None:
    """A quiet sink hands a batch over at once; batches that follow within HAND_EVERY wait in
    the event loop (counted as backlog) until the next hand-over: `tick`, a later
    write, or HAND_EVENTS held."""
    path = tmp_path / "messages.log"
    sink = FileSink(FileSinkSettings(path))
    first, second = EVENT._replace(size=1), EVENT._replace(size=2)
    await sink.write([first])
    await eventually(lambda: len(lines_in(path)) == 1, what="the first line, at once")
    await sink.write([second])
    assert sink.stats().backlog == 1  # held
    await trio.sleep(0.1)
    assert len(lines_in(path)) == 1
    await sink.tick()
    await eventually(lambda: len(lines_in(path)) == 2, what="the held line, after tick")
    assert lines_in(path) == [first.to_log_line(), second.to_log_line()]
    assert sink.stats().backlog == 0
    big = [EVENT] * HAND_EVENTS
    await sink.write(big)  # HAND_EVENTS: handed over without waiting for tick
    await eventually(lambda: len(lines_in(path)) == 2 + len(big), what="a big batch at once")
    await sink.aclose()


async def test_held_lines_stay_in_order_with_everything_the_thread_does(tmp_path: Path) -> None:
    """Held batches are handed over before anything else goes to the thread: a reopen (they
    belong to the old file) and the close; a batch the C formatter leaves to Python keeps its
    place among them."""
    path = tmp_path / "messages.log"
    sink = FileSink(FileSinkSettings(path))
    await sink.write([EVENT._replace(size=1)])
    await eventually(lambda: len(lines_in(path)) == 1, what="the first line")
    await sink.write([EVENT._replace(size=2)])  # held
    await sink.write([EVENT._replace(size=3, mail_from="s\udce9@c.test")])  # Python's batch
    await sink.write([EVENT._replace(size=4)])  # held again
    path.rename(tmp_path / "messages.log.1")
    await sink.reopen()
    await sink.write([EVENT._replace(size=5)])  # held, then handed over by aclose
    await sink.aclose()
    sizes = [[int(field[5:]) for field in line.split() if field.startswith("size=")]
             for line in lines_in(tmp_path / "messages.log.1")]
    assert sizes == [[1], [2], [3], [4]]
    assert [line.split(" size=")[1].split()[0] for line in lines_in(path)] == ["5"]
