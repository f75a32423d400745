"""[server]: the listen addresses (`ListenAddress`, also used by [metrics]), the name Moxy
gives itself, and the user and group it drops to.
"""

from __future__ import annotations

import functools
import grp
import ipaddress
import pwd
import re
import socket

import attrs

from moxy.config._parsing import (
    _COUNT,
    _DOMAIN_RE,
    _SECONDS,
    Network,
    _Context,
    _domain,
    _Invalid,
    _key,
    _networks,
    _show,
    _text,
)

_NODE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _node(value: object, ctx: _Context) -> str:
    """A node name goes into log fields and Redis members: no spaces, no separators."""
    if not isinstance(value, str) or not _NODE_RE.fullmatch(value):
        raise _Invalid(f"expected a name of 1 to 64 letters, digits, '.', '_' or '-', "
                       f"got {_show(value)}")
    return value


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


_fqdn = functools.cache(socket.getfqdn)


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
    # sys.setswitchinterval of the serving and accounting processes (moxy/gil.py).
    gil_switch_interval: float = attrs.field(default=1e-4, metadata=_SECONDS)
    # Which Moxy of a cluster saw an event (accounting); by default the host name as `hostname`
    # prints it (socket.gethostname(), fully qualified on a host whose name is set so).
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
