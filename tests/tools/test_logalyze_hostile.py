"""moxylogalyze against inputs and surroundings that once broke it: logs from pipes and FIFOs
(read once, or their start is lost), dates at the end of the calendar, a plot over decades,
standard streams closed or unwritable, and one message id repeated without end."""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
from pathlib import Path

import pytest

from moxy.accounting.events import DeliveryEvent
from moxy.tools import logplot
from moxy.tools.logstats import MAX_LEGS

from .helpers import LOGS, PROG, Result, logalyze, one_error_line

TEXT = (LOGS / "messages.log").read_bytes()
BY_DEST = logalyze("messages.log", "-l", "dest").stdout


def run(args: list[str], *, shell: str = "", timeout: float = 30, **kwargs: object) -> Result:
    """moxylogalyze with a timeout short enough to fail a hang; `shell` wraps the command in
    `sh -c 'exec "$@" SHELL'` to close or redirect a standard stream."""
    command = [*PROG, *args]
    if shell:
        command = ["sh", "-c", f'exec "$@" {shell}', "sh", *command]
    done = subprocess.run(
        command, capture_output="stdout" not in kwargs, cwd=LOGS, timeout=timeout, **kwargs
    )  # type: ignore[call-overload]
    stdout = done.stdout.decode() if done.stdout is not None else ""
    return Result(done.returncode, stdout, done.stderr.decode() if done.stderr else "")


def feed(path: str | int, data: bytes) -> threading.Thread:
    """Write `data` to a FIFO (opened here, so it waits for its reader) or a pipe's write end,
    from a thread, then close it."""

    def write() -> None:
        with open(path, "wb") as out:
            out.write(data)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


# --- pipes and FIFOs ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [TEXT, gzip.compress(TEXT)], ids=["plain", "gzip"])
def test_a_pipe_as_a_file_argument_is_read_whole(data: bytes) -> None:
    """`moxylogalyze -l dest <(zcat messages.log.gz)`: a /dev/fd name, which cannot be
    opened a second time without losing what was read through the first."""
    read_end, write_end = os.pipe()
    writer = feed(write_end, data)
    try:
        result = run(["-l", "dest", f"/dev/fd/{read_end}"], pass_fds=(read_end,))
    finally:
        os.close(read_end)
    writer.join(5)
    assert (result.status, result.stdout, result.stderr) == (0, BY_DEST, ""), result


@pytest.mark.parametrize("data", [TEXT, gzip.compress(TEXT)], ids=["plain", "gzip"])
def test_a_fifo_is_read_once_and_does_not_hang(tmp_path: Path, data: bytes) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = feed(str(fifo), data)
    result = run(["-l", "dest", "messages.log", str(fifo)])
    writer.join(5)
    assert result.status == 0 and result.stderr == "", result
    doubled = logalyze("messages.log", "messages.log", "-l", "dest").stdout
    assert result.stdout == doubled


def test_an_empty_fifo_before_a_file(tmp_path: Path) -> None:
    """Opening a FIFO waits for its writer; one that writes nothing is an empty log."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = feed(str(fifo), b"")
    result = run(["--format", "json", str(fifo), "messages.log"])
    writer.join(5)
    assert result.status == 0 and '"messages_accepted": 3' in result.stdout, result


# --- the end of the calendar, a plot over decades ----------------------------------------------


@pytest.mark.parametrize("until", ["9999-12-31", "9999-12-31T23:59:59.999999"])
def test_until_the_last_day_there_is(until: str) -> None:
    result = logalyze("messages.log", "--since", "0001-01-01", "--until", until)
    assert result.status == 0 and result.stderr == "", result
    assert result.stdout == logalyze("messages.log").stdout


def leg_line(when: float, size: int = 1000, message_id: str = "S.1") -> str:
    return DeliveryEvent(
        kind="leg", session_id="S", message_id=message_id, client_ip="192.0.2.7", helo="h",
        mail_from="a@b.example", recipients=("c@d.example",), destination="127.0.0.1:25",
        route="127.0.0.1:25", size=size, code=250, reply="250 ok", stage="end-of-data",
        duration=0.0, node="mx1", time=when,
    ).to_log_line()  # fmt: skip


@pytest.mark.parametrize(
    ("first", "last"),
    [(0, 1), (0, 999), (0, 1000), (5, 2000), (-3, 56 * 8766), (-17_000_000, 70_000_000)],
)
def test_a_plot_has_at_most_max_bars(first: int, last: int) -> None:
    width = logplot.bin_hours(first, last)
    assert last // width - first // width + 1 <= logplot.MAX_BARS
    assert width == 1 or last // (width // 2) - first // (width // 2) + 1 > logplot.MAX_BARS / 2
    series = logplot.binned({"d": {first: 1, last: 2}}, width)["d"]
    assert sum(series.values()) == 3 and all(start % width == 0 for start in series)


def test_a_plot_over_56_years_draws_weeks_not_half_a_million_hours(tmp_path: Path) -> None:
    log = tmp_path / "decades.log"
    log.write_text(leg_line(0.0) + "\n" + leg_line(56 * 365.25 * 86400) + "\n")
    png = tmp_path / "p.png"
    result = run([str(log), "--plot", str(png), "-l", "dest"], timeout=60)
    assert result.status == 0 and result.stderr == "", result
    data = png.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) < 1_000_000


# --- standard streams ----------------------------------------------------------------------------


def test_a_full_disk_under_standard_output_is_one_line_and_status_1() -> None:
    with open("/dev/full", "wb") as full:
        result = run(["messages.log"], stdout=full, stderr=subprocess.PIPE)
    line = one_error_line(result, 1)
    assert line == "moxylogalyze: cannot write standard output: No space left on device"


@pytest.mark.parametrize(
    ("args", "shell", "says"),
    [
        (["-"], "<&-", "moxylogalyze: <stdin>: standard input is closed"),
        (["messages.log"], ">&-", "moxylogalyze: standard output is closed"),
        (["-"], "0>/dev/null", "moxylogalyze: <stdin>: Bad file descriptor"),
        (["-v", "messages.log"], "1</dev/null", "moxylogalyze: cannot write standard output: "
         "Bad file descriptor"),
    ],
)
def test_closed_or_wrong_way_standard_streams_are_one_line_and_status_1(
    args: list[str], shell: str, says: str
) -> None:
    result = run(args, shell=shell)
    assert one_error_line(result, 1) == says


def test_a_closed_pipe_after_a_gzip_stdin_still_ends_quietly() -> None:
    process = subprocess.Popen(
        [*PROG, "-v", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, cwd=LOGS,
    )  # fmt: skip
    assert process.stdin and process.stdout and process.stderr
    process.stdout.close()  # like `| head -0`
    process.stdin.write(gzip.compress(TEXT * 2000))
    process.stdin.close()
    assert process.wait(60) == 0
    assert process.stderr.read() == b""
    process.stderr.close()


# --- one message id without end (-v) -------------------------------------------------------------


def test_legs_of_one_message_are_bounded_and_the_rest_reported(tmp_path: Path) -> None:
    log = tmp_path / "repeated.log"
    legs = [leg_line(1_764_000_000.0 + i) for i in range(MAX_LEGS + 250)]
    other = leg_line(1_764_000_000.0, message_id="S.2")
    log.write_text("\n".join([*legs, other]) + "\n")
    result = logalyze(log, "-v", "--format", "json")
    messages = result.json()
    assert [len(m["legs"]) for m in messages] == [MAX_LEGS, 1]
    assert result.stderr == (
        f"moxylogalyze: 250 legs not listed: more than {MAX_LEGS} legs for one message"
        " (first: node=mx1 session=S id=S.1)\n"
    )
