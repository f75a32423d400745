"""What each route source and the route cache are told: the values of `[routes.gdbm]`,
`[routes.ldap]`, `[routes.redis]` and `[routes.cache]`, validated when they are made.

They live apart from the backends so that reading a configuration does not import ldap3 and
redis-py, which would cost every `moxy` command most of a second before it starts.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from pathlib import Path

import attrs
from redis.connection import parse_url

LDAP_SCOPES = ("base", "one", "sub")


def _strings(value: str | Iterable[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


# --- GDBM ------------------------------------------------------------------------------------


@attrs.frozen
class GdbmSettings:
    """[routes.gdbm]: the database file, and how often (seconds) to look for a replaced one."""

    path: Path = attrs.field(converter=Path)
    reload_interval: float = 1.0


# --- LDAP ------------------------------------------------------------------------------------


def _check_uris(instance: LdapSettings, attribute: object, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("uri: at least one LDAP server is needed")
    for uri in value:
        scheme = uri.partition("://")[0].lower()
        if scheme not in ("ldap", "ldaps") or "://" not in uri:
            raise ValueError(f"uri: {uri!r} is not an ldap:// or ldaps:// URI")
        if scheme == "ldaps" and instance.starttls:
            raise ValueError(f"uri: {uri!r} is already TLS; StartTLS needs ldap://")


def _check_scope(instance: LdapSettings, attribute: object, value: str) -> None:
    if value not in LDAP_SCOPES:
        raise ValueError(f"scope: {value!r} is not one of base, one, sub")


def _check_lookups(instance: object, attribute: object, value: int) -> None:
    if value < 1:
        raise ValueError(f"lookups: {value} must be at least 1")


def _check_filter(instance: LdapSettings, attribute: object, value: str) -> None:
    # Only a configuration with LDAP in it gets here, and it needs ldap3 anyway.
    from moxy.lookup.ldap import check_filter

    check_filter(value)


@attrs.frozen
class LdapSettings:
    """[routes.ldap]: where the directory is and how a key becomes a search.

    `filter` may use `{key}` (the lookup key), `{domain}` (after the `@`, or the whole key when
    it has none, like `example.org`, `.example.org` or `*`) and `{local}` (before the `@`, else
    empty); each is escaped per RFC 4515 before substitution. `attribute` holds one destination
    group per value. `timeout` (seconds) bounds a whole lookup, including connecting.
    """

    uri: tuple[str, ...] = attrs.field(converter=_strings, validator=_check_uris)
    base: str
    scope: str = attrs.field(default="sub", validator=_check_scope)
    filter: str = attrs.field(
        default="(&(objectClass=moxyRoute)(moxyRouteKey={key}))", validator=_check_filter
    )
    attribute: str = "moxyDestination"
    bind_dn: str | None = None
    password: str | None = None
    starttls: bool = False
    ca_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    timeout: float = 5.0
    # Searches at once per serving process, each on its own connection in a worker thread.
    lookups: int = attrs.field(default=4, validator=_check_lookups)


# --- Redis -----------------------------------------------------------------------------------


def _check_url(instance: RedisSettings, attribute: object, value: str) -> None:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"url: {value!r} must start with redis://, rediss:// or unix://")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 (parsing it is the check)
        # redis-py ignores a path that is no number (`/l` for `/1`): db 0, another cluster's.
        if parts.scheme != "unix" and not re.fullmatch(r"/?|/[0-9]+", parts.path):
            raise ValueError(f"the path {parts.path!r} is not a database number (/0, /1, ...)")
        # What redis-py will make of it, query options included (`?db=abc`, `?socket_timeout=x`
        # raise ValueError there): found by check-config, not by the first connection.
        parse_url(value)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ValueError(f"url: {value!r}: {exc}") from None


def _check_sentinels(instance: RedisSettings, attribute: object, value: tuple[str, ...]) -> None:
    if bool(value) != bool(instance.sentinel_master):
        raise ValueError("sentinels and sentinel_master go together: set both or neither")
    for address in value:
        host_port(address)


def host_port(address: str) -> tuple[str, int]:
    """A Sentinel's "host:port" (or "[IPv6]:port") split; ValueError if it is neither."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"sentinels: {address!r} is not host:port")
    return host.strip("[]"), int(port)


@attrs.frozen
class RedisSettings:
    """[routes.redis]: where Redis is, how keys are named, and where changes are announced.

    `url` may carry a user and password (`redis://:secret@host:6379/0`) and ask for TLS
    (`rediss://...`). With `sentinel_master` and `sentinels` ("host:port" each) the master is
    found through Sentinel; `url` then only supplies password, database and TLS. `timeout`
    (seconds) bounds each command, connecting included.
    """

    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_check_url)
    key_prefix: str = "moxy:"
    channel: str = "moxy:routes"
    timeout: float = 2.0
    # Lookups at once per serving process, each in a worker thread; more wait their turn.
    lookups: int = attrs.field(default=8, validator=_check_lookups)
    sentinel_master: str | None = None
    sentinels: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, validator=_check_sentinels
    )

    def route_key(self, key: str) -> str:
        """The Redis key holding the destinations of lookup key `key`."""
        return f"{self.key_prefix}route:{key}"


# --- the cache -------------------------------------------------------------------------------


@attrs.frozen
class CacheSettings:
    """[routes.cache]: seconds and a count.

    `ttl` is how long a found route is trusted, `negative_ttl` the same for "no route here" (and
    for a malformed value, so bad data is logged once per `negative_ttl`, not once per recipient).
    After expiry an answer may still be used for `stale_grace` seconds, but only while the chain
    cannot answer. `max_entries` bounds memory: least recently used keys are dropped first.
    """

    ttl: float = 60.0
    negative_ttl: float = 30.0
    stale_grace: float = 300.0
    max_entries: int = 100_000
