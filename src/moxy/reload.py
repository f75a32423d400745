"""Reloading the configuration (SIGHUP) without dropping a session.

Each loaded configuration is a `Generation`: the `ServerContext` new sessions get, and the
route sources and upstream pool built for it, whose background tasks run until the generation
is retired by a newer one and its last session has ended. A session keeps the generation it
started with, so a message in progress finishes under the settings it began with. A new
configuration that does not load leaves the running one in place.
"""

from __future__ import annotations

import logging
import operator
from pathlib import Path

import attrs
import trio

from moxy.accounting.events import Emit
from moxy.clientlimits import ClientLimiter
from moxy.config import Config, ConfigError, load_config
from moxy.context import Drain, ServerContext
from moxy.destinations import Destinations
from moxy.lookup.base import Router
from moxy.lookup.build import NoRouteSource, Routing
from moxy.lookup.file import RoutesFileError
from moxy.metrics import Metrics
from moxy.tls import TlsContexts

logger = logging.getLogger("moxy")

# Settings that a running server cannot take over: they are bound, forked or opened at start,
# or hold state that must outlive a reload (the accounting sinks, the metrics, the dead set).
RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("server", "listen"),
    ("server", "listen_proxy"),
    ("server", "workers"),
    ("server", "gil_switch_interval"),
    ("server", "user"),
    ("server", "group"),
    ("log", "file"),
    ("accounting", None),
    ("metrics", None),
    ("destinations", None),
)


@attrs.frozen
class Shared:
    """What outlives a reload: the event sink, the shutdown state, the per-client counts, the
    metrics and the dead-destination set."""

    emit: Emit
    drain: Drain
    clients: ClientLimiter
    metrics: Metrics = attrs.field(factory=Metrics)
    destinations: Destinations = attrs.field(factory=Destinations)


class Generation:
    """One configuration in service, counted by the sessions that use it."""

    def __init__(self, ctx: ServerContext, routing: Routing | None, number: int = 1) -> None:
        self.ctx = ctx
        self.routing = routing
        self.number = number
        self.sessions = 0
        self._retired = False
        self._done = trio.Event()

    @classmethod
    def build(
        cls,
        config: Config,
        shared: Shared,
        *,
        routing: Routing | None = None,
        router: Router | None = None,
        number: int = 1,
        tls: TlsContexts | None = None,
    ) -> Generation:
        """A generation for `config`; routed by `router` as it is, or by `routing` (built
        from the configuration when neither is given, which reads the local route files);
        with the certificates in `tls`, or read from the configuration's files."""
        if config.relay.accounting_only is not None:
            logger.warning(
                "accounting-only mode: accepting mail for ANY domain and relaying all of it to "
                "%s, which must make the relay decision itself (docs/security.md)",
                config.relay.accounting_only,
            )
        if router is None:
            routing = routing or Routing.build(config)
            router = routing.router if routing.router is not None else NoRouteSource()
        shared.metrics.observe_router(router)
        ctx = ServerContext.build(
            config, router=router, emit=shared.emit, drain=shared.drain, clients=shared.clients,
            metrics=shared.metrics, destinations=shared.destinations, tls=tls,
        )
        return cls(ctx, routing, number)

    @property
    def config(self) -> Config:
        return self.ctx.config

    def enter(self) -> None:
        self.sessions += 1

    def leave(self) -> None:
        self.sessions -= 1
        if self._retired and self.sessions == 0:
            self._done.set()

    def retire(self) -> None:
        """A newer generation serves new sessions; end once the last of ours has ended."""
        self._retired = True
        if self.sessions == 0:
            self._done.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the route cache current and the upstream pool tidy until retired and unused,
        then close the route backends and pooled connections."""
        async with trio.open_nursery() as nursery:
            if self.routing is not None:
                await nursery.start(self.routing.run)
            pool = self.ctx.upstream.pool
            if pool is not None:
                nursery.start_soon(pool.run)
            task_status.started()
            await self._done.wait()
            if self.number > 1 or self._retired:
                logger.info("configuration %d: last session ended, closing its route sources",
                            self.number)
            nursery.cancel_scope.cancel()


def check(path: Path) -> tuple[Config, Routing, TlsContexts]:
    """Load a configuration, build its route sources and read its certificates as `moxy
    check-config` does; raises `ConfigError` or `RoutesFileError`."""
    config = load_config(path)
    tls = TlsContexts.read(config)
    return config, Routing.build(config), tls


def describe(exc: ConfigError | RoutesFileError) -> str:
    """Every problem of a failed load on one line."""
    if isinstance(exc, ConfigError) and exc.path is not None:
        problems = [f"{exc.path}: {error}" for error in exc.errors]
    else:
        problems = list(exc.errors)
    return "; ".join(" ".join(p.splitlines()) for p in problems)


def keep_restart_only(old: Config, new: Config) -> Config:
    """`new` with every RESTART_ONLY setting as `old` has it: the configuration in force after
    a reload, and the one a worker the master starts again from then on gets (a restarted
    worker inherits the listening sockets and the master's metrics endpoint of the start)."""
    for section, key in RESTART_ONLY:
        kept = getattr(old, section)
        if key is not None:
            kept = attrs.evolve(getattr(new, section), **{key: getattr(kept, key)})
        new = attrs.evolve(new, **{section: kept})
    return new


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """The changed settings that a reload does not apply, as "section.key"."""
    changed = []
    for section, key in RESTART_ONLY:
        before, after = getattr(old, section), getattr(new, section)
        if key is None:  # the whole section
            if before != after:
                changed.append(f"[{section}]")
        elif getattr(before, key) != getattr(after, key):
            changed.append(f"{section}.{key}")
    return changed


async def next_generation(current: Generation, shared: Shared) -> Generation | None:
    """Load `current`'s configuration file again and build a generation from it; None, after
    one log line saying why, when it cannot be used."""
    path = current.config.path
    if path is None:
        logger.error("reload: the configuration was not read from a file; nothing to reload")
        return None
    try:
        # Off the event loop: a large routes file takes a while to parse.
        config, routing, tls = await trio.to_thread.run_sync(check, path)
    except (ConfigError, RoutesFileError) as exc:
        logger.error("reload failed, still serving the previous configuration: %s",
                     describe(exc))
        return None
    except Exception as exc:  # a bug must not stop the server that is running fine
        logger.error("reload failed, still serving the previous configuration: %r", exc)
        return None
    changed = restart_only_changes(current.config, config)
    config = keep_restart_only(current.config, config)
    router = None
    if current.routing is None:  # a router given by the caller (tests) stays
        await routing.aclose()
        router = current.ctx.router
    elif (
        routing.router is not None and current.routing.router is not None
        and operator.eq(config.routes, current.config.routes)
    ):
        routing.router.inherit(current.routing.router)
    try:
        generation = Generation.build(config, shared,
                                      routing=None if router is not None else routing,
                                      router=router, number=current.number + 1, tls=tls)
    except Exception as exc:  # the files are read already (check): a bug, never a crash
        logger.error("reload failed, still serving the previous configuration: %r", exc)
        await routing.aclose()
        return None
    for key in changed:
        logger.warning("reload: %s changed; it takes effect at the next restart", key)
    return generation
