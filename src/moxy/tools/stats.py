"""`moxystats`: a live table of Moxy's bandwidth counters (Redis, the whole cluster) or of a
GDBM accounting log, by destination, recipient, domain, sender, client IP or node.

Errors end in one line on stderr, never a traceback. Exit status: 0 done (or Ctrl-C); 2 bad
options or configuration; 3 the counters cannot be read (Redis unreachable, GDBM unreadable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import attrs

from moxy.accounting.counters import DIMENSIONS, day_start
from moxy.accounting.settings import RedisSinkSettings
from moxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from moxy.logsetup import plural
from moxy.tools.stats_data import (
    GDBM_DIMENSIONS,
    RATE_MINUTES,
    Reading,
    RedisCounters,
    Row,
    Unavailable,
    gdbm_rows,
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
PROG = "moxystats"
MAX_TOP = 100_000  # rows: more is no table, and ZREVRANGE takes no index past 2**63
# Seconds between refreshes: more often only loads Redis; time.sleep() takes no more than
# about 2**63 ns (and no NaN), and a day is already no "live" view.
MIN_INTERVAL, MAX_INTERVAL = 0.1, 86400.0


class Usage(Exception):
    """A bad option or configuration: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise Usage(f"{message} (see {PROG} --help)")


def _number(kind: Callable[[str], float], text: str, low: float, high: float) -> Any:
    """`text` as a number from `low` to `high`: a bad one is a usage error here, not a
    traceback (or a Redis error) later."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if isinstance(value, float) and not math.isfinite(value):  # int() gives no inf, no NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not positive")
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not from {low:g} to {high:g}")
    return value


def _top(text: str) -> int:
    value: int = _number(int, text, 1, MAX_TOP)
    return value


def _interval(text: str) -> float:
    value: float = _number(float, text, MIN_INTERVAL, MAX_INTERVAL)
    return value


def _day(text: str) -> str:
    # strptime alone takes "2026-1-1", a key no sink writes (counters.py names days YYYY-MM-DD).
    try:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            raise ValueError(text)
        day_start(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None
    return text


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Bandwidth counters of a Moxy cluster (Redis) or a GDBM accounting log.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--redis", metavar="URL", help="read the counters from this Redis")
    source.add_argument(
        "-c", "--config", type=Path, metavar="PATH",
        help=f"read [accounting.redis] of this moxy.toml (default {DEFAULT_CONFIG_PATH})",
    )
    source.add_argument("--gdbm", type=Path, metavar="PATH", help="read this GDBM log")
    parser.add_argument(
        "--prefix", default=None, metavar="PREFIX",
        help="key prefix with --redis (default moxy:acct:)",
    )
    parser.add_argument("--by", choices=DIMENSIONS, default="dest", help="rows (default dest)")
    parser.add_argument("--top", type=_top, default=20, metavar="N",
                        help=f"show the N members with most bytes (default 20, at most {MAX_TOP})")
    parser.add_argument("--interval", type=_interval, default=2.0, metavar="S",
                        help=f"seconds between refreshes (default 2, {MIN_INTERVAL:g} to "
                        f"{MAX_INTERVAL:g})")
    parser.add_argument("--day", type=_day, metavar="YYYY-MM-DD",
                        help="that day's counts (UTC) instead of the totals")
    parser.add_argument("--once", action="store_true", help="print one table and exit")
    parser.add_argument("--json", action="store_true",
                        help="print the rows as a JSON list and exit (implies --once)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        read, title = _source(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except Usage as exc:
        return _fail(str(exc), EXIT_USAGE)
    except Unavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    try:
        if args.json:
            reading = read()
            print(json.dumps([_json_row(row) for row in reading.rows], indent=2))
            _note(reading)
        elif args.once:
            reading = read()
            print_table(reading.rows, title(), args)
            _note(reading)
        else:
            _live(read, title, args)
    except Unavailable as exc:
        return _fail(str(exc), EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `moxystats --once | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def malformed_note(reading: Reading) -> str | None:
    """One line about the members left out, naming the first few; None if there are none."""
    if not reading.malformed:
        return None
    names = ", ".join(repr(name[:60]) for name in reading.malformed[:3])
    more = ", ..." if len(reading.malformed) > 3 else ""
    return f"{plural(len(reading.malformed), 'member')} left out, malformed counters: {names}{more}"


def _note(reading: Reading) -> None:
    note = malformed_note(reading)
    if note:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)


# --- where the counters are --------------------------------------------------------------

Reader = Callable[[], Reading]


def _source(args: argparse.Namespace) -> tuple[Reader, Callable[[], str]]:
    """The row reader and the table's title for the chosen source; Usage if it is unusable."""
    when = f"day {args.day}" if args.day else "totals"
    if args.gdbm is not None:
        if args.by not in GDBM_DIMENSIONS:
            raise Usage(f"--by {args.by}: a GDBM log has only 'dest' and 'rcpt'")
        if args.day:
            raise Usage("--day: a GDBM log has only running totals")
        path: Path = args.gdbm
        gdbm_rows(path, args.by, args.top)  # unreadable: say so before any table

        def title_gdbm() -> str:
            return f"moxystats: GDBM log {path}, by {args.by}, totals, {_now()}"

        return lambda: gdbm_rows(path, args.by, args.top), title_gdbm
    if args.redis is not None:
        options: dict[str, str] = {"url": args.redis}
        if args.prefix is not None:
            options["key_prefix"] = args.prefix
        settings = _settings(options, "--redis")
    else:
        if args.prefix is not None:
            raise Usage("--prefix goes with --redis (a configuration names its own)")
        settings = redis_settings_from_config(args.config or DEFAULT_CONFIG_PATH)
    counters = RedisCounters(settings)
    first = counters.rows(args.by, args.top, args.day)  # unreachable: say so before any table
    pending = [first]

    def read_redis() -> Reading:
        return pending.pop() if pending else counters.rows(args.by, args.top, args.day)

    def title_redis() -> str:
        return f"moxystats: {counters.where}, by {args.by}, {when}, {_now()}"

    return read_redis, title_redis


def redis_settings_from_config(path: Path) -> RedisSinkSettings:
    """`[accounting.redis]` of a Moxy configuration file."""
    if "accounting" in attrs.fields_dict(Config):
        try:
            config = load_config(path)
        except ConfigError as exc:
            raise Usage(f"{path}: {'; '.join(exc.errors)}") from None
        accounting: Any = getattr(config, "accounting")  # noqa: B009 (not in every version)
        settings = getattr(accounting, "redis", None)
        if not isinstance(settings, RedisSinkSettings):
            raise Usage(f"{path}: no [accounting.redis] section")
        return settings
    return settings_from_toml(path)


def settings_from_toml(path: Path) -> RedisSinkSettings:
    """`[accounting.redis]` read directly, for a moxy.config that has no [accounting] yet."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise Usage(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise Usage(f"{path}: invalid TOML: {exc}") from None
    table = document.get("accounting", {})
    table = table.get("redis") if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise Usage(f"{path}: no [accounting.redis] section")
    return _settings(table, f"{path}: accounting.redis")


# What TOML gives for each key of [accounting.redis] (bool is no number here).
_TOML_TYPES: dict[str, type | tuple[type, ...]] = {
    "url": str, "key_prefix": str, "flush_interval": (int, float), "batch_size": int,
    "retention_days": int, "minute_retention": int, "backlog": int, "max_members": int,
    "timeout": (int, float),
    "sentinel_master": str, "sentinels": (str, list),
}


def _settings(table: dict[str, Any], where: str) -> RedisSinkSettings:
    for key, value in table.items():
        if key not in _TOML_TYPES:
            raise Usage(f"{where}: unknown key {key!r}")
        wrong = not isinstance(value, _TOML_TYPES[key]) or isinstance(value, bool)
        if wrong or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
            raise Usage(f"{where}: {key}: {value!r} is not a valid value")
    try:
        return RedisSinkSettings(**table)
    except ValueError as exc:
        raise Usage(f"{where}: {exc}") from None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


# --- output ------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1023 B, 1.0 KiB, 12.3 MiB, ..."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _json_row(row: Row) -> dict[str, Any]:
    fields = attrs.asdict(row)
    if row.first_seen is None:  # Redis
        del fields["first_seen"], fields["last_seen"]
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}
    return {
        "key": row.key, "messages": row.messages, "bytes": row.bytes,
        "first_seen": _stamp(row.first_seen), "last_seen": _stamp(row.last_seen),
    }


def _stamp(when: int | None) -> str:
    return "-" if when is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _columns(rows: list[Row], by: str) -> tuple[list[str], list[list[str]]]:
    gdbm = bool(rows) and rows[0].first_seen is not None
    if gdbm:
        header = [by, "messages", "bytes", "first seen", "last seen"]
        cells = [
            [r.key, str(r.messages), human_bytes(r.bytes), _stamp(r.first_seen),
             _stamp(r.last_seen)]
            for r in rows
        ]
        return header, cells
    header = [by, "messages", "bytes", "refused"]
    for n in RATE_MINUTES:
        header += [f"msg/min {n}m", f"rate {n}m"]
    cells = []
    for r in rows:
        line = [r.key, str(r.messages), human_bytes(r.bytes), str(r.refused)]
        for n in RATE_MINUTES:
            line.append(f"{getattr(r, f'messages_per_min_{n}m'):.1f}")
            line.append(human_bytes(getattr(r, f"bytes_per_sec_{n}m")) + "/s")
        cells.append(line)
    return header, cells


def _fancy() -> bool:
    """A real terminal: rich's table and full-screen view. Else (piped, TERM=dumb) plain."""
    return sys.stdout.isatty() and os.environ.get("TERM", "dumb") not in ("dumb", "unknown")


def plain_table(rows: list[Row], title: str, by: str) -> str:
    header, cells = _columns(rows, by)
    widths = [max(len(x) for x in column) for column in zip(header, *cells, strict=True)]
    lines = [title]
    for line in (header, *cells):
        parts = [line[0].ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
    if not cells:
        lines.append("(no counters yet)")
    return "\n".join(lines)


def _rich_table(rows: list[Row], title: str, by: str, caption: str | None = None) -> Any:
    from rich.table import Table

    header, cells = _columns(rows, by)
    table = Table(title=title, caption=caption, expand=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for line in cells:
        table.add_row(*line)
    return table


def print_table(rows: list[Row], title: str, args: argparse.Namespace) -> None:
    if not _fancy():
        print(plain_table(rows, title, args.by), flush=True)
        return
    from rich.console import Console

    Console().print(_rich_table(rows, title, args.by, None if rows else "(no counters yet)"))


def _live(read: Reader, title: Callable[[], str], args: argparse.Namespace) -> None:
    """Refresh every `--interval` until Ctrl-C. A read that fails after the first is shown in
    the caption (and retried), so a blip of Redis does not end the view."""
    if not _fancy():
        while True:
            try:
                reading = read()
                print(plain_table(reading.rows, title(), args.by) + "\n", flush=True)
                _note(reading)
            except Unavailable as exc:
                print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
            time.sleep(args.interval)
    from rich.console import Console
    from rich.live import Live

    reading = read()
    console = Console()
    with Live(_rich_table(reading.rows, title(), args.by, malformed_note(reading)),
              console=console, screen=True, auto_refresh=False) as live:
        while True:
            time.sleep(args.interval)
            caption = f"refresh every {args.interval:g}s; Ctrl-C quits"
            try:
                reading = read()
                caption = malformed_note(reading) or caption
            except Unavailable as exc:
                caption = f"{exc} (showing the last rows read)"
            live.update(_rich_table(reading.rows, title(), args.by, caption), refresh=True)


if __name__ == "__main__":
    raise SystemExit(main())
