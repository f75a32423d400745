"""Who may send where: the relay decision at RCPT, besides the routes.

Moxy accepts a recipient when a route source knows it. `[relay]` adds two modes of the
original Moxy: trusted networks, whose clients may send to any domain (recipients without a
route go to the smarthost), and accounting-only, where every recipient goes to one destination
group. Addresses with sender-specified routing (`user%other@routed`, `"user@other"@routed`,
`other!user@routed`) are refused from untrusted clients in every mode, as Postfix does with
`allow_untrusted_routing = no`: they ask the destination to relay onwards.
"""

from __future__ import annotations

import functools
import ipaddress

import attrs

from moxy.config import Network, RelaySettings
from moxy.lookup.base import DestinationGroup, Route

SMARTHOST = "smarthost"  # Route.source of a recipient sent to the smarthost
ACCOUNTING_ONLY = "accounting-only"  # Route.source in accounting-only mode


@functools.lru_cache(maxsize=4096)
def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address, an IPv4-mapped IPv6 address as IPv4; None if not an address.
    Cached: asked for every connection, and parsing an address is not cheap."""
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])  # without an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def sender_routed(recipient: str) -> bool:
    """Whether the local part asks for further relaying: it holds `@`, `%` or `!`."""
    local, at, _ = recipient.rpartition("@")
    if not at:
        return False  # a bare local part (postmaster)
    return "@" in local or "%" in local or "!" in local


@attrs.frozen
class RelayPolicy:
    """`[relay]` as a session uses it."""

    trusted_networks: tuple[Network, ...] = ()
    smarthost: DestinationGroup | None = None
    accounting_only: DestinationGroup | None = None

    @classmethod
    def from_settings(cls, settings: RelaySettings) -> RelayPolicy:
        return cls(settings.trusted_networks, settings.smarthost, settings.accounting_only)

    def trusts(self, ip: str) -> bool:
        if not self.trusted_networks:
            return False
        address = client_address(ip)
        return address is not None and any(address in net for net in self.trusted_networks)

    def fixed_route(self) -> Route | None:
        """Accounting-only mode: the route of every recipient, without asking any source."""
        if self.accounting_only is None:
            return None
        return Route((self.accounting_only,), key="*", source=ACCOUNTING_ONLY)

    def fallback(self, trusted: bool) -> Route | None:
        """Where a recipient without a route goes: the smarthost for trusted clients."""
        if trusted and self.smarthost is not None:
            return Route((self.smarthost,), key="*", source=SMARTHOST)
        return None
