"""[routes]: the chain of route sources and their tables, each read into that source's own
settings class (moxy.lookup.settings), and the checks that the chain and the tables agree.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from moxy.config._parsing import (
    _COUNT,
    _ZERO_OK,
    _backend_table,
    _key,
    _names,
    _path,
)
from moxy.lookup.settings import CacheSettings, GdbmSettings, LdapSettings, RedisSettings

SOURCE_NAMES = ("redis", "ldap", "gdbm", "file")
_CHAIN_EXAMPLE = '["redis", "ldap", "gdbm", "file"]'


_chain = _names(SOURCE_NAMES, kind="route source", example=_CHAIN_EXAMPLE, empty_ok=False)


@attrs.frozen
class RoutesSettings:
    """[routes]: the DomainDB sources, asked in `chain` order, with one cache in front.

    Without `chain` the routes file alone is used (the flat-file configuration of Moxy's first
    releases). Each other source is a sub-table read into that backend's own settings class.
    """

    chain: tuple[str, ...] | None = attrs.field(default=None, metadata=_key(_chain))
    file: Path | None = attrs.field(default=None, metadata=_key(_path))
    reload_interval: float = attrs.field(default=1.0, metadata=_key(_ZERO_OK))
    # A route naming more is bad route data (451): one RCPT must not open unbounded connections.
    max_groups: int = attrs.field(default=10, metadata=_COUNT)
    max_alternatives: int = attrs.field(default=10, metadata=_COUNT)
    gdbm: GdbmSettings | None = attrs.field(
        default=None, metadata=_backend_table(GdbmSettings, reload_interval=_ZERO_OK)
    )
    ldap: LdapSettings | None = attrs.field(default=None, metadata=_backend_table(LdapSettings))
    redis: RedisSettings | None = attrs.field(
        default=None, metadata=_backend_table(RedisSettings)
    )
    cache: CacheSettings = attrs.field(
        factory=CacheSettings,
        metadata=_backend_table(
            CacheSettings,
            optional=False,
            ttl=_ZERO_OK,
            negative_ttl=_ZERO_OK,
            stale_grace=_ZERO_OK,
        ),
    )

    @property
    def sources(self) -> tuple[str, ...]:
        """The source names in the order they are asked (none in accounting-only mode
        without a routes file)."""
        if self.chain is not None:
            return self.chain
        return ("file",) if self.file is not None else ()


_TABLES = ("gdbm", "ldap", "redis")  # the sources configured by a sub-table


_NO_SOURCE = "required: without a route source Moxy would refuse all mail"


def _check_routes(routes: RoutesSettings) -> list[tuple[str, str]]:
    tables = [name for name in _TABLES if getattr(routes, name) is not None]
    if routes.chain is None:
        if tables:
            return [("chain", f"required with a [routes.{tables[0]}] table: the sources in the "
                              f"order to ask them, e.g. {_CHAIN_EXAMPLE}")]
        if routes.file is None:
            return [("file", _NO_SOURCE)]
        return []
    problems: list[tuple[str, str]] = []
    for name in routes.chain:
        if name == "file" and routes.file is None:
            problems.append(("chain", "'file' needs routes.file (the routes file)"))
        elif name != "file" and getattr(routes, name) is None:
            problems.append(("chain", f"{name!r} needs a [routes.{name}] table"))
    if routes.file is not None and "file" not in routes.chain:
        problems.append(("file", "set, but 'file' is not in routes.chain"))
    problems.extend(
        (name, f"configured, but {name!r} is not in routes.chain")
        for name in tables
        if name not in routes.chain
    )
    return problems
