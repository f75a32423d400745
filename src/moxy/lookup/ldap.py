"""LDAP routes (ldap3): one search per lookup key, the destinations in a multi-valued attribute.

The directory is reached through a list of servers (round robin, dead ones skipped) with a few
persistent connections, each used by one worker thread at a time and reopened when the server
went away. The filter is a template; the key's parts are filter-escaped before they go in. The
values found are checked and parsed in the worker thread too: the event loop only gets groups.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import ssl
import threading
from pathlib import Path
from typing import Literal

import ldap3
import trio
from ldap3.core.exceptions import LDAPCommunicationError, LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars

from moxy.lookup.base import (
    MAX_VALUE,
    BadRouteData,
    DestinationGroup,
    LookupFailed,
    parse_destinations,
)
from moxy.lookup.blocking import run_blocking
from moxy.lookup.settings import LdapSettings as LdapSettings  # re-exported with its source

log = logging.getLogger("moxy.lookup")

SCOPES: dict[str, Literal["BASE", "LEVEL", "SUBTREE"]] = {
    "base": ldap3.BASE,
    "one": ldap3.LEVEL,
    "sub": ldap3.SUBTREE,
}

# LDAP result codes this module tells apart (RFC 4511 §4.1.9).
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4
_NO_SUCH_OBJECT = 32

# The shortest connect timeout per server (seconds), however many servers share `timeout`.
_MIN_CONNECT_TIMEOUT = 0.5


def connect_timeout(settings: LdapSettings) -> float:
    """How long one TCP connect may take: an equal share of `timeout` per server (at least
    `_MIN_CONNECT_TIMEOUT`, at most `timeout`), so that a server that drops SYNs leaves time
    for the next one within one lookup."""
    return max(settings.timeout / len(settings.uri), min(settings.timeout, _MIN_CONNECT_TIMEOUT))


def check_ca_file(path: Path) -> None:
    """Raise ValueError ("ca_file: ...") unless `path` is a readable PEM file of certificates.

    ldap3 only checks that the file exists; a file without a certificate would fail every
    connection instead of `check-config`."""
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc.args[-1]))
        raise ValueError(f"ca_file: {path} holds no usable CA certificate: {reason}") from None
    except OSError as exc:
        raise ValueError(f"ca_file: cannot read {path}: {exc.strerror or exc}") from None


def check_filter(template: str) -> None:
    """Raise ValueError ("filter: ...") unless `template` renders to a valid LDAP filter."""
    try:
        rendered = _render_filter(template, "user@example.org")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"filter: {template!r}: bad placeholder {exc} (use {{key}}, {{domain}}, {{local}}; "
            "write a literal brace as {{ or }})"
        ) from None
    try:
        parse_filter(rendered, None, True, True, None, False)  # type: ignore[no-untyped-call]
    except LDAPException as exc:
        raise ValueError(f"filter: {template!r} is not an LDAP filter: {exc}") from None


def _render_filter(template: str, key: str) -> str:
    local, at, domain = key.rpartition("@")
    if not at:
        local, domain = "", key
    return template.format(
        key=escape_filter_chars(key),
        domain=escape_filter_chars(domain),
        local=escape_filter_chars(local),
    )


class LdapSource:
    """A `RouteSource` searching an LDAP directory.

    A key matched by no entry, or by an entry without `attribute`, has no route here. A key
    matched by several entries is ambiguous data (`BadRouteData`), as is a value that does not
    parse. Unreachable servers, refused binds and searches that fail raise `LookupFailed`.

    Up to `connections` (by default the settings' `lookups`) searches run at once, each on its
    own connection in a worker thread. A connection that breaks (e.g. the server restarted) is
    reopened, on the next server of the list, and the search retried once on it. Each
    connection has its own `ldap3.Server` objects (ldap3 keeps per-server state while it
    connects), so threads connect at the same time without sharing anything but the
    round-robin turn.
    """

    def __init__(
        self,
        settings: LdapSettings,
        *,
        name: str = "ldap",
        connections: int | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(
            connections if connections is not None else settings.lookups)
        tls = None
        if settings.ca_file:  # checked even when unused: a typo found now, not when TLS is on
            check_ca_file(settings.ca_file)
        if settings.starttls or any(u.lower().startswith("ldaps:") for u in settings.uri):
            try:
                tls = ldap3.Tls(
                    validate=ssl.CERT_REQUIRED,
                    ca_certs_file=str(settings.ca_file) if settings.ca_file else None,
                )
            except LDAPException as exc:  # e.g. a CA file that does not exist
                raise ValueError(f"ca_file: {exc}") from None
        elif settings.ca_file:  # a CA to check the directory by, and then no TLS to check it
            log.warning(
                "routes.%s: ca_file is set, but without starttls or an ldaps:// URI it is not "
                "used: the directory is asked in clear text%s", name,
                ", the bind password too" if settings.password else "",
            )
        self._tls = tls
        self._connect_timeout = connect_timeout(settings)
        self._make_servers()  # a URI that ldap3 cannot use is a configuration error, found now
        self._idle: list[_Link] = []
        self._all: list[_Link] = []
        # The next server a connection is opened to, round robin over all connections. Held
        # only to take a turn, never while connecting.
        self._turn = 0
        self._turn_lock = threading.Lock()

    def _make_servers(self) -> tuple[ldap3.Server, ...]:
        servers = []
        for uri in self.settings.uri:
            try:
                server = ldap3.Server(
                    uri, connect_timeout=self._connect_timeout, tls=self._tls, get_info=ldap3.NONE
                )
            except LDAPException as exc:  # e.g. a port that is not a number
                raise ValueError(f"uri: {uri!r}: {exc}") from None
            servers.append(server)
        return tuple(servers)

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        return await run_blocking(
            functools.partial(self._search, key),
            limiter=self._limiter,
            timeout=self.settings.timeout,
            what=f"LDAP {', '.join(self.settings.uri)}",
        )

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_all)

    # --- in worker threads --------------------------------------------------------------------

    def _search(self, key: str) -> tuple[DestinationGroup, ...] | None:
        try:  # not "if self._idle": another thread may take the last one in between
            link = self._idle.pop()
        except IndexError:
            link = self._new_link()
        conn = link.conn
        try:
            values = self._search_on(link, key)
        except (LookupFailed, BadRouteData):
            raise
        except LDAPCommunicationError as exc:
            self._shut(conn)
            raise LookupFailed(f"LDAP server unreachable: {exc}") from None
        except LDAPException as exc:
            self._shut(conn)
            raise LookupFailed(f"LDAP error: {exc}") from None
        except Exception as exc:  # ldap3 lets struct, socket and ASN.1 errors escape at times
            self._shut(conn)
            raise LookupFailed(f"LDAP client error: {exc!r}") from exc
        finally:
            self._idle.append(link)  # shut ones are reopened by their next search
        return None if values is None else self._parse(values)

    def _parse(self, values: list[bytes]) -> tuple[DestinationGroup, ...]:
        """The groups of an entry's values, each in routes-file syntax; bad data if they hold
        more than `MAX_VALUE` octets in all (as a Redis value may) or one does not parse."""
        size = sum(len(raw) for raw in values)
        if size > MAX_VALUE:
            raise BadRouteData(
                f"{self.settings.attribute} holds {size} octets in {len(values)} values, more "
                f"than a route may ({MAX_VALUE})"
            )
        groups: list[DestinationGroup] = []
        for raw in values:
            try:
                groups.extend(parse_destinations(raw.decode("utf-8")))
            except (UnicodeDecodeError, ValueError) as exc:
                shown = repr(raw) if len(raw) <= 200 else f"{raw[:200]!r}..."
                raise BadRouteData(f"{self.settings.attribute} value {shown}: {exc}") from None
        return tuple(groups)

    def _search_on(self, link: _Link, key: str) -> list[bytes] | None:
        conn = link.conn
        if conn.closed:
            self._open(link)
            return self._query(conn, key)
        try:
            return self._query(conn, key)
        except LDAPCommunicationError:
            # The server closed this idle connection (restart, idle timeout): once more on a
            # fresh one, which may be another server of the list.
            self._shut(conn)
            self._open(link)
            return self._query(conn, key)

    def _new_link(self) -> _Link:
        s = self.settings
        servers = self._make_servers()
        conn = ldap3.Connection(
            servers[0],
            user=s.bind_dn,
            password=s.password,
            authentication=ldap3.SIMPLE if s.bind_dn else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            read_only=True,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds; the exact deadline is
            # run_blocking's, this only makes an abandoned thread end.
            receive_timeout=max(1, math.ceil(s.timeout)),
            raise_exceptions=False,
            auto_referrals=False,
        )
        link = _Link(conn, servers)
        self._all.append(link)
        return link

    def _next_turn(self) -> int:
        with self._turn_lock:
            turn = self._turn
            self._turn = (turn + 1) % len(self.settings.uri)
        return turn

    def _open(self, link: _Link) -> None:
        """Connect to the next live server of the list, StartTLS if asked, and bind.

        Each server gets `connect_timeout` to accept the TCP connection; one that drops SYNs
        (a crashed host, a firewall) is thus skipped in time for the next. No lock is held: this
        connection's `ldap3.Server` objects are its own."""
        conn = link.conn
        errors = []
        first = self._next_turn()
        count = len(link.servers)
        for i in range(count):
            server = link.servers[(first + i) % count]
            # ldap3 would skip an address for 5 s after a failure; a restarted server is to be
            # used at once, and a walk of the list skips dead ones anyway.
            server.reset_availability()
            conn.server = server
            try:
                conn.open(read_server_info=False)
                break
            except LDAPCommunicationError as exc:
                errors.append(f"{server.name}: {exc}")
                self._shut(conn)
        else:
            raise LDAPCommunicationError("; ".join(errors))
        if self.settings.starttls and not conn.start_tls(read_server_info=False):
            self._shut(conn)
            raise LookupFailed(f"StartTLS with {conn.server.name} failed: {_describe(conn)}")
        if not conn.bind(read_server_info=False):
            what = f"bind as {self.settings.bind_dn}" if self.settings.bind_dn else "anonymous bind"
            detail = _describe(conn)
            self._shut(conn)
            raise LookupFailed(f"{what} at {conn.server.name} failed: {detail}")

    def _query(self, conn: ldap3.Connection, key: str) -> list[bytes] | None:
        s = self.settings
        conn.search(
            s.base,
            _render_filter(s.filter, key),
            search_scope=SCOPES[s.scope],
            attributes=[s.attribute],
            size_limit=2,  # two are enough to know the key is ambiguous
            time_limit=max(1, int(s.timeout)),
        )
        code = conn.result.get("result") if conn.result else None
        entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        if code == _SIZE_LIMIT_EXCEEDED or len(entries) > 1:
            dns = ", ".join(e["dn"] for e in entries)
            raise BadRouteData(f"{key!r} matches several entries ({dns})")
        if code == _NO_SUCH_OBJECT:
            raise LookupFailed(f"search base {s.base!r} does not exist at {conn.server.name}")
        if code != _SUCCESS:
            raise LookupFailed(f"search at {conn.server.name} failed: {_describe(conn)}")
        if not entries:
            return None
        raw = entries[0]["raw_attributes"]
        values: list[bytes] = next(
            (list(v) for name, v in raw.items() if name.lower() == s.attribute.lower()), []
        )
        return values or None

    @staticmethod
    def _shut(conn: ldap3.Connection) -> None:
        with contextlib.suppress(LDAPException, OSError):
            conn.unbind()
        conn.closed = True

    def _close_all(self) -> None:
        for link in self._all:
            self._shut(link.conn)
        self._idle.clear()


class _Link:
    """A persistent connection, and the `ldap3.Server` of each URI that only it connects with."""

    __slots__ = ("conn", "servers")

    def __init__(self, conn: ldap3.Connection, servers: tuple[ldap3.Server, ...]) -> None:
        self.conn = conn
        self.servers = servers


def _describe(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    text = f"{result.get('description', 'error')}"
    if result.get("message"):
        text += f" ({result['message']})"
    return text
