"""What the `moxy` command's parts share (moxy.cli, moxy.cli_routes): the exit statuses, the
one-line error messages, and reading the configuration and its route sources."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from moxy.config import Config, ConfigError, load_config
from moxy.lookup.build import Routing
from moxy.lookup.file import RoutesFileError

EXIT_OK = 0
EXIT_NO_ROUTE = 1  # `lookup` found no route, `route del`/`destinations clear` nothing to delete
EXIT_USAGE = 2  # bad arguments, configuration or input file, as `nginx -t` and argparse
EXIT_UNAVAILABLE = 3  # a backend cannot answer now, or the output cannot be written
EXIT_BAD_DATA = 4  # the backend that answered holds a malformed value
# Characters of one error line: the word quoted from a bad routes-file line can be megabytes.
MAX_MESSAGE = 300


def build(config: Config) -> Routing | None:
    try:
        return Routing.build(config)
    except ConfigError as exc:
        report(config_errors(exc))
    except RoutesFileError as exc:
        report(exc.errors)
    return None


def read_config(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        report(config_errors(exc))
        return None


# --- messages --------------------------------------------------------------------------------


def config_errors(exc: ConfigError) -> list[str]:
    if exc.path is None:
        return exc.errors
    return [f"{exc.path}: {error}" for error in exc.errors]


def report(errors: Sequence[str]) -> None:
    for error in errors:
        print(f"moxy: {' '.join(cut(error).splitlines())}", file=sys.stderr)


def cut(message: str) -> str:
    """A message of at most about MAX_MESSAGE characters: its start (where and what) and its
    end (why), the middle of a long quoted word left out and counted."""
    if len(message) <= MAX_MESSAGE:
        return message
    head, tail = MAX_MESSAGE * 2 // 3, MAX_MESSAGE // 4
    left_out = len(message) - head - tail
    return f"{message[:head]}[... {left_out} characters ...]{message[-tail:]}"
