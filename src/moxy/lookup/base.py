"""The routing vocabulary shared by every DomainDB source.

A recipient resolves to a `Route`: an ordered tuple of `DestinationGroup`s. Every group receives
the message (mirroring); inside a group the `Destination`s are failover alternatives tried in order.
Sources only map one lookup key to groups; `lookup_keys` fixes the order keys are tried in, the same
for every source (full address, domain, each parent as `.parent`, then `*`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Protocol

import attrs

from moxy.lookup.keys import lookup_keys

DEFAULT_PORT = 25

# The longest route value a networked source hands over (octets: a Redis value, the values of an
# LDAP entry together): a few hundred destinations. A longer one is bad data (451 4.3.0), not
# seconds of parsing: 4.8 MB took 1.5 s.
MAX_VALUE = 65536


class RouteError(Exception):
    """Base class for routing failures; every one maps to a temporary SMTP reply."""


class BadRouteData(RouteError):
    """A source holds a destination value that does not parse (451 4.3.0 for that recipient)."""


class LookupFailed(RouteError):
    """A source could not answer, e.g. its backend is down or slow (451 4.4.3 / 4.3.0)."""


def _check_port(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} out of range 1-65535")


TLS_MODES = ("none", "opportunistic", "required")


# Both are dictionary keys on every message (legs by group, pooled connections by destination):
# their hash is computed once, not from their fields on each lookup.
@attrs.frozen(order=True, cache_hash=True)
class Destination:
    """One upstream SMTP server: a host name or IP literal, and a TCP port; with the options a
    route may give it after `;` (`mx.example.org:25;tls=required;verify;sni=mail.example.org`).

    `tls` and `verify` override `[tls] upstream` and `upstream_verify` when set; `sni` is the
    name sent in the TLS handshake and checked in the certificate (default: the host name);
    `xclient` marks a destination trusted to receive XCLIENT with the client's identity."""

    host: str
    port: int = attrs.field(default=DEFAULT_PORT, validator=_check_port)
    tls: str | None = None
    verify: bool | None = None
    sni: str = ""
    xclient: bool = False
    # str(), made once: each connection to it is named by it (logs, accounting).
    _text: str | None = attrs.field(
        default=None, init=False, eq=False, order=False, hash=False, repr=False
    )

    @property
    def address(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        if self._text is not None:
            return self._text
        options = []
        if self.tls is not None:
            options.append(f"tls={self.tls}")
        if self.verify is not None:
            options.append("verify" if self.verify else "verify=no")
        if self.sni:
            options.append(f"sni={self.sni}")
        if self.xclient:
            options.append("xclient")
        text = ";".join([self.address, *options])
        object.__setattr__(self, "_text", text)
        return text


@attrs.frozen(cache_hash=True)
class DestinationGroup:
    """Failover alternatives (`a|b|c`): the first that accepts the connection and greets wins."""

    alternatives: tuple[Destination, ...] = attrs.field(
        validator=attrs.validators.min_len(1)
    )
    # str(), made once: every message's events name the group (moxy.session_events), and the
    # route cache hands out the same group objects message after message.
    text: str = attrs.field(init=False, eq=False, order=False, hash=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "text", "|".join([str(d) for d in self.alternatives]))

    def __str__(self) -> str:
        return self.text


@attrs.frozen
class Route:
    """Where one recipient goes, and which source and key said so (for logs and `moxy lookup`)."""

    groups: tuple[DestinationGroup, ...] = attrs.field(validator=attrs.validators.min_len(1))
    key: str = ""
    source: str = ""

    def __str__(self) -> str:
        return " ".join(str(g) for g in self.groups)


class RouteSource(Protocol):
    """A DomainDB: answers one lookup key at a time.

    Returns None when the key is absent, raises `LookupFailed` when it cannot answer and
    `BadRouteData` when the stored value is malformed. Must not block the event loop.
    """

    name: str

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None: ...


class Router(Protocol):
    """What a session asks at RCPT: the route for one recipient address, or None (no relay)."""

    async def route(self, recipient: str) -> Route | None: ...


# --- destination syntax -------------------------------------------------------------------

_HOST_RE = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})$")


def parse_destination(text: str) -> Destination:
    """Parse `host`, `host:port`, `[IPv6]` or `[IPv6]:port` (also `[IPv4]`), each optionally
    followed by `;option` items (see `Destination`).

    Host names are lower-cased without a trailing dot and address literals written in canonical
    form, so two spellings of one server compare equal (and share one upstream leg).
    """
    text, *options = text.split(";")
    destination = _parse_address(text)
    if not options:
        return destination
    return _with_options(destination, options)


def _with_options(destination: Destination, options: list[str]) -> Destination:
    values: dict[str, object] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.lower()
        if name in values:
            raise ValueError(f"{option!r}: option {name!r} given twice")
        if name == "tls" and value.lower() in TLS_MODES:
            values["tls"] = value.lower()
        elif name == "verify" and value.lower() in ("", "yes", "no"):
            values["verify"] = value.lower() != "no"
        elif name == "sni" and _HOST_RE.fullmatch(value) and ".." not in value:
            values["sni"] = value.rstrip(".").lower()
        elif name == "xclient" and not sep:
            values["xclient"] = True
        else:
            raise ValueError(
                f"{option!r}: bad destination option (known: tls=none|opportunistic|required, "
                "verify[=no], sni=NAME, xclient)"
            )
    return attrs.evolve(destination, **values)  # type: ignore[arg-type]


def _parse_address(text: str) -> Destination:
    if not text:
        raise ValueError("empty destination")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':port' after ']'")
            port_text = rest[1:]
        try:
            host = str(ipaddress.ip_address(text[1:end]))
        except ValueError:
            raise ValueError(f"{text!r}: bad address literal") from None
    else:
        host, sep, port_text_raw = text.partition(":")
        if sep:
            if ":" in port_text_raw:
                raise ValueError(f"{text!r}: IPv6 addresses must be written as [addr]:port")
            port_text = port_text_raw
        if not _HOST_RE.fullmatch(host) or ".." in host:
            raise ValueError(f"{text!r}: bad host name")
        host = host.rstrip(".").lower()
    port = DEFAULT_PORT
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii():
            raise ValueError(f"{text!r}: bad port {port_text!r}")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} out of range 1-65535")
    return Destination(host, port)


def parse_group(text: str) -> DestinationGroup:
    """Parse `a|b|c` into a group of failover alternatives."""
    return DestinationGroup(tuple(parse_destination(part) for part in text.split("|")))


def parse_destinations(text: str) -> tuple[DestinationGroup, ...]:
    """Parse a whole destination value: whitespace-separated groups (each receives the mail)."""
    words = text.split()
    if not words:
        raise ValueError("no destinations")
    return tuple(parse_group(word) for word in words)


# --- routers (the order of a recipient's keys: moxy.lookup.keys) ------------------------

@attrs.frozen
class SourceRouter:
    """A Router over one source: tries `lookup_keys` in order, first hit wins."""

    source: RouteSource

    async def route(self, recipient: str) -> Route | None:
        for key in lookup_keys(recipient):
            groups = await self.source.lookup(key)
            if groups is not None:
                return Route(groups, key=key, source=self.source.name)
        return None
