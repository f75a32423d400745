"""Moxy's configuration: one TOML file turned into frozen attrs values, validated once at start.

Each section is an attrs class whose fields carry their own parser, so one declaration gives a
key its name, default and check. The route sources' tables (`[routes.ldap]` and the like) are
read straight into the sources' own settings classes, their parsers chosen by field type.
`load_config` walks those declarations, collects every problem as "section.key: message" and
raises them all together as `ConfigError`.
"""

from __future__ import annotations

import difflib
import functools
import grp
import ipaddress
import math
import pwd
import re
import socket
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from moxy.accounting.settings import (
    SINK_NAMES,
    FileSinkSettings,
    GdbmSinkSettings,
    RedisSinkSettings,
    SyslogSinkSettings,
)
from moxy.lookup.base import Destination, DestinationGroup, parse_destination, parse_group
from moxy.lookup.settings import CacheSettings, GdbmSettings, LdapSettings, RedisSettings

DEFAULT_CONFIG_PATH = Path("/etc/moxy/moxy.toml")

BareNewlines = Literal["refuse", "normalise"]


class ConfigError(Exception):
    """The configuration cannot be used; `errors` holds one "section.key: message" per problem.

    `path` is the file it came from; problems with the file as a whole (unreadable, not TOML)
    carry no key.
    """

    def __init__(self, errors: list[str], path: Path | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.path = path


class _Invalid(Exception):
    """A parser rejected a value; each argument is one message saying what was expected."""


@attrs.frozen
class _Context:
    """What parsers may need besides the value: relative paths resolve against `base_dir`."""

    base_dir: Path


_Parser = Callable[[object, _Context], object]
_Check = Callable[[Any], list[tuple[str, str]]]

_PARSER = "moxy.config.parser"
_SECTION = "moxy.config.section"
_CHECK = "moxy.config.check"
_KEYS = "moxy.config.keys"
_OPTIONAL = "moxy.config.optional"


def _key(parser: _Parser) -> dict[str, object]:
    """Field metadata for a key of a section: the parser its TOML value goes through."""
    return {_PARSER: parser}


def _table(cls: type[Any], check: _Check | None = None) -> dict[str, object]:
    """Field metadata for a sub-table of class `cls`; `check` adds problems spanning keys."""
    return {_SECTION: cls, _CHECK: check}


def _backend_table(
    cls: type[Any], *, optional: bool = True, **parsers: _Parser
) -> dict[str, object]:
    """Field metadata for a sub-table read into a backend's own settings class.

    Such a class knows nothing of TOML: its keys are its attrs fields, each parsed by what its
    type calls for (`parsers` overrides that per key), its defaults are its own, and its
    validators' `ValueError`s ("key: message") become errors naming the key. An `optional`
    table that is absent is None; a present one must give every field without a default.
    """
    hints = typing.get_type_hints(cls)
    keys = {f.name: parsers.get(f.name) or _parser_for(hints[f.name]) for f in attrs.fields(cls)}
    return {_SECTION: cls, _CHECK: None, _KEYS: keys, _OPTIONAL: optional}


# --- value parsers ------------------------------------------------------------------------


def _show(value: object) -> str:
    """A TOML-ish rendering of a rejected value for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _integer(minimum: int, *, zero_means: str = "", why: str = "") -> _Parser:
    wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer of at least {minimum}"
    )
    if zero_means:
        wanted = f"0 ({zero_means}) or {wanted}"
    if why:
        wanted = f"{wanted} ({why})"

    def parse(value: object, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        if value < minimum and not (zero_means and value == 0):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        return value

    return parse


def _seconds(*, zero_ok: bool = False) -> _Parser:
    wanted = "a non-negative number of seconds" if zero_ok else "a positive number of seconds"

    def parse(value: object, ctx: _Context) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        return float(value)

    return parse


def _boolean(value: object, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected true or false, got {_show(value)}")


def _choice(*options: str, aliases: Mapping[str, str] | None = None) -> _Parser:
    known = {o: o for o in options} | dict(aliases or {})
    wanted = "one of " + ", ".join(repr(o) for o in options)

    def parse(value: object, ctx: _Context) -> str:
        if isinstance(value, str) and value.lower() in known:
            return known[value.lower()]
        raise _Invalid(f"expected {wanted}, got {_show(value)}")

    return parse


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: object, ctx: _Context) -> str:
    """Free text that ends up in SMTP replies: a CR or LF in it would forge extra reply lines."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if _CONTROL_RE.search(value):
        raise _Invalid("must not contain control characters (CR, LF, tab, ...)")
    return value


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _domain(*, empty_ok: bool = False) -> _Parser:
    def parse(value: object, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a host name, got {_show(value)}")
        if value == "" and empty_ok:
            return value
        if len(value) > 253 or not _DOMAIN_RE.fullmatch(value):
            raise _Invalid(f"expected a host name such as 'mx.example.org', got {_show(value)}")
        return value.rstrip(".")

    return parse


_NODE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _node(value: object, ctx: _Context) -> str:
    """A node name goes into log fields and Redis members: no spaces, no separators."""
    if not isinstance(value, str) or not _NODE_RE.fullmatch(value):
        raise _Invalid(f"expected a name of 1 to 64 letters, digits, '.', '_' or '-', "
                       f"got {_show(value)}")
    return value


def _path(value: object, ctx: _Context) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a file path, got {_show(value)}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else ctx.base_dir / path


def _string(value: object, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _strings(value: object, ctx: _Context) -> tuple[str, ...]:
    """One string, or an array of them."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a string or an array of strings, got {_show(value)}")
    return tuple(value)


_PARSERS_BY_TYPE: Mapping[object, _Parser] = {
    str: _string,
    bool: _boolean,
    int: _integer(0),
    float: _seconds(),
    Path: _path,
    tuple[str, ...]: _strings,
}


def _parser_for(hint: object) -> _Parser:
    """The parser for a backend settings field of type `hint`; `X | None` reads as X (TOML
    has no null: an absent key keeps the default)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [h for h in typing.get_args(hint) if h is not type(None)]
        if len(members) == 1:
            hint = members[0]
    try:
        return _PARSERS_BY_TYPE[hint]
    except KeyError:
        raise TypeError(f"no configuration parser for fields of type {hint!r}") from None


def _user(value: object, ctx: _Context) -> str:
    """A user that exists here: a typo must fail `check-config`, not the start as root."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a user name, got {_show(value)}")
    if value:
        try:
            pwd.getpwnam(value)
        except KeyError:
            raise _Invalid(f"no such user {value!r}") from None
    return value


def _group(value: object, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a group name, got {_show(value)}")
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise _Invalid(f"no such group {value!r}") from None
    return value


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: object, ctx: _Context) -> tuple[Network, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f'expected an array such as ["192.0.2.0/24", "2001:db8::/32"], '
                       f"got {_show(value)}")
    problems: list[str] = []
    networks: list[Network] = []
    for entry in value:
        try:
            # strict: "192.0.2.1/24" is more likely a typo than a network
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as exc:
            problems.append(f"{entry!r}: {exc}")
    if problems:
        raise _Invalid(*problems)
    return tuple(networks)


def _destination_group(value: object, ctx: _Context) -> DestinationGroup:
    """One destination group in the routes syntax: `host:port|host:port` (failover)."""
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f'expected a destination group such as "smtp1.example.net:25|'
                       f'smtp2.example.net:25", got {_show(value)}')
    if len(value.split()) != 1:
        raise _Invalid(f"{value!r}: one destination group (alternatives joined by '|'), "
                       "without spaces")
    try:
        return parse_group(value.strip())
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


# --- listen addresses ---------------------------------------------------------------------


@attrs.frozen
class ListenAddress:
    """A local address to accept SMTP connections on; port 0 asks the kernel for a free port."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse `host:port` or `[IPv6]:port`; raises ValueError saying what is wrong."""
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"{text!r}: expected [IPv6]:port")
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise ValueError(f"{text!r}: expected host:port")
            if ":" in host:
                raise ValueError(f"{text!r}: write IPv6 addresses as [address]:port")
            if not host:
                raise ValueError(f"{text!r}: missing host (all interfaces: 0.0.0.0 or [::])")
            if not _DOMAIN_RE.fullmatch(host):
                raise ValueError(f"{text!r}: {host!r} is not an IP address or host name")
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
        return cls(host, int(port_text))


def _listen(value: object, ctx: _Context) -> tuple[ListenAddress, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f'expected a non-empty array such as ["127.0.0.1:25"], got {_show(value)}')
    return _addresses(value)


def _listen_proxy(value: object, ctx: _Context) -> tuple[ListenAddress, ...]:
    if not isinstance(value, list):
        raise _Invalid(f'expected an array such as ["0.0.0.0:2526"], got {_show(value)}')
    addresses = _addresses(value)
    for address in addresses:
        # Worker processes tell these listeners from `listen` ones by their bound address.
        try:
            ipaddress.ip_address(address.host)
        except ValueError:
            raise _Invalid(f"'{address}': write an IP address (0.0.0.0 or [::] for all)") from None
    return addresses


def _addresses(value: list[object]) -> tuple[ListenAddress, ...]:
    problems: list[str] = []
    addresses: list[ListenAddress] = []
    for entry in value:
        if not isinstance(entry, str):
            problems.append(f"expected strings such as '127.0.0.1:25', got {_show(entry)}")
            continue
        try:
            address = ListenAddress.parse(entry)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if address in addresses and address.port != 0:
            problems.append(f"{entry!r} is listed twice")
        addresses.append(address)
    if problems:
        raise _Invalid(*problems)
    return tuple(addresses)


# --- sections -----------------------------------------------------------------------------

_fqdn = functools.cache(socket.getfqdn)
_COUNT = _key(_integer(1))
_SECONDS = _key(_seconds())


@attrs.frozen
class ServerSettings:
    """[server]: where Moxy listens and how it names itself to clients."""

    listen: tuple[ListenAddress, ...] = attrs.field(
        default=(ListenAddress("127.0.0.1", 2525), ListenAddress("::1", 2525)),
        metadata=_key(_listen),
    )
    hostname: str = attrs.field(factory=_fqdn, metadata=_key(_domain()))
    banner: str = attrs.field(default="ESMTP Moxy", metadata=_key(_text))
    workers: int = attrs.field(default=1, metadata=_COUNT)
    # Which Moxy of a cluster saw an event (accounting); the short host name by default.
    node: str = attrs.field(factory=socket.gethostname, metadata=_key(_node))
    # Started as root: bind the listeners, then serve as this user and group (privileges.py).
    user: str = attrs.field(default="", metadata=_key(_user))
    group: str = attrs.field(default="", metadata=_key(_group))
    # Listeners behind a load balancer: every connection starts with a PROXY protocol header
    # (v1 or v2) from one of proxy_protocol_from; the client address it carries is used.
    listen_proxy: tuple[ListenAddress, ...] = attrs.field(
        default=(), metadata=_key(_listen_proxy)
    )
    proxy_protocol_from: tuple[Network, ...] = attrs.field(default=(), metadata=_key(_networks))


def _check_server(server: ServerSettings) -> list[tuple[str, str]]:
    if server.group and not server.user:
        return [("group", "needs server.user: the user Moxy serves as")]
    if server.listen_proxy and not server.proxy_protocol_from:
        return [("proxy_protocol_from", "required with server.listen_proxy: the networks of "
                 "the load balancers allowed to send PROXY headers")]
    overlap = [a for a in server.listen_proxy if a in server.listen and a.port != 0]
    if overlap:
        return [("listen_proxy", f"'{overlap[0]}' is also in server.listen")]
    return []


@attrs.frozen
class ProxySettings:
    """[proxy]: how transactions are relayed to destinations."""

    split_destinations: bool = attrs.field(default=False, metadata=_key(_boolean))
    bare_newlines: BareNewlines = attrs.field(
        default="refuse",
        metadata=_key(_choice("refuse", "normalise", aliases={"normalize": "normalise"})),
    )
    helo_name: str = attrs.field(default="", metadata=_key(_domain(empty_ok=True)))


SOURCE_NAMES = ("redis", "ldap", "gdbm", "file")
_CHAIN_EXAMPLE = '["redis", "ldap", "gdbm", "file"]'


def _chain(value: object, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"expected a non-empty array such as {_CHAIN_EXAMPLE}, got {_show(value)}")
    problems: list[str] = []
    chain: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            problems.append(f"expected source names such as 'redis', got {_show(entry)}")
        elif entry.lower() not in SOURCE_NAMES:
            hint = difflib.get_close_matches(entry.lower(), SOURCE_NAMES, n=1)
            suffix = f"did you mean {hint[0]!r}?" if hint else "known: " + ", ".join(SOURCE_NAMES)
            problems.append(f"unknown route source {entry!r} ({suffix})")
        elif entry.lower() in chain:
            problems.append(f"{entry!r} is listed twice")
        else:
            chain.append(entry.lower())
    if problems:
        raise _Invalid(*problems)
    return tuple(chain)


_ZERO_OK = _seconds(zero_ok=True)


@attrs.frozen
class RoutesSettings:
    """[routes]: the DomainDB sources, asked in `chain` order, with one cache in front.

    Without `chain` the routes file alone is used (the flat-file configuration of Moxy's first
    releases). Each other source is a sub-table read into that backend's own settings class.
    """

    chain: tuple[str, ...] | None = attrs.field(default=None, metadata=_key(_chain))
    file: Path | None = attrs.field(default=None, metadata=_key(_path))
    reload_interval: float = attrs.field(default=1.0, metadata=_key(_ZERO_OK))
    gdbm: GdbmSettings | None = attrs.field(
        default=None, metadata=_backend_table(GdbmSettings, reload_interval=_ZERO_OK)
    )
    ldap: LdapSettings | None = attrs.field(default=None, metadata=_backend_table(LdapSettings))
    redis: RedisSettings | None = attrs.field(
        default=None, metadata=_backend_table(RedisSettings)
    )
    cache: CacheSettings = attrs.field(
        factory=CacheSettings,
        metadata=_backend_table(
            CacheSettings,
            optional=False,
            ttl=_ZERO_OK,
            negative_ttl=_ZERO_OK,
            stale_grace=_ZERO_OK,
        ),
    )

    @property
    def sources(self) -> tuple[str, ...]:
        """The source names in the order they are asked (none in accounting-only mode
        without a routes file)."""
        if self.chain is not None:
            return self.chain
        return ("file",) if self.file is not None else ()


_TABLES = ("gdbm", "ldap", "redis")  # the sources configured by a sub-table


_NO_SOURCE = "required: without a route source Moxy would refuse all mail"


def _check_routes(routes: RoutesSettings) -> list[tuple[str, str]]:
    tables = [name for name in _TABLES if getattr(routes, name) is not None]
    if routes.chain is None:
        if tables:
            return [("chain", f"required with a [routes.{tables[0]}] table: the sources in the "
                              f"order to ask them, e.g. {_CHAIN_EXAMPLE}")]
        if routes.file is None:
            return [("file", _NO_SOURCE)]
        return []
    problems: list[tuple[str, str]] = []
    for name in routes.chain:
        if name == "file" and routes.file is None:
            problems.append(("chain", "'file' needs routes.file (the routes file)"))
        elif name != "file" and getattr(routes, name) is None:
            problems.append(("chain", f"{name!r} needs a [routes.{name}] table"))
    if routes.file is not None and "file" not in routes.chain:
        problems.append(("file", "set, but 'file' is not in routes.chain"))
    problems.extend(
        (name, f"configured, but {name!r} is not in routes.chain")
        for name in tables
        if name not in routes.chain
    )
    return problems


_SINKS_EXAMPLE = '["file", "syslog"]'


def _sinks(value: object, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"expected an array such as {_SINKS_EXAMPLE}, got {_show(value)}")
    problems: list[str] = []
    sinks: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            problems.append(f"expected sink names such as 'file', got {_show(entry)}")
        elif entry.lower() not in SINK_NAMES:
            hint = difflib.get_close_matches(entry.lower(), SINK_NAMES, n=1)
            suffix = f"did you mean {hint[0]!r}?" if hint else "known: " + ", ".join(SINK_NAMES)
            problems.append(f"unknown accounting sink {entry!r} ({suffix})")
        elif entry.lower() in sinks:
            problems.append(f"{entry!r} is listed twice")
        else:
            sinks.append(entry.lower())
    if problems:
        raise _Invalid(*problems)
    return tuple(sinks)


@attrs.frozen
class AccountingSettings:
    """[accounting]: where delivery events go (docs/accounting.md). Each sink named in `sinks`
    gets its own queue of `queue` events; its table, `[accounting.<sink>]`, is read into that
    sink's own settings class."""

    sinks: tuple[str, ...] = attrs.field(default=("file",), metadata=_key(_sinks))
    queue: int = attrs.field(default=10_000, metadata=_COUNT)
    file: FileSinkSettings | None = attrs.field(
        default=None, metadata=_backend_table(FileSinkSettings)
    )
    syslog: SyslogSinkSettings | None = attrs.field(
        default=None, metadata=_backend_table(SyslogSinkSettings)
    )
    gdbm: GdbmSinkSettings | None = attrs.field(
        default=None, metadata=_backend_table(GdbmSinkSettings)
    )
    redis: RedisSinkSettings | None = attrs.field(
        default=None, metadata=_backend_table(RedisSinkSettings)
    )


_REQUIRED_TABLES = {"gdbm": "path"}  # sinks that cannot run on defaults alone


def _check_accounting(accounting: AccountingSettings) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for name, key in _REQUIRED_TABLES.items():
        if name in accounting.sinks and getattr(accounting, name) is None:
            problems.append(
                ("sinks", f"{name!r} needs an [accounting.{name}] table (with its {key})")
            )
    problems.extend(
        (name, f"configured, but {name!r} is not in accounting.sinks")
        for name in SINK_NAMES
        if getattr(accounting, name) is not None and name not in accounting.sinks
    )
    return problems


@attrs.frozen
class LogSettings:
    """[log]: the per-message text log and the level of operational messages."""

    file: Path | None = attrs.field(default=None, metadata=_key(_path))
    level: str = attrs.field(
        default="info", metadata=_key(_choice("debug", "info", "warning", "error"))
    )


@attrs.frozen
class Limits:
    """[limits]: sizes in octets (lines include CRLF) and counts; RFC 5321 §4.5.3.1 minimums."""

    command_line: int = attrs.field(
        default=512, metadata=_key(_integer(512, why="RFC 5321 §4.5.3.1.4"))
    )
    text_line: int = attrs.field(
        default=1000,
        metadata=_key(_integer(1000, zero_means="unlimited", why="RFC 5321 §4.5.3.1.6")),
    )
    recipients: int = attrs.field(default=100, metadata=_COUNT)
    message_size: int = attrs.field(default=52_428_800, metadata=_COUNT)
    errors: int = attrs.field(default=20, metadata=_COUNT)
    reply_line: int = attrs.field(
        default=2048, metadata=_key(_integer(512, why="RFC 5321 §4.5.3.1.5"))
    )
    data_chunk: int = attrs.field(default=65_536, metadata=_COUNT)
    connections: int = attrs.field(default=1000, metadata=_COUNT)
    idle_upstreams: int = attrs.field(
        default=0, metadata=_key(_integer(0, zero_means="no reuse across client sessions"))
    )
    # Per client address (IPv6: per /64); see src/moxy/clientlimits.py.
    connections_per_ip: int = attrs.field(
        default=50, metadata=_key(_integer(1, zero_means="no limit"))
    )
    connections_per_ip_rate: int = attrs.field(
        default=0, metadata=_key(_integer(1, zero_means="no limit"))
    )
    messages_per_ip_rate: int = attrs.field(
        default=0, metadata=_key(_integer(1, zero_means="no limit"))
    )


@attrs.frozen
class Timeouts:
    """[timeouts]: seconds; the upstream ones are RFC 5321 §4.5.3.2's client timeouts."""

    client_command: float = attrs.field(default=300.0, metadata=_SECONDS)
    client_data: float = attrs.field(default=180.0, metadata=_SECONDS)
    upstream_connect: float = attrs.field(default=30.0, metadata=_SECONDS)
    upstream_greeting: float = attrs.field(default=300.0, metadata=_SECONDS)
    upstream_command: float = attrs.field(default=300.0, metadata=_SECONDS)
    upstream_mail: float = attrs.field(default=300.0, metadata=_SECONDS)
    upstream_rcpt: float = attrs.field(default=300.0, metadata=_SECONDS)
    upstream_data_init: float = attrs.field(default=120.0, metadata=_SECONDS)
    upstream_data_block: float = attrs.field(default=180.0, metadata=_SECONDS)
    upstream_data_end: float = attrs.field(default=600.0, metadata=_SECONDS)
    upstream_idle: float = attrs.field(default=10.0, metadata=_SECONDS)
    shutdown_grace: float = attrs.field(default=30.0, metadata=_SECONDS)


def _metrics_listen(value: object, ctx: _Context) -> ListenAddress:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string such as '127.0.0.1:9325', got {_show(value)}")
    try:
        address = ListenAddress.parse(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None
    if address.port == 0:
        raise _Invalid(f"{value!r}: port 0 is not allowed here (Prometheus must know the port)")
    return address


@attrs.frozen
class MetricsSettings:
    """[metrics]: the Prometheus endpoint (src/moxy/metrics.py); off while `listen` is unset."""

    listen: ListenAddress | None = attrs.field(default=None, metadata=_key(_metrics_listen))
    # Destination host:port labels on the upstream metrics: one series per destination.
    per_destination: bool = attrs.field(default=False, metadata=_key(_boolean))


@attrs.frozen
class DestinationOverride:
    """One `[destinations.override."host:port"]` table: settings for one destination."""

    destination: Destination
    concurrency: int


def _overrides(value: object, ctx: _Context) -> tuple[DestinationOverride, ...]:
    """`{"host:port" = {concurrency = N}, ...}`: keys in route syntax (port 25 by default)."""
    if not isinstance(value, dict):
        raise _Invalid(f'expected a table such as [destinations.override."192.0.2.10:25"], '
                       f"got {_show(value)}")
    problems: list[str] = []
    overrides: list[DestinationOverride] = []
    count = _integer(1)
    for name, table in value.items():
        try:
            destination = parse_destination(name)
        except ValueError as exc:
            problems.append(f"{name!r}: {exc}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{name!r}: expected a table such as {{ concurrency = 5 }}, "
                            f"got {_show(table)}")
            continue
        for key in table.keys() - {"concurrency"}:
            problems.append(f"{name!r}: unknown key {key!r} (known: 'concurrency')")
        if "concurrency" not in table:
            problems.append(f"{name!r}: concurrency: required")
            continue
        try:
            concurrency = count(table["concurrency"], ctx)
            assert isinstance(concurrency, int)
            overrides.append(DestinationOverride(destination, concurrency))
        except _Invalid as exc:
            problems.extend(f"{name!r}: concurrency: {msg}" for msg in exc.args)
    if problems:
        raise _Invalid(*problems)
    return tuple(overrides)


@attrs.frozen
class DestinationSettings:
    """[destinations]: dead-destination memory and per-destination concurrency."""

    down_time: float = attrs.field(default=30.0, metadata=_key(_ZERO_OK))
    down_time_max: float = attrs.field(default=600.0, metadata=_key(_ZERO_OK))
    concurrency: int = attrs.field(
        default=20, metadata=_key(_integer(0, zero_means="unlimited"))
    )
    concurrency_wait: float = attrs.field(default=1.0, metadata=_key(_ZERO_OK))
    control_socket: Path | None = attrs.field(default=None, metadata=_key(_path))
    override: tuple[DestinationOverride, ...] = attrs.field(default=(), metadata=_key(_overrides))


def _check_destinations(settings: DestinationSettings) -> list[tuple[str, str]]:
    if settings.down_time_max < settings.down_time:
        return [("down_time_max", f"must be at least down_time ({settings.down_time:g})")]
    return []


@attrs.frozen
class RelaySettings:
    """[relay]: who may send to domains without a route, and the accounting-only mode."""

    trusted_networks: tuple[Network, ...] = attrs.field(default=(), metadata=_key(_networks))
    smarthost: DestinationGroup | None = attrs.field(
        default=None, metadata=_key(_destination_group)
    )
    accounting_only: DestinationGroup | None = attrs.field(
        default=None, metadata=_key(_destination_group)
    )


def _check_relay(relay: RelaySettings) -> list[tuple[str, str]]:
    if relay.accounting_only is not None:
        if relay.smarthost is not None:
            return [("smarthost", "not used with relay.accounting_only, where every recipient "
                                  "goes to that destination")]
        return []
    if relay.trusted_networks and relay.smarthost is None:
        return [("smarthost", "required with relay.trusted_networks: where mail from them to "
                              "domains without a route goes")]
    if relay.smarthost is not None and not relay.trusted_networks:
        return [("trusted_networks", "required with relay.smarthost: the clients that may "
                                     "use it")]
    return []


TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
UPSTREAM_TLS_MODES = ("none", "opportunistic", "required")


@attrs.frozen
class TlsSettings:
    """[tls]: STARTTLS for clients (cert/key) and towards destinations (upstream*)."""

    cert: Path | None = attrs.field(default=None, metadata=_key(_path))  # PEM, chain included
    key: Path | None = attrs.field(default=None, metadata=_key(_path))
    min_version: str = attrs.field(
        default="TLSv1.2",
        metadata=_key(_choice(*TLS_VERSIONS, aliases={v.lower(): v for v in TLS_VERSIONS})),
    )
    ciphers: str = attrs.field(default="", metadata=_key(_text))  # OpenSSL syntax, TLS <= 1.2
    require: bool = attrs.field(default=False, metadata=_key(_boolean))
    upstream: str = attrs.field(
        default="opportunistic", metadata=_key(_choice(*UPSTREAM_TLS_MODES))
    )
    upstream_verify: bool = attrs.field(default=False, metadata=_key(_boolean))
    upstream_ca_file: Path | None = attrs.field(default=None, metadata=_key(_path))


def _check_tls(tls: TlsSettings) -> list[tuple[str, str]]:
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        return [(missing, "required with tls.cert and tls.key: both or neither")]
    if tls.require and tls.cert is None:
        return [("require", "needs tls.cert and tls.key (STARTTLS cannot be offered without)")]
    return []


@attrs.frozen
class Config:
    """The whole configuration; `path` is the file it was loaded from (None when built in code)."""

    server: ServerSettings = attrs.field(
        factory=ServerSettings, metadata=_table(ServerSettings, check=_check_server)
    )
    proxy: ProxySettings = attrs.field(factory=ProxySettings, metadata=_table(ProxySettings))
    routes: RoutesSettings = attrs.field(
        factory=RoutesSettings, metadata=_table(RoutesSettings, check=_check_routes)
    )
    log: LogSettings = attrs.field(factory=LogSettings, metadata=_table(LogSettings))
    limits: Limits = attrs.field(factory=Limits, metadata=_table(Limits))
    timeouts: Timeouts = attrs.field(factory=Timeouts, metadata=_table(Timeouts))
    accounting: AccountingSettings = attrs.field(
        factory=AccountingSettings,
        metadata=_table(AccountingSettings, check=_check_accounting),
    )
    metrics: MetricsSettings = attrs.field(
        factory=MetricsSettings, metadata=_table(MetricsSettings)
    )
    destinations: DestinationSettings = attrs.field(
        factory=DestinationSettings,
        metadata=_table(DestinationSettings, check=_check_destinations),
    )
    relay: RelaySettings = attrs.field(
        factory=RelaySettings, metadata=_table(RelaySettings, check=_check_relay)
    )
    tls: TlsSettings = attrs.field(
        factory=TlsSettings, metadata=_table(TlsSettings, check=_check_tls)
    )
    path: Path | None = None

    @property
    def file_sink(self) -> FileSinkSettings:
        """[accounting.file], whose `path` defaults to `[log] file` (the message log of
        Moxy's first releases)."""
        settings = self.accounting.file or FileSinkSettings()
        if settings.path is None and self.log.file is not None:
            settings = attrs.evolve(settings, path=self.log.file)
        return settings


# --- loading ------------------------------------------------------------------------------


def load_config(path: str | Path) -> Config:
    """Read, parse and validate a config file; raises `ConfigError` listing every problem."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror or exc}"], path) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start})"], path) from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], path) from None
    errors: list[str] = []
    config: Config = _load_table(Config, table, "", _Context(path.absolute().parent), errors)
    if config.relay.accounting_only is not None:
        # Every recipient goes to that one destination: no route source is needed.
        errors = [e for e in errors if e != f"routes.file: {_NO_SOURCE}"]
    if errors:
        raise ConfigError(errors, path)
    return attrs.evolve(config, path=path.absolute())


def _load_table(
    cls: type[Any],
    table: Mapping[str, object],
    prefix: str,
    ctx: _Context,
    errors: list[str],
    keys: Mapping[str, _Parser] | None = None,
) -> Any:
    """Build `cls` from one TOML table, appending "prefix.key: message" for each problem.

    `keys` are the parsers of a backend settings class (see `_backend_table`); without them the
    keys and sub-tables are those of `cls`'s fields that carry config metadata.
    """
    if keys is not None:
        fields = {name: attrs.fields_dict(cls)[name] for name in keys}
    else:
        fields = {f.name: f for f in attrs.fields(cls) if f.metadata.keys() & {_PARSER, _SECTION}}
    for key, value in table.items():
        if key not in fields:
            kind = "section" if isinstance(value, dict) else "key"
            hint = difflib.get_close_matches(key, fields, n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{prefix}{key}: unknown {kind}{suffix}")
    before = len(errors)
    values: dict[str, object] = {}
    for name, field in fields.items():
        if _SECTION in field.metadata:
            values[name] = _load_section(field, table.get(name), f"{prefix}{name}", ctx, errors)
        elif name in table:
            parse = keys[name] if keys is not None else field.metadata[_PARSER]
            try:
                values[name] = parse(table[name], ctx)
            except _Invalid as exc:
                errors.extend(f"{prefix}{name}: {msg}" for msg in exc.args)
        elif field.default is attrs.NOTHING:
            errors.append(f"{prefix}{name}: required")
    if keys is None:
        return cls(**values)
    if len(errors) > before:
        return None
    try:
        return cls(**values)  # runs the backend's own validators
    except ValueError as exc:
        # Moxy's backends word them "key: message" when one key is at fault.
        key, sep, message = str(exc).partition(": ")
        if sep and key in fields:
            errors.append(f"{prefix}{key}: {message}")
        else:
            errors.append(f"{prefix.rstrip('.')}: {exc}")
        return None


def _load_section(
    field: attrs.Attribute[Any], table: object, name: str, ctx: _Context, errors: list[str]
) -> Any:
    """One sub-table; its cross-key check runs only when its keys themselves were valid.

    An absent optional table is None; an absent other one takes its defaults.
    """
    if table is None:
        if field.metadata.get(_OPTIONAL):
            return None
        table = {}
    if not isinstance(table, dict):
        errors.append(f"{name}: expected a table [{name}], got {_show(table)}")
        if field.metadata.get(_OPTIONAL):
            return None
        table = {}
    before = len(errors)
    section = _load_table(
        field.metadata[_SECTION], table, f"{name}.", ctx, errors, field.metadata.get(_KEYS)
    )
    check = field.metadata[_CHECK]
    if check is not None and len(errors) == before:
        errors.extend(f"{name}.{key}: {msg}" for key, msg in check(section))
    if section is None and not field.metadata.get(_OPTIONAL):
        return field.metadata[_SECTION]()  # only reached with errors reported: any value will do
    return section
