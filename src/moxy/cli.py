"""The `moxy` command: `serve`, `check-config` and `--version`, as argparse subcommands.

User errors (a missing or broken config or routes file, bad arguments) end in one line per
problem on stderr, prefixed "moxy: ", and exit status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moxy import __version__
from moxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from moxy.lookup.file import FileSource, RoutesFileError

EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or an unusable configuration, as `nginx -t` and argparse

_Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: _Command = args.command
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moxy", description="Transparent SMTP routing proxy: answers as MX, relays live."
    )
    parser.add_argument("--version", action="version", version=f"moxy {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", help="accept mail and proxy it to its destinations")
    _add_config_option(serve)
    serve.set_defaults(command=_serve)

    check = commands.add_parser(
        "check-config", help="validate the configuration and routes file, then exit"
    )
    _add_config_option(check)
    check.set_defaults(command=_check_config)
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="PATH",
        help=f"configuration file (default: {DEFAULT_CONFIG_PATH})",
    )


def _check_config(args: argparse.Namespace) -> int:
    if _load(args.config) is None:
        return EXIT_USAGE
    print(f"moxy: configuration file {args.config} is OK")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from moxy.server import run  # imported late: the CLI must not need the server to check configs

    try:
        return run(config)
    except ConfigError as exc:
        _report(_config_errors(exc))
    except RoutesFileError as exc:
        _report(exc.errors)
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _load(path: Path) -> Config | None:
    """Load the config and open its routes file, reporting every problem; None if any."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        _report(_config_errors(exc))
        return None
    if config.routes.file is not None:
        try:
            FileSource.open(config.routes.file, config.routes.reload_interval)
        except RoutesFileError as exc:
            _report(exc.errors)
            return None
    return config


def _config_errors(exc: ConfigError) -> list[str]:
    if exc.path is None:
        return exc.errors
    return [f"{exc.path}: {error}" for error in exc.errors]


def _report(errors: Sequence[str]) -> None:
    for error in errors:
        print(f"moxy: {error}", file=sys.stderr)
