"""The route administration commands of `moxy` (moxy.cli parses their arguments): `makedb`,
`lookup` and `route set|del|list|import`."""

from __future__ import annotations

import argparse
import dbm.gnu
import stat
from pathlib import Path

import trio

from moxy.cli_common import (
    EXIT_BAD_DATA,
    EXIT_NO_ROUTE,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    build,
    read_config,
    report,
)
from moxy.lookup.base import BadRouteData, LookupFailed, Route
from moxy.lookup.build import Routing
from moxy.lookup.file import RoutesFileError, parse_key
from moxy.lookup.gdbm import make_db
from moxy.lookup.keys import lookup_keys

# --- makedb, lookup --------------------------------------------------------------------------


def makedb(args: argparse.Namespace) -> int:
    output: Path = args.output or args.routes.with_name(args.routes.name + ".db")
    refusal = _not_replaceable(output)
    if refusal:
        report([refusal])
        return EXIT_USAGE
    try:
        count = make_db(args.routes, output)
    except RoutesFileError as exc:
        report(exc.errors)
        return EXIT_USAGE
    except (OSError, dbm.gnu.error) as exc:
        report([f"cannot write {output}: {getattr(exc, 'strerror', None) or exc}"])
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


def lookup(args: argparse.Namespace) -> int:
    try:
        keys = _keys_of(args.target)
    except ValueError as exc:
        report([str(exc)])
        return EXIT_USAGE
    config = read_config(args.config)
    routing = build(config) if config is not None else None
    if routing is None:
        return EXIT_USAGE
    if routing.router is None:
        assert config is not None
        report([f"{args.config}: no route source: [routes] is not configured (relay."
                 "accounting_only sends every recipient to "
                 f"{config.relay.accounting_only})"])
        return EXIT_USAGE
    try:
        route = trio.run(_route_by_keys, routing, keys)
    except LookupFailed as exc:
        report([str(exc)])
        return EXIT_UNAVAILABLE
    except BadRouteData as exc:
        report([str(exc)])
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


def route(args: argparse.Namespace) -> int:
    """`moxy route ACTION`, on the Redis of `[routes.redis]`."""
    config = read_config(args.config)
    if config is None:
        return EXIT_USAGE
    settings = config.routes.redis
    if settings is None:
        report([f"{config.path}: routes.redis: not configured; `moxy route` needs this table"])
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
                    report([f"no route for {parse_key(args.key.strip())} in {where(settings)}"])
                    return EXIT_NO_ROUTE
                print(f"moxy: {parse_key(args.key.strip())} deleted")
            case "list":
                for key, value in route_list(client, settings, args.pattern.lower()):
                    print(f"{key}  {value}")
            case "import":
                count = route_import(client, settings, args.file)
                print(f"moxy: imported {count} routes from {args.file}")
    except ValueError as exc:  # a bad key or destination, before anything was written
        report([str(exc)])
        return EXIT_USAGE
    except RoutesFileError as exc:
        report(exc.errors)
        return EXIT_USAGE
    except redis.RedisError as exc:
        report([f"{where(settings)}: {exc}"])
        return EXIT_UNAVAILABLE
    finally:
        client.close()
    return EXIT_OK
