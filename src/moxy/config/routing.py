"""[routes]: the chain of route sources and their tables, each read into that source's own
settings class (moxy.lookup.settings), and the checks that the chain and the tables agree.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import attrs

from moxy.config._parsing import (
    _ZERO_OK,
    _backend_table,
    _Context,
    _Invalid,
    _key,
    _path,
    _show,
)
from moxy.lookup.settings import CacheSettings, GdbmSettings, LdapSettings, RedisSettings

SOURCE_NAMES = ("redis", "ldap", "gdbm", "file")
_CHAIN_EXAMPLE = '["redis", "ldap", "gdbm", "file"]'


def _chain(value: object, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f"expected a non-empty array such as {_CHAIN_EXAMPLE}, got {_show(value)}")
    problems: list[str] = []
    chain: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            problems.append(f"expected source names such as 'redis', got {_show(entry)}")
        elif entry.lower() not in SOURCE_NAMES:
            hint = difflib.get_close_matches(entry.lower(), SOURCE_NAMES, n=1)
            suffix = f"did you mean {hint[0]!r}?" if hint else "known: " + ", ".join(SOURCE_NAMES)
            problems.append(f"unknown route source {entry!r} ({suffix})")
        elif entry.lower() in chain:
            problems.append(f"{entry!r} is listed twice")
        else:
            chain.append(entry.lower())
    if problems:
        raise _Invalid(*problems)
    return tuple(chain)


@attrs.frozen
class RoutesSettings:
    """[routes]: the DomainDB sources, asked in `chain` order, with one cache in front.

    Without `chain` the routes file alone is used (the flat-file configuration of Moxy's first
    releases). Each other source is a sub-table read into that backend's own settings class.
    """

    chain: tuple[str, ...] | None = attrs.field(default=None, metadata=_key(_chain))
    file: Path | None = attrs.field(default=None, metadata=_key(_path))
    reload_interval: float = attrs.field(default=1.0, metadata=_key(_ZERO_OK))
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
