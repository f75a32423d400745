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
import dbm.gnu
import logging
import os
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from moxy import __version__
from moxy.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from moxy.lookup.base import BadRouteData, LookupFailed, Route
from moxy.lookup.build import Routing
from moxy.lookup.file import RoutesFileError, parse_key
from moxy.lookup.gdbm import make_db
from moxy.lookup.keys import lookup_keys

EXIT_OK = 0
EXIT_NO_ROUTE = 1  # `lookup` found no route, `route del`/`destinations clear` nothing to delete
EXIT_USAGE = 2  # bad arguments, configuration or input file, as `nginx -t` and argparse
EXIT_UNAVAILABLE = 3  # a backend cannot answer now, or the output cannot be written
EXIT_BAD_DATA = 4  # the backend that answered holds a malformed value
# Characters of one error line: the word quoted from a bad routes-file line can be megabytes.
MAX_MESSAGE = 300

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
    makedb.set_defaults(command=_makedb)

    lookup = commands.add_parser(
        "lookup", help="show which source and key route an address or domain, and where to"
    )
    lookup.add_argument("target", metavar="ADDRESS-OR-DOMAIN")
    _add_config_option(lookup)
    lookup.set_defaults(command=_lookup)

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
        parser_.set_defaults(command=_route, action=action)

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
        _report(_config_errors(exc))
    except RoutesFileError as exc:
        _report(exc.errors)
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _load(path: Path) -> Config | None:
    """Load the config and make its route sources (reading the local files they name),
    reporting every problem; None if any."""
    config = _read_config(path)
    if config is None or _build(config) is None:
        return None
    from moxy import control, privileges
    from moxy.accounting.sinks import check_sinks
    from moxy.tls import TlsContexts

    try:  # as serve: root on port 25 without [server] user, a user it cannot become
        switch = privileges.plan(config)
    except privileges.PrivilegeError as exc:
        _report([str(exc)])
        return None
    user = None if switch is None else (switch.user, switch.uid, switch.gid)
    try:  # the certificate, key and CA files are read now, not at the first STARTTLS
        TlsContexts.read(config)
        check_sinks(config, user, create=False)  # the sinks and the message log, as serve does
    except ConfigError as exc:
        _report(_config_errors(exc))
        return None
    if errors := control.check_paths(config):
        _report([f"{config.path}: {error}" for error in errors])
        return None
    return config


def _build(config: Config) -> Routing | None:
    try:
        return Routing.build(config)
    except ConfigError as exc:
        _report(_config_errors(exc))
    except RoutesFileError as exc:
        _report(exc.errors)
    return None


def _read_config(path: Path) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _report(_config_errors(exc))
        return None


# --- makedb, lookup --------------------------------------------------------------------------


def _makedb(args: argparse.Namespace) -> int:
    output: Path = args.output or args.routes.with_name(args.routes.name + ".db")
    refusal = _not_replaceable(output)
    if refusal:
        _report([refusal])
        return EXIT_USAGE
    try:
        count = make_db(args.routes, output)
    except RoutesFileError as exc:
        _report(exc.errors)
        return EXIT_USAGE
    except (OSError, dbm.gnu.error) as exc:
        _report([f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}"])
        return EXIT_UNAVAILABLE
    print(f"moxy: {output}: {count} routes from {args.routes}")
    return EXIT_OK


def _not_replaceable(output: Path) -> str | None:
    """Why makedb must not write `output`, or None. It renames a new file over the target,
    which would put a database where a FIFO or a device node was (/dev/null, /dev/full for
    everyone after it): only a regular file, or nothing yet, is a database's place."""
    try:
        mode = output.stat().st_mode  # a symbolic link: what it points to
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot write {output}: {exc.strerror or exc}"
    if stat.S_ISREG(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
    return f"{output}: {kind}; makedb writes a database only over a regular file"


def _lookup(args: argparse.Namespace) -> int:
    try:
        keys = _keys_of(args.target)
    except ValueError as exc:
        _report([str(exc)])
        return EXIT_USAGE
    config = _read_config(args.config)
    routing = _build(config) if config is not None else None
    if routing is None:
        return EXIT_USAGE
    if routing.router is None:
        assert config is not None
        _report([f"{args.config}: no route source: [routes] is not configured (relay."
                 "accounting_only sends every recipient to "
                 f"{config.relay.accounting_only})"])
        return EXIT_USAGE
    try:
        route = trio.run(_route_by_keys, routing, keys)
    except LookupFailed as exc:
        _report([str(exc)])
        return EXIT_UNAVAILABLE
    except BadRouteData as exc:
        _report([str(exc)])
        return EXIT_BAD_DATA
    if route is None:
        print(f"no route for {args.target} (keys tried: {', '.join(keys)})")
        return EXIT_NO_ROUTE
    print(f"source: {route.source}")
    print(f"key: {route.key}")
    for number, group in enumerate(route.groups, start=1):
        print(f"group {number}: {group}")
    return EXIT_OK


def _keys_of(target: str) -> list[str]:
    """The keys Moxy tries for an address, a domain (as for any address there), or a local
    part without domain, in order."""
    local, at, domain = target.rpartition("@")
    # An "@" inside the local part only quoted ("a@b"@example.org), as in a RCPT.
    bad_local = not local or ("@" in local and not local.startswith('"'))
    if (
        not target or target.startswith(".") or any(c.isspace() for c in target)
        or (at and (bad_local or not domain))
    ):
        raise ValueError(f"{target!r}: expected an address, a domain or a local part")
    if "@" in target or not ("." in target or target.startswith("[")):
        return list(dict.fromkeys(lookup_keys(target)))
    return list(lookup_keys("@" + target)[1:])


async def _route_by_keys(routing: Routing, keys: list[str]) -> Route | None:
    assert routing.router is not None
    try:
        return await routing.router.route_keys(keys)
    finally:
        await routing.aclose()


# --- route set|del|list|import -------------------------------------------------------------


def _route(args: argparse.Namespace) -> int:
    """`moxy route ACTION`, on the Redis of `[routes.redis]`."""
    config = _read_config(args.config)
    if config is None:
        return EXIT_USAGE
    settings = config.routes.redis
    if settings is None:
        _report([f"{config.path}: routes.redis: not configured; `moxy route` needs this table"])
        return EXIT_USAGE
    # Imported here: only these commands need redis-py, which takes most of a second to import.
    import redis

    from moxy.lookup.redis import connect, route_del, route_import, route_list, route_set, where

    client = connect(settings)
    try:
        match args.action:
            case "set":
                groups = route_set(client, settings, args.key, " ".join(args.destinations))
                print(f"moxy: {parse_key(args.key.strip())} -> {' '.join(map(str, groups))}")
            case "del":
                if not route_del(client, settings, args.key):
                    _report([f"no route for {parse_key(args.key.strip())} in {where(settings)}"])
                    return EXIT_NO_ROUTE
                print(f"moxy: {parse_key(args.key.strip())} deleted")
            case "list":
                for key, value in route_list(client, settings, args.pattern.lower()):
                    print(f"{key}  {value}")
            case "import":
                count = route_import(client, settings, args.file)
                print(f"moxy: imported {count} routes from {args.file}")
    except ValueError as exc:  # a bad key or destination, before anything was written
        _report([str(exc)])
        return EXIT_USAGE
    except RoutesFileError as exc:
        _report(exc.errors)
        return EXIT_USAGE
    except redis.RedisError as exc:
        _report([f"{where(settings)}: {exc}"])
        return EXIT_UNAVAILABLE
    finally:
        client.close()
    return EXIT_OK


# --- destinations ---------------------------------------------------------------------------


def _destinations(args: argparse.Namespace) -> int:
    from moxy import control

    config = _read_config(args.config)
    if config is None:
        return EXIT_USAGE
    paths = control.socket_paths(config)
    if not paths:
        _report([f"{args.config}: destinations.control_socket is not set: the server has no "
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
                    _report([str(answer["error"])])
                    return EXIT_USAGE
                for line in control.describe(answer):
                    print(prefix + line)
                cleared += len(answer.get("cleared", ()))  # type: ignore[arg-type]
        except control.ControlError as exc:
            _report([str(exc)])
            status = EXIT_UNAVAILABLE
    if status == EXIT_OK and address and not cleared:
        _report([f"{address} is not marked down"])
        return EXIT_NO_ROUTE
    return status


# --- messages --------------------------------------------------------------------------------


def _config_errors(exc: ConfigError) -> list[str]:
    if exc.path is None:
        return exc.errors
    return [f"{exc.path}: {error}" for error in exc.errors]


def _report(errors: Sequence[str]) -> None:
    for error in errors:
        print(f"moxy: {' '.join(_cut(error).splitlines())}", file=sys.stderr)


def _cut(message: str) -> str:
    """A message of at most about MAX_MESSAGE characters: its start (where and what) and its
    end (why), the middle of a long quoted word left out and counted."""
    if len(message) <= MAX_MESSAGE:
        return message
    head, tail = MAX_MESSAGE * 2 // 3, MAX_MESSAGE // 4
    left_out = len(message) - head - tail
    return f"{message[:head]}[... {left_out} characters ...]{message[-tail:]}"
