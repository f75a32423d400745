"""What the sessions of one configuration share (`ServerContext`, rebuilt by a reload) and the
server's graceful shutdown as sessions see it (`Drain`).
"""

from __future__ import annotations

import ssl

import attrs

from moxy.accounting.events import Emit
from moxy.clientlimits import ClientLimiter
from moxy.config import Config
from moxy.destinations import Destinations, connection_cap
from moxy.lookup.base import Router
from moxy.metrics import Metrics
from moxy.pool import ConnectionPool
from moxy.relay import RelayPolicy
from moxy.stream import Stream
from moxy.tls import TlsContexts
from moxy.upstream import UpstreamSettings


class Drain:
    """Graceful shutdown, as sessions see it: once started, a session waiting for the client's
    next command is told 421 and closed; one busy with a message finishes it first."""

    def __init__(self) -> None:
        self.draining = False
        self.waiting: set[Stream] = set()  # the sessions' client streams

    def start(self) -> None:
        """Interrupt the sessions' waits for a command (and every later one), and STARTTLS
        handshakes in progress: a wait for body bytes is not interruptible, so a message in
        DATA finishes first."""
        self.draining = True
        for stream in self.waiting:
            stream.interrupt()


@attrs.frozen
class ServerContext:
    """What every session started under one configuration shares. A reload (SIGHUP) builds a
    new one for new sessions; a session keeps the one it started with to its end."""

    config: Config
    router: Router
    emit: Emit
    upstream: UpstreamSettings
    drain: Drain = attrs.field(factory=Drain)
    metrics: Metrics = attrs.field(factory=Metrics)
    relay: RelayPolicy = attrs.field(factory=RelayPolicy)
    clients: ClientLimiter | None = None  # per-client limits; outlive reloads
    tls: ssl.SSLContext | None = attrs.field(default=None, eq=False)  # None: no STARTTLS

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        router: Router,
        emit: Emit,
        drain: Drain,
        clients: ClientLimiter | None = None,
        metrics: Metrics | None = None,
        destinations: Destinations | None = None,
        tls: TlsContexts | None = None,
    ) -> ServerContext:
        """Everything that follows from one configuration, for `moxy serve` and each reload.
        `router`, `emit`, `drain`, `clients`, `metrics` and `destinations` are made by the
        server (the router needs its background tasks, the others outlive a reload). Whoever
        runs the context runs `upstream.pool.run` when there is a pool. The certificates are
        read here unless `tls` holds them read already (ConfigError when they cannot be)."""
        if tls is None:
            tls = TlsContexts.read(config)
        pool = None
        if config.limits.idle_upstreams:
            pool = ConnectionPool(config.limits.idle_upstreams, config.timeouts.upstream_idle)
        destinations = destinations or Destinations(config.destinations)
        # Shared across reloads (it counts the connections of every context): the cap follows
        # the configuration in force.
        destinations.connection_cap = connection_cap(
            config.limits.upstream_connections, config.limits.connections
        )
        return cls(
            config=config,
            router=router,
            emit=emit,
            upstream=UpstreamSettings(
                helo_name=config.proxy.helo_name or config.server.hostname,
                timeouts=config.timeouts,
                reply_line=config.limits.reply_line,
                pool=pool,
                metrics=metrics or Metrics(),
                destinations=destinations,
                tls=tls.upstream,
            ),
            drain=drain,
            relay=RelayPolicy.from_settings(config.relay),
            clients=clients,
            metrics=metrics or Metrics(),
            tls=tls.server,
        )
