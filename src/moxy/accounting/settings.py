"""What each accounting sink is told: the values of `[accounting.file]`, `[accounting.syslog]`,
`[accounting.gdbm]` and `[accounting.redis]`, validated when they are made.

Like the route sources' settings (moxy.lookup.settings), they live apart from the sinks so that
reading a configuration imports no client library.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from moxy.lookup.settings import _check_url, _strings, host_port

SINK_NAMES = ("file", "syslog", "gdbm", "redis")
FILE_FORMATS = ("text", "json")
SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
    "authpriv", "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
    "local7",
)


def _check_format(instance: object, attribute: object, value: str) -> None:
    if value not in FILE_FORMATS:
        raise ValueError(f"format: {value!r} is not one of 'text', 'json'")


@attrs.frozen
class FileSinkSettings:
    """[accounting.file]: the message log. Without `path` it is `[log] file` (or standard
    error when that is unset too): the log Moxy has always written. `format` is "text" (one
    `key=value` line per event) or "json" (one JSON object per line)."""

    path: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    format: str = attrs.field(default="text", validator=_check_format)


def _check_facility(instance: object, attribute: object, value: str) -> None:
    if value not in SYSLOG_FACILITIES:
        raise ValueError(f"facility: {value!r} is not a syslog facility such as 'mail'")


def _check_syslog_address(instance: object, attribute: object, value: str) -> None:
    if value.startswith(("udp://", "tcp://")):
        try:
            if host_port(value.partition("://")[2])[1] > 65535:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"address: {value!r}: expected {value.partition('://')[0]}://host:port"
            ) from None
    elif not value.startswith("/"):
        raise ValueError(
            f"address: {value!r} is neither a socket path such as '/dev/log' "
            "nor udp://host:port or tcp://host:port"
        )


@attrs.frozen
class SyslogSinkSettings:
    """[accounting.syslog]: RFC 3164 messages to the local syslog socket, or to a host."""

    address: str = attrs.field(default="/dev/log", validator=_check_syslog_address)
    facility: str = attrs.field(default="mail", validator=_check_facility)
    tag: str = "moxy"


@attrs.frozen
class GdbmSinkSettings:
    """[accounting.gdbm]: the original Moxy's GDBM log of running totals per destination and
    per recipient address; written every `flush_interval` seconds."""

    path: Path = attrs.field(converter=Path)
    flush_interval: float = 5.0


def _check_positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name}: must be at least 1, got {value}")


def _check_not_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name}: must be 0 or more, got {value}")


def _check_redis_url(instance: object, attribute: object, value: str) -> None:
    _check_url(instance, attribute, value)  # type: ignore[arg-type]


def _check_sentinels(
    instance: RedisSinkSettings, attribute: object, value: tuple[str, ...]
) -> None:
    if bool(value) != bool(instance.sentinel_master):
        raise ValueError("sentinels and sentinel_master go together: set both or neither")
    for address in value:
        host_port(address)


@attrs.frozen
class RedisSinkSettings:
    """[accounting.redis]: counters shared by every node of a cluster (key schema in
    docs/accounting.md). `url` takes the same forms as `[routes.redis] url`, and may name the
    same server. Increments are summed in memory and written every `flush_interval` seconds
    (or sooner when `batch_size` distinct counters are pending), `batch_size` per call; while
    Redis is down at most `backlog` distinct counters are kept, and increments beyond that are
    dropped and counted. Day buckets expire after `retention_days`, minute buckets after
    `minute_retention` minutes. With `max_members` (0: no limit), each sorted set keeps only
    that many members, those with the highest scores."""

    url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_check_redis_url)
    key_prefix: str = "moxy:acct:"
    flush_interval: float = 1.0
    batch_size: int = attrs.field(default=1000, validator=_check_positive)
    retention_days: int = attrs.field(default=35, validator=_check_positive)
    minute_retention: int = attrs.field(default=360, validator=_check_positive)
    backlog: int = attrs.field(default=100_000, validator=_check_positive)
    max_members: int = attrs.field(default=0, validator=_check_not_negative)
    timeout: float = 2.0
    sentinel_master: str | None = None
    sentinels: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, validator=_check_sentinels
    )
