"""How mail is passed on: [proxy], [limits], [timeouts], [destinations] (dead-destination
memory, per-destination concurrency) and [relay] (trusted networks, smarthost, accounting-only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs

from moxy.config._parsing import (
    _COUNT,
    _SECONDS,
    _ZERO_OK,
    Network,
    _boolean,
    _choice,
    _Context,
    _domain,
    _integer,
    _Invalid,
    _key,
    _networks,
    _path,
    _show,
)
from moxy.lookup.base import Destination, DestinationGroup, parse_destination, parse_group

BareNewlines = Literal["refuse", "normalise"]


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


@attrs.frozen
class ProxySettings:
    """[proxy]: how transactions are relayed to destinations."""

    split_destinations: bool = attrs.field(default=False, metadata=_key(_boolean))
    bare_newlines: BareNewlines = attrs.field(
        default="refuse",
        metadata=_key(_choice("refuse", "normalise", aliases={"normalize": "normalise"})),
    )
    helo_name: str = attrs.field(default="", metadata=_key(_domain(empty_ok=True)))


@attrs.frozen
class Limits:
    """[limits]: sizes in octets (command and reply lines include their CRLF, text lines do
    not) and counts; RFC 5321 §4.5.3.1 minimums."""

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
        default=20, metadata=_key(_integer(0, zero_means="no reuse across client sessions"))
    )
    # Destination connections one client session keeps between its transactions.
    session_legs: int = attrs.field(default=10, metadata=_COUNT)
    # All upstream connections of a process, pooled and in use (moxy.destinations).
    upstream_connections: int = attrs.field(
        default=0, metadata=_key(_integer(1, zero_means="from the open-file limit"))
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
