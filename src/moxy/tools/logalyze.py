"""The `moxylogalyze` command: totals and messages from Moxy's message log (the "file"
accounting sink), with the original Moxy tool's options (-l, --from, -i, -d, -v, -V).

Errors are one line on stderr prefixed "moxylogalyze: ", never a traceback. Exit status: 0 done;
1 a log file cannot be read, the output cannot be written, or the plot cannot be made or
written; 2 bad arguments.
Malformed lines are skipped and reported at the end; they do not change the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import os
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, NoReturn

from moxy import __version__
from moxy.logsetup import plural
from moxy.tools import logplot
from moxy.tools.logread import Input, InputError, Malformed, open_inputs, read_events
from moxy.tools.logreport import FORMATS, MessageWriter, write_listing, write_summary
from moxy.tools.logstats import (
    LISTBY,
    MAX_LEGS,
    Filters,
    IPNetwork,
    Listing,
    MessageJoiner,
    Summary,
)

PROG = "moxylogalyze"
EXIT_OK = 0
EXIT_INPUT = 1  # a log cannot be read, the output not written, the plot not made or written
EXIT_USAGE = 2
PLOT_TOP = 5  # destinations drawn by --plot without --top


class UsageError(Exception):
    """A bad option; argparse's own errors are turned into this too."""


class OutputError(Exception):
    """Standard output cannot be written (closed, a full disk); not a reader gone (`| head`)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise UsageError(f"{message} (see --help)")


def _time_bound(text: str, end_of_day: bool) -> float:
    """An ISO date or date and time, UTC unless it names a zone. A date alone as --until
    includes that whole day: a UTC day is 86400 seconds, added to the timestamp rather than
    the date, which has no day after 9999-12-31."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
            return start + 86400 if end_of_day else start
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO date or time such as 2026-11-25 or 2026-11-25T22:40"
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _since(text: str) -> float:
    return _time_bound(text, end_of_day=False)


def _until(text: str) -> float:
    return _time_bound(text, end_of_day=True)


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an IP address or network such as 192.0.2.7 or 192.0.2.0/24"
        ) from None


def _destination(text: str) -> str:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT such as 192.0.2.25:25")
    return text.lower()


def _sender(text: str) -> str:
    address = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    return address.lower() if address else "<>"


def _top(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows of at least 1")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Totals and messages from Moxy's message log (text or JSON lines, "
        "plain or gzip-compressed). Without -l or -v: a summary.",
        epilog="Exit status: 0 done, 1 a log file cannot be read or the plot not written, "
        "2 bad arguments. Counting rules: docs/tools.md.",
    )
    add = parser.add_argument
    add("logfiles", nargs="+", metavar="LOGFILE", help="message log files; - for standard input")
    mode = parser.add_mutually_exclusive_group()  # totals, or messages: not both
    mode.add_argument("-l", "--listby", choices=LISTBY,
                      help="totals per sender, client IP or destination")
    add("--from", dest="sender", type=_sender, metavar="EMAIL",
        help="only this sender (<> for the null sender)")
    add("-i", "--ip", type=_network, metavar="IP", help="only this client IP, or network (CIDR)")
    add("-d", "--dest", type=_destination, metavar="HOST:PORT", help="only this destination")
    add("--since", type=_since, metavar="WHEN", help="only from this UTC date or time on")
    add("--until", type=_until, metavar="WHEN",
        help="only before this UTC time (a date alone: up to the end of that day)")
    mode.add_argument("-v", "--verbose", action="store_true",
                      help="list each matching message with its legs instead of totals")
    add("--format", choices=FORMATS, default="table", help="output format (default: table)")
    add("-n", "--top", type=_top, metavar="N",
        help=f"-l: only the first N rows; --plot: the N busiest destinations (default {PLOT_TOP})")
    add("--plot", metavar="FILE.png", help="also draw delivered bytes per hour per destination")
    add("-V", "--version", action="version", version=f"{PROG} {__version__}")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (InputError, logplot.PlotUnavailable) as exc:
        return _fail(str(exc), EXIT_INPUT)
    except BrokenPipeError:  # `moxylogalyze ... | head`: stop quietly
        _discard_stdout()
        return EXIT_OK
    except OutputError as exc:
        _discard_stdout()
        return _fail(str(exc), EXIT_INPUT)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush of what is
    still buffered neither fails again nor prints a traceback on the way out."""
    if sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):  # no descriptor: nothing to flush there
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    filters = Filters(args.sender, args.ip, args.dest, args.since, args.until)
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise UsageError("--since is not before --until: nothing could match")
    # Everything that can fail early fails before the first line is read.
    if sys.stdout is None:  # started with standard output closed (`>&-`)
        raise OutputError("standard output is closed")
    plt = logplot.load_pyplot() if args.plot else None
    inputs = open_inputs(args.logfiles)
    try:
        return _report(inputs, filters, plt, args)
    except BrokenPipeError:
        raise
    except OSError as exc:  # reading errors are InputError by now: this is the output
        raise OutputError(f"cannot write standard output: {exc.strerror or exc}") from None


def _report(
    inputs: list[Input], filters: Filters, plt: Any, args: argparse.Namespace
) -> int:
    """Read every input once, write the report, then the plot and the notes on stderr."""
    out = sys.stdout
    if isinstance(out, io.TextIOWrapper):  # a reply in UTF-8 must not end a run on a Latin-1 tty
        out.reconfigure(errors="backslashreplace")
    malformed = Malformed()
    summary = Summary()
    listing = Listing(args.listby) if args.listby else None
    hourly = logplot.HourlyBytes() if plt is not None else None
    joiner = MessageJoiner(filters) if args.verbose else None
    writer = MessageWriter(args.format, out) if args.verbose else None
    for event in read_events(inputs, malformed):
        if joiner is not None and writer is not None:
            for joined in joiner.add(event):  # the joiner filters whole messages itself
                writer.write(joined)
        if not filters.matches(event):
            continue
        if listing is not None:
            listing.add(event)
        elif joiner is None:
            summary.add(event)
        if hourly is not None:
            hourly.add(event)

    if joiner is not None and writer is not None:
        for joined in joiner.finish():
            writer.write(joined)
        writer.close()
    elif listing is not None:
        write_listing(listing, args.top, args.format, out)
    else:
        write_summary(summary, args.format, out)
    out.flush()
    status = EXIT_OK
    if plt is not None and hourly is not None:
        status = _plot(plt, hourly, args)
    if malformed.count:
        print(
            f"{PROG}: {plural(malformed.count, 'malformed line')} skipped"
            f" (first at {malformed.first})",
            file=sys.stderr,
        )
    if joiner is not None and joiner.dropped:
        node, session, message_id = joiner.first_dropped
        print(
            f"{PROG}: {plural(joiner.dropped, 'leg')} not listed: more than {MAX_LEGS} legs for"
            f" one message (first: node={node or '-'} session={session} id={message_id or '-'})",
            file=sys.stderr,
        )
    return status


def _plot(plt: Any, hourly: logplot.HourlyBytes, args: argparse.Namespace) -> int:
    try:
        logplot.write_plot(plt, hourly, args.top or PLOT_TOP, args.plot)
    except OSError as exc:
        return _fail(f"cannot write {args.plot}: {exc.strerror or exc}", EXIT_INPUT)
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
