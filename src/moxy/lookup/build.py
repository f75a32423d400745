"""The router of `moxy serve` and `moxy lookup`, built from `[routes]`: the configured sources in
chain order behind one `CachedRouter`, and the tasks that keep that cache current while Moxy runs
(a watch on each routes or GDBM file, and the Redis change listener).

The LDAP and Redis modules are imported only for a chain that has them: their client libraries
take most of a second to import, which every `moxy` command would pay.
"""

from __future__ import annotations

import dbm.gnu
import functools
import logging
from pathlib import Path
from typing import NoReturn, TypeVar

import trio

from moxy.config import Config, ConfigError
from moxy.lookup.base import LookupFailed, Route, RouteSource
from moxy.lookup.cache import CachedRouter
from moxy.lookup.file import FileSource
from moxy.lookup.gdbm import DamagedFile, GdbmSource, check_db, reason
from moxy.lookup.settings import RedisSettings

log = logging.getLogger("moxy.lookup")

# `reload_interval = 0` means "at every lookup"; the task that watches a file still pauses.
_MIN_WATCH_INTERVAL = 0.1
_CLOSE_TIMEOUT = 2.0

T = TypeVar("T")


class Routing:
    """The sources of `[routes] chain`, in order, and the cache in front of them (`router`);
    `changes` is the Redis whose route change announcements the cache follows, if any.

    `router` is None for a configuration without route sources: accounting-only mode
    (`[relay] accounting_only`) with no `[routes]`, where the session never asks a router."""

    def __init__(self, router: CachedRouter | None, changes: RedisSettings | None = None) -> None:
        self.router = router
        self.changes = changes

    @property
    def sources(self) -> tuple[RouteSource, ...]:
        return self.router.sources if self.router is not None else ()

    @classmethod
    def build(cls, config: Config) -> Routing:
        """Make every source of the chain, without network I/O.

        The routes file is loaded and the GDBM file opened once here, so that a broken one stops
        `moxy serve` and `moxy check-config` before anything listens. Redis and LDAP are only
        contacted by lookups: a node must start while they are down. Raises `RoutesFileError`
        for a bad routes file, `ConfigError` naming the key for an unusable GDBM or CA file.
        """
        sources = [_make_source(name, config) for name in config.routes.sources]
        if not sources:  # accounting-only mode without [routes] (load_config allows no other)
            return cls(None)
        routes = config.routes
        router = CachedRouter(sources, routes.cache,
                              max_size=(routes.max_groups, routes.max_alternatives))
        for source in sources:
            if isinstance(source, FileSource | GdbmSource):
                source.on_change = router.clear  # any key may have changed
        return cls(router, config.routes.redis if "redis" in config.routes.sources else None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the cache current until cancelled, then close the backends.

        Each routes or GDBM file is looked at every `reload_interval` seconds, since lookups
        that the cache answers never reach it; a new version clears the cache. With Redis in the
        chain, every announced change drops its key; reports started once the listener has
        subscribed, or tried to (Redis may be down).
        """
        try:
            async with trio.open_nursery() as nursery:
                for source in self.sources:
                    if isinstance(source, FileSource | GdbmSource):
                        nursery.start_soon(_watch, source)
                if self.changes is not None:
                    from moxy.lookup.redis import listen_for_changes

                    assert self.router is not None  # a chain with Redis in it
                    await nursery.start(
                        functools.partial(
                            listen_for_changes,
                            self.changes,
                            self.router.invalidate,
                            self.router.clear,
                        )
                    )
                task_status.started()
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Close the backends' connections and file handles; bounded, and safe when cancelled."""
        with trio.move_on_after(_CLOSE_TIMEOUT) as scope:
            scope.shield = True
            for source in self.sources:
                aclose = getattr(source, "aclose", None)
                if aclose is None:
                    continue
                try:
                    await aclose()
                except Exception:
                    log.exception("closing route source %s failed", source.name)


class NoRouteSource:
    """The router of a configuration without route sources (accounting-only mode without
    `[routes]`): the session sends every recipient to `relay.accounting_only` and never asks
    it; asked all the same, it cannot answer (451 4.4.3), it never refuses mail."""

    async def route(self, recipient: str) -> Route | None:
        raise LookupFailed("no route source: [routes] is not configured")


def _make_source(name: str, config: Config) -> RouteSource:
    routes = config.routes
    if name == "file":
        return FileSource.open(_configured(routes.file, name), routes.reload_interval)
    if name == "gdbm":
        settings = _configured(routes.gdbm, name)
        _check_gdbm(settings.path, config)
        return GdbmSource(settings.path, reload_interval=settings.reload_interval)
    if name == "ldap":
        from moxy.lookup.ldap import LdapSource

        try:
            return LdapSource(_configured(routes.ldap, name))
        except ValueError as exc:  # "ca_file: ..." or "uri: ..."
            raise ConfigError([f"routes.ldap.{exc}"], config.path) from None
    if name == "redis":
        from moxy.lookup.redis import RedisSource

        return RedisSource(_configured(routes.redis, name))
    raise ValueError(f"unknown route source {name!r}")


def _configured(value: T | None, name: str) -> T:
    if value is None:  # load_config refuses such a chain
        raise ValueError(f"route source {name!r} is in the chain but not configured")
    return value


def _check_gdbm(path: Path, config: Config) -> None:
    try:
        check_db(path)
    except (dbm.gnu.error, OSError, DamagedFile) as exc:
        raise ConfigError(
            [f"routes.gdbm.path: cannot open {path}: {reason(exc)} (build it with `moxy "
             "makedb`)"],
            config.path,
        ) from None


async def _watch(source: FileSource | GdbmSource) -> NoReturn:
    while True:
        await source.check()
        await trio.sleep(max(source.reload_interval, _MIN_WATCH_INTERVAL))
