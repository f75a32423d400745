"""Where events go: [accounting] (the sinks, each table read into that sink's own settings
class), [log] (the message log's file and the log level) and [metrics] (Prometheus).
"""

from __future__ import annotations

from pathlib import Path

import attrs

from moxy.accounting.settings import (
    SINK_NAMES,
    FileSinkSettings,
    GdbmSinkSettings,
    RedisSinkSettings,
    SyslogSinkSettings,
)
from moxy.config._parsing import (
    _COUNT,
    _SECONDS,
    _backend_table,
    _boolean,
    _choice,
    _Context,
    _Invalid,
    _key,
    _names,
    _path,
    _show,
)
from moxy.config.server import ListenAddress

_SINKS_EXAMPLE = '["file", "syslog"]'


_sinks = _names(SINK_NAMES, kind="accounting sink", example=_SINKS_EXAMPLE, empty_ok=True)


@attrs.frozen
class AccountingSettings:
    """[accounting]: where delivery events go (docs/accounting.md). Each sink named in `sinks`
    gets its own queue of `queue` events; its table, `[accounting.<sink>]`, is read into that
    sink's own settings class."""

    sinks: tuple[str, ...] = attrs.field(default=("file",), metadata=_key(_sinks))
    queue: int = attrs.field(default=10_000, metadata=_COUNT)
    # Seconds between hand-overs of the sessions' events to the sinks (sooner per 512 events).
    interval: float = attrs.field(default=0.5, metadata=_SECONDS)
    # The sinks run in an accounting process of their own (moxy.accounting.remote), not in
    # the serving event loop.
    process: bool = attrs.field(default=True, metadata=_key(_boolean))
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
