"""The `moxy` command: `serve`, `check-config`, the route administration commands (`makedb`,
`route set|del|list|import`, `lookup`), `destinations list|clear` (asks the running server)
and `--version`, as argparse subcommands.

User errors end in one line per problem on stderr, prefixed "moxy: ", never a traceback. Exit
status: 0 done; 1 no such route (`lookup`, `route del`); 2 bad arguments, configuration or input
file; 3 a backend (Redis, LDAP, a GDBM file) cannot answer, or the output cannot be written;
4 the answering backend holds a malformed value (`lookup`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moxy import __version__, cli_routes
from moxy.cli_common import (
    EXIT_NO_ROUTE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    build,
    config_errors,
    read_config,
    report,
)
from moxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError
from moxy.lookup.file import RoutesFileError

_Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    # Lookups log backend outages for the server's log; a command reports them itself.
    if not logging.getLogger("moxy").handlers:
        logging.getLogger("moxy").addHandler(logging.NullHandler())
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: _Command = args.command
    try:
        return command(args)
    except BrokenPipeError:  # `moxy route list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


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
        "check-config", help="validate the configuration and its route files, then exit"
    )
    _add_config_option(check)
    check.set_defaults(command=_check_config)

    makedb = commands.add_parser(
        "makedb", help="build a GDBM routes database from a routes file (like postmap)"
    )
    makedb.add_argument("routes", type=Path, metavar="ROUTES", help="the routes file")
    makedb.add_argument(
        "-o", "--output", type=Path, metavar="OUT", help="the database (default: ROUTES.db)"
    )
    makedb.set_defaults(command=cli_routes.makedb)

    lookup = commands.add_parser(
        "lookup", help="show which source and key route an address or domain, and where to"
    )
    lookup.add_argument("target", metavar="ADDRESS-OR-DOMAIN")
    _add_config_option(lookup)
    lookup.set_defaults(command=cli_routes.lookup)

    route = commands.add_parser("route", help="change the routes in Redis ([routes.redis])")
    actions = route.add_subparsers(title="actions", metavar="ACTION", required=True)
    route_set_parser = actions.add_parser("set", help="set a key's destinations and announce it")
    route_set_parser.add_argument("key", metavar="KEY")
    route_set_parser.add_argument("destinations", nargs="+", metavar="DEST")
    route_del_parser = actions.add_parser("del", help="delete a key's route and announce it")
    route_del_parser.add_argument("key", metavar="KEY")
    route_list_parser = actions.add_parser("list", help="print routes as routes-file lines")
    route_list_parser.add_argument(
        "pattern", nargs="?", default="*", metavar="PATTERN", help="glob on the key (default *)"
    )
    route_import_parser = actions.add_parser("import", help="store every route of a routes file")
    route_import_parser.add_argument("file", type=Path, metavar="FILE")
    for action, parser_ in [
        ("set", route_set_parser),
        ("del", route_del_parser),
        ("list", route_list_parser),
        ("import", route_import_parser),
    ]:
        _add_config_option(parser_)
        parser_.set_defaults(command=cli_routes.route, action=action)

    dests = commands.add_parser(
        "destinations", help="list or clear the running server's dead destinations"
    )
    dest_actions = dests.add_subparsers(title="actions", metavar="ACTION", required=True)
    dest_list = dest_actions.add_parser("list", help="print the addresses marked down")
    dest_clear = dest_actions.add_parser("clear", help="forget one address (or all): retry now")
    dest_clear.add_argument("address", nargs="?", metavar="ADDRESS", help="IP:port, as listed")
    for action, parser_ in [("list", dest_list), ("clear", dest_clear)]:
        _add_config_option(parser_)
        parser_.set_defaults(command=_destinations, action=action)
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


# --- serve, check-config ------------------------------------------------------------------


def _check_config(args: argparse.Namespace) -> int:
    if _load(args.config) is None:
        return EXIT_USAGE
    print(f"moxy: configuration file {args.config} is OK")
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    from moxy.daemon import run  # imported late: the CLI must not need the server to check configs

    try:
        return run(config)
    except ConfigError as exc:
        report(config_errors(exc))
    except RoutesFileError as exc:
        report(exc.errors)
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _load(path: Path) -> Config | None:
    """Load the config and make its route sources (reading the local files they name),
    reporting every problem; None if any."""
    config = read_config(path)
    if config is None or build(config) is None:
        return None
    from moxy import control, privileges
    from moxy.accounting.sinks import check_sinks
    from moxy.tls import TlsContexts

    try:  # as serve: root on port 25 without [server] user, a user it cannot become
        switch = privileges.plan(config)
    except privileges.PrivilegeError as exc:
        report([str(exc)])
        return None
    user = None if switch is None else (switch.user, switch.uid, switch.gid)
    try:  # the certificate, key and CA files are read now, not at the first STARTTLS
        TlsContexts.read(config)
        check_sinks(config, user, create=False)  # the sinks and the message log, as serve does
    except ConfigError as exc:
        report(config_errors(exc))
        return None
    if errors := control.check_paths(config):
        report([f"{config.path}: {error}" for error in errors])
        return None
    return config


# --- destinations ---------------------------------------------------------------------------


def _destinations(args: argparse.Namespace) -> int:
    from moxy import control

    config = read_config(args.config)
    if config is None:
        return EXIT_USAGE
    paths = control.socket_paths(config)
    if not paths:
        report([f"{args.config}: destinations.control_socket is not set: the server has no "
                 "control socket to ask"])
        return EXIT_USAGE
    address = getattr(args, "address", None)
    request = "list" if args.action == "list" else f"clear {address or ''}".strip()
    status, cleared = EXIT_OK, 0
    for number, path in enumerate(paths):
        prefix = f"worker {number}: " if len(paths) > 1 else ""
        try:
            answers = control.ask(path, request)
            for answer in answers:
                if "error" in answer:
                    report([str(answer["error"])])
                    return EXIT_USAGE
                for line in control.describe(answer):
                    print(prefix + line)
                cleared += len(answer.get("cleared", ()))  # type: ignore[arg-type]
        except control.ControlError as exc:
            report([str(exc)])
            status = EXIT_UNAVAILABLE
    if status == EXIT_OK and address and not cleared:
        report([f"{address} is not marked down"])
        return EXIT_NO_ROUTE
    return status
