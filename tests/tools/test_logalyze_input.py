"""moxylogalyze's inputs and edges: gzip and stdin, malformed and overlong lines, every error
path (one line on stderr, exit 1 or 2), a closed pipe, --plot, -V and -h."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import LOGS, PROG, logalyze, one_error_line

TEXT = (LOGS / "messages.log").read_bytes()


def summary_of(*args: str | Path, stdin: bytes = b"") -> dict[str, object]:
    result = logalyze(*args, "--format", "json", stdin=stdin)
    assert result.stderr == "", result
    summary: dict[str, object] = result.json()
    return summary


FULL = summary_of("messages.log")


# --- inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["messages.log.1.gz", "messages.log.1"])
def test_gzip_is_recognised_by_its_magic_bytes(tmp_path: Path, name: str) -> None:
    rotated = tmp_path / name
    rotated.write_bytes(gzip.compress(TEXT))
    assert summary_of(rotated) == FULL


def test_a_gz_suffix_on_a_plain_file_does_not_matter(tmp_path: Path) -> None:
    plain = tmp_path / "messages.log.gz"
    plain.write_bytes(TEXT)
    assert summary_of(plain) == FULL


def test_dash_reads_standard_input_plain_or_gzipped() -> None:
    assert summary_of("-", stdin=TEXT) == FULL
    assert summary_of("-", stdin=gzip.compress(TEXT)) == FULL


def test_rotated_set_in_any_order_is_one_log(tmp_path: Path) -> None:
    lines = TEXT.splitlines(keepends=True)
    (tmp_path / "m.log.2.gz").write_bytes(gzip.compress(b"".join(lines[:5])))
    (tmp_path / "m.log.1").write_bytes(b"".join(lines[5:9]))
    (tmp_path / "m.log").write_bytes(b"".join(lines[9:]))
    names = [tmp_path / "m.log", tmp_path / "m.log.2.gz", tmp_path / "m.log.1"]
    assert summary_of(*names) == FULL
    # -v joins legs in one file with their message line in the next; M4's leg comes last,
    # without its message line (in m.log, not read here).
    messages = logalyze(names[1], names[2], "-v", "--format", "json").json()
    assert [len(m["legs"]) for m in messages] == [1, 2, 1, 1]
    assert [m["code"] for m in messages] == [250, 250, 250, None]


def test_malformed_lines_are_counted_and_reported_at_the_end() -> None:
    result = logalyze("malformed.log", "-l", "dest")
    assert result.status == 0
    assert result.stdout == logalyze("messages.log", "-l", "dest").stdout
    assert result.stderr == "moxylogalyze: 6 malformed lines skipped (first at malformed.log:5)\n"


def test_malformed_lines_on_standard_input() -> None:
    result = logalyze("-", stdin=TEXT + b"garbage\n")
    assert result.status == 0
    last = TEXT.count(b"\n") + 1
    assert result.stderr == f"moxylogalyze: 1 malformed line skipped (first at <stdin>:{last})\n"


def test_an_overlong_line_is_one_malformed_line(tmp_path: Path) -> None:
    log = tmp_path / "long.log"
    log.write_bytes(b"x" * (5 * 1024 * 1024) + b"\n" + TEXT + b"\xff\xfe not utf-8\n")
    result = logalyze(log, "--format", "json")
    assert result.json() == FULL
    assert result.stderr.endswith(f"2 malformed lines skipped (first at {log}:1)\n")


def test_non_ascii_replies_on_an_ascii_terminal() -> None:
    line = '{"time": "2026-11-25T10:00:00Z", "kind": "message", "code": 250, "reply": "250 été"}'
    ascii_tty = {"PYTHONIOENCODING": "ascii"}
    result = logalyze("-v", "--format", "csv", "-", stdin=line.encode(), env=ascii_tty)
    assert (result.status, result.stderr) == (0, "")
    assert ",250 \\xe9t\\xe9," in result.stdout, result.stdout


def test_an_empty_log_gives_zero_totals(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    empty.write_bytes(b"")
    summary = summary_of(empty)
    assert summary["first"] is None and summary["bytes_delivered"] == 0
    assert logalyze(empty, "-l", "ip", "--format", "json").json() == []
    assert logalyze(empty, "-v", "--format", "json").json() == []


# --- errors ----------------------------------------------------------------------------------


def test_a_missing_file_is_one_line_and_status_1() -> None:
    line = one_error_line(logalyze("messages.log", "no-such.log"), 1)
    assert line == "moxylogalyze: no-such.log: No such file or directory"


def test_a_directory_is_one_line_and_status_1(tmp_path: Path) -> None:
    line = one_error_line(logalyze(tmp_path), 1)
    assert line == f"moxylogalyze: {tmp_path}: Is a directory"


def test_a_broken_gzip_file_is_one_line_and_status_1(tmp_path: Path) -> None:
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(TEXT)[:400])  # rotated while being compressed
    line = one_error_line(logalyze(cut), 1)
    assert line.startswith(f"moxylogalyze: {cut}: cannot read line "), line
    garbage = tmp_path / "garbage.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")
    one_error_line(logalyze(garbage), 1)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "the following arguments are required: LOGFILE"),
        (["-l", "domain", "messages.log"], "argument -l/--listby: invalid choice: 'domain'"),
        (["--format", "xml", "messages.log"], "argument --format: invalid choice: 'xml'"),
        (["-i", "192.0.2", "messages.log"], "'192.0.2' is not an IP address or network"),
        (["-d", "mx.example", "messages.log"], "'mx.example' is not HOST:PORT"),
        (["-d", "mx.example:99999", "messages.log"], "'mx.example:99999' is not HOST:PORT"),
        (["--since", "last week", "messages.log"], "'last week' is not an ISO date or time"),
        (["--until", "2026-13-01", "messages.log"], "'2026-13-01' is not an ISO date or time"),
        (["-n", "0", "messages.log"], "'0' is not a number of rows of at least 1"),
        (["--bogus", "messages.log"], "unrecognized arguments: --bogus"),
        (["-v", "-l", "ip", "messages.log"], "-l/--listby: not allowed with argument -v"),
        (
            ["--since", "2026-11-26", "--until", "2026-11-25", "messages.log"],
            "--since is not before --until",
        ),
    ],
)
def test_bad_options_are_one_line_and_status_2(args: list[str], says: str) -> None:
    line = one_error_line(logalyze(*args), 2)
    assert says in line, line


def test_a_bad_option_wins_over_a_missing_file() -> None:
    one_error_line(logalyze("-l", "nope", "no-such.log"), 2)


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    big = tmp_path / "big.log"
    with open(big, "wb") as out:
        for _ in range(3000):  # far more than a pipe buffer of -v output
            out.write(TEXT)
    process = subprocess.Popen(
        [*PROG, "-v", big], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=LOGS
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    assert first.startswith(b"2026-11-25T10:05:00.001Z ")
    process.stdout.close()  # like `| head -1`
    assert process.wait(60) == 0
    assert process.stderr.read() == b""
    process.stderr.close()


# --- version, help, console script -----------------------------------------------------------


def test_version_and_help() -> None:
    from moxy import __version__

    for flag in ("-V", "--version"):
        result = logalyze(flag)
        assert (result.status, result.stdout) == (0, f"moxylogalyze {__version__}\n")
    result = logalyze("-h")
    assert result.status == 0 and result.stdout.startswith("usage: moxylogalyze ")
    for option in ("--listby", "--from", "--ip", "--dest", "--since", "--until", "--plot"):
        assert option in result.stdout


def test_the_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "moxylogalyze"
    assert script.exists(), "pip install -e '.[test]' installs the console script"
    result = logalyze("-l", "dest", "messages.log", "--format", "json", python=[str(script)])
    assert result.json()[0]["dest"] == "127.0.0.1:2626"


# --- --plot ----------------------------------------------------------------------------------


def test_plot_writes_a_png_and_still_reports(tmp_path: Path) -> None:
    png = tmp_path / "hourly.png"
    result = logalyze("messages.log", "old-format.log", "--plot", png, "-l", "dest")
    assert result.status == 0 and result.stderr == "", result
    assert result.stdout.startswith("dest ")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000  # axes, bars, labels and a legend, not an empty canvas


def test_plot_of_nothing_is_still_a_png(tmp_path: Path) -> None:
    png = tmp_path / "none.png"
    result = logalyze("messages.log", "--since", "2030-01-01", "--plot", png, "-n", "3")
    assert result.status == 0, result
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_names_the_extra(tmp_path: Path) -> None:
    # A None entry in sys.modules is Python's own way to make an import fail as if the
    # package were not installed.
    python = [
        sys.executable, "-c",
        "import sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'moxylogalyze';"
        " from moxy.tools.logalyze import main; sys.exit(main())",
    ]  # fmt: skip
    png = tmp_path / "p.png"
    line = one_error_line(logalyze("messages.log", "--plot", png, python=python), 1)
    assert "pip install 'moxy[plot]'" in line, line
    assert not png.exists()


def test_plot_to_an_unwritable_place_is_one_line_and_status_1(tmp_path: Path) -> None:
    result = logalyze("messages.log", "--plot", tmp_path / "no-dir" / "p.png")
    assert result.stdout  # the report was written before the plot failed
    line = one_error_line(result, 1)
    assert "cannot write" in line and "No such file or directory" in line, line
