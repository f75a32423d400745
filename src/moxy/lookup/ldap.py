"""LDAP routes (ldap3): one search per lookup key, the destinations in a multi-valued attribute.

The directory is reached through a pool of servers (round robin, dead ones skipped) with a few
persistent connections, each used by one worker thread at a time and reopened when the server
went away. The filter is a template; the key's parts are filter-escaped before they go in.
"""

from __future__ import annotations

import contextlib
import functools
import math
import ssl
import threading
from typing import Literal

import ldap3
import trio
from ldap3.core.exceptions import LDAPCommunicationError, LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_filter_chars

from moxy.lookup.base import BadRouteData, DestinationGroup, LookupFailed, parse_destinations
from moxy.lookup.blocking import run_blocking
from moxy.lookup.settings import LdapSettings as LdapSettings  # re-exported with its source

SCOPES: dict[str, Literal["BASE", "LEVEL", "SUBTREE"]] = {
    "base": ldap3.BASE,
    "one": ldap3.LEVEL,
    "sub": ldap3.SUBTREE,
}

# LDAP result codes this module tells apart (RFC 4511 §4.1.9).
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4
_NO_SUCH_OBJECT = 32


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

    Up to `connections` searches run at once, each on its own connection in a worker thread. A
    connection that breaks (e.g. the server restarted) is reopened, on the next server of the
    pool, and the search retried once on it.
    """

    def __init__(
        self,
        settings: LdapSettings,
        *,
        name: str = "ldap",
        connections: int = 4,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(connections)
        tls = None
        if settings.starttls or any(u.lower().startswith("ldaps:") for u in settings.uri):
            try:
                tls = ldap3.Tls(
                    validate=ssl.CERT_REQUIRED,
                    ca_certs_file=str(settings.ca_file) if settings.ca_file else None,
                )
            except LDAPException as exc:  # e.g. a CA file that does not exist
                raise ValueError(f"ca_file: {exc}") from None
        servers = []
        for uri in settings.uri:
            try:
                server = ldap3.Server(
                    uri, connect_timeout=settings.timeout, tls=tls, get_info=ldap3.NONE
                )
            except LDAPException as exc:  # e.g. a port that is not a number
                raise ValueError(f"uri: {uri!r}: {exc}") from None
            servers.append(server)
        # Not `active`: ldap3's own availability loop sleeps 10 s once every server failed.
        # `_open` below walks the pool once instead, so a dead server is simply skipped.
        self._pool = ldap3.ServerPool(servers, ldap3.ROUND_ROBIN, active=False)
        self._idle: list[ldap3.Connection] = []
        self._all: list[ldap3.Connection] = []
        # ldap3 keeps per-server state while opening a socket; opens are rare, so take turns.
        self._open_lock = threading.Lock()

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        values = await run_blocking(
            functools.partial(self._search, key),
            limiter=self._limiter,
            timeout=self.settings.timeout,
            what=f"LDAP {', '.join(self.settings.uri)}",
        )
        if values is None:
            return None
        groups: list[DestinationGroup] = []
        for raw in values:
            try:
                groups.extend(parse_destinations(raw.decode("utf-8")))
            except (UnicodeDecodeError, ValueError) as exc:
                raise BadRouteData(f"{self.settings.attribute} value {raw!r}: {exc}") from None
        return tuple(groups)

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._close_all)

    # --- in worker threads --------------------------------------------------------------------

    def _search(self, key: str) -> list[bytes] | None:
        conn = self._idle.pop() if self._idle else self._new_connection()
        try:
            return self._search_on(conn, key)
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
            self._idle.append(conn)  # shut ones are reopened by their next search

    def _search_on(self, conn: ldap3.Connection, key: str) -> list[bytes] | None:
        if conn.closed:
            self._open(conn)
            return self._query(conn, key)
        try:
            return self._query(conn, key)
        except LDAPCommunicationError:
            # The server closed this idle connection (restart, idle timeout): once more on a
            # fresh one, which may be another server of the pool.
            self._shut(conn)
            self._open(conn)
            return self._query(conn, key)

    def _new_connection(self) -> ldap3.Connection:
        s = self.settings
        conn = ldap3.Connection(
            self._pool,
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
        self._all.append(conn)
        return conn

    def _open(self, conn: ldap3.Connection) -> None:
        """Connect to the next live server of the pool, StartTLS if asked, and bind."""
        errors = []
        for _ in self.settings.uri:
            try:
                with self._open_lock:
                    # ldap3 would skip an address for 5 s after a failure; a restarted server
                    # is to be used at once, and a walk of the pool skips dead ones anyway.
                    for server in self._pool.servers:
                        server.reset_availability()
                    conn.open(read_server_info=False)
                break
            except LDAPCommunicationError as exc:
                errors.append(f"{conn.server.name}: {exc}")
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
        for conn in self._all:
            self._shut(conn)
        self._idle.clear()


def _describe(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    text = f"{result.get('description', 'error')}"
    if result.get("message"):
        text += f" ({result['message']})"
    return text
