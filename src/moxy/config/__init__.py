"""Moxy's configuration: one TOML file turned into frozen attrs values, validated once at start.

Each section is an attrs class whose fields carry their own parser, so one declaration gives a
key its name, default and check (the sections live in the modules of this package, by job).
The route sources' tables (`[routes.ldap]` and the like) are read straight into the sources' own
settings classes, their parsers chosen by field type. `load_config` walks those declarations,
collects every problem as "section.key: message" and raises them all together as `ConfigError`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs

from moxy.accounting.settings import FileSinkSettings
from moxy.config._load import ConfigError, _load_table
from moxy.config._parsing import Network, _Context, _table
from moxy.config.accounting import (
    AccountingSettings,
    LogSettings,
    MetricsSettings,
    _check_accounting,
)
from moxy.config.proxying import (
    BareNewlines,
    DestinationOverride,
    DestinationSettings,
    Limits,
    ProxySettings,
    RelaySettings,
    Timeouts,
    _check_destinations,
    _check_relay,
)
from moxy.config.routing import _NO_SOURCE, SOURCE_NAMES, RoutesSettings, _check_routes
from moxy.config.server import ListenAddress, ServerSettings, _check_server
from moxy.config.tls import TLS_VERSIONS, UPSTREAM_TLS_MODES, TlsSettings, _check_tls

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SOURCE_NAMES",
    "TLS_VERSIONS",
    "UPSTREAM_TLS_MODES",
    "AccountingSettings",
    "BareNewlines",
    "Config",
    "ConfigError",
    "DestinationOverride",
    "DestinationSettings",
    "Limits",
    "ListenAddress",
    "LogSettings",
    "MetricsSettings",
    "Network",
    "ProxySettings",
    "RelaySettings",
    "RoutesSettings",
    "ServerSettings",
    "Timeouts",
    "TlsSettings",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/moxy/moxy.toml")


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
