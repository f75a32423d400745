"""Listeners and the server's lifetime: one nursery owns every session, a shutdown event
drains them, reload requests start configuration generations.

`serve()` is the async entry point (tests start it with `nursery.start`); `moxy serve` runs it
through src/moxy/daemon.py (logging, signals, workers, privileges).
"""

from __future__ import annotations

import contextlib
import gc
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence

import trio

from moxy import __version__, control, metrics_http, native, workers
from moxy.accept import SessionTasks, accept_loop
from moxy.accounting import events as acct
from moxy.accounting.dispatch import Accounting
from moxy.accounting.remote import RemoteAccounting
from moxy.clientlimits import ClientLimiter
from moxy.config import Config
from moxy.context import Drain, ServerContext
from moxy.destinations import Destinations
from moxy.logsetup import Throttle, plural
from moxy.lookup.base import Router
from moxy.lookup.build import Routing
from moxy.metrics import Metrics
from moxy.metrics import for_config as metrics_for_config
from moxy.pool import ConnectionPool
from moxy.proxy_protocol import ProxyProtocolError, read_header
from moxy.reload import Generation, Shared, next_generation
from moxy.session import Session
from moxy.smtp.replies import Reply
from moxy.stream import Stream, StreamBroken, StreamTimeout
from moxy.tls import TlsContexts

logger = logging.getLogger("moxy")


async def serve(
    config: Config,
    *,
    routing: Routing | None = None,
    router: Router | None = None,
    tls: TlsContexts | None = None,
    sockets: Sequence[socket.socket] | None = None,
    shutdown: trio.Event | None = None,
    accounting: Accounting | RemoteAccounting | None = None,
    control_socket: socket.socket | None = None,
    reloads: trio.abc.ReceiveChannel[None] | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every listen address, report what was bound, and serve until cancelled, or until
    `shutdown` is set and the sessions have drained (see `drain`).

    Recipients are routed by `routing` (built from `config.routes` when neither it nor `router`
    is given), which is kept current while serving and whose backends are closed at the end.
    `tls` holds the certificates read already (by default they are read from their files).
    A `router` is used as it is. With `sockets` (listening sockets made by the master of
    several workers) Moxy accepts on those instead of binding `config.server.listen`, and
    answers on `control_socket` (bound by the master too) instead of binding
    `destinations.control_socket`. Delivery events go to `accounting` (by default the sinks of
    `[accounting]`), which keeps running until the sessions are done and then writes what is
    queued. Each item received from `reloads` reloads the configuration file
    (src/moxy/reload.py).
    """
    accounting = accounting or Accounting.from_config(config)
    metrics = metrics_for_config(config)
    shared = Shared(
        accounting.emit, Drain(), ClientLimiter(config.limits), metrics,
        Destinations(config.destinations, metrics),
    )
    current = Generation.build(config, shared, routing=routing, router=router, tls=tls)
    control_path = config.destinations.control_socket
    own_control = control_socket is None and control_path is not None and sockets is None
    if own_control:
        assert control_path is not None
        control_socket = control.bind(control_path)
    listeners: list[trio.SocketListener] = [
        trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets or ()
    ]
    # Listeners behind a load balancer (PROXY protocol); with `sockets`, known by address.
    proxied: set[trio.SocketListener] = {
        listener for listener in listeners if _is_proxy_address(listener, config)
    }
    addresses = [(a, False) for a in config.server.listen]
    addresses += [(a, True) for a in config.server.listen_proxy]
    for address, behind_proxy in addresses if sockets is None else ():
        try:
            # The backlog of the workers' sockets (workers.listen_on), for one process too.
            new = await trio.open_tcp_listeners(address.port, host=address.host,
                                                backlog=workers.BACKLOG)
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            if own_control:
                assert control_socket is not None and control_path is not None
                control.unbind(control_socket, control_path)
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        listeners += new
        if behind_proxy:
            proxied.update(new)
    try:
        scrapes = await metrics_http.listen(metrics.endpoint)
    except OSError:
        for listener in listeners:
            await listener.aclose()
        raise
    bound: list[tuple[str, int]] = []
    for listener in listeners:
        name = listener.socket.getsockname()
        bound.append((str(name[0]), int(name[1])))
    active = 0
    counting = metrics.registry is not None  # metrics off: no calls to hooks doing nothing
    drained = trio.Event()
    header_waits: set[trio.CancelScope] = set()  # connections waiting for a PROXY header
    refusals = _RefusalLog("per-client limit")
    over_limit = _RefusalLog("connection limit")

    async def handle(stream: trio.SocketStream | Stream, client_ip: str) -> None:
        """One connection: a trio SocketStream from a PROXY listener (the header comes
        first), a Stream from any other."""
        nonlocal active
        generation = current
        ctx = generation.ctx
        hostname = ctx.config.server.hostname
        if counting:
            metrics.connection_accepted()
        if active >= ctx.config.limits.connections:
            over_limit.note(client_ip, f"limits.connections = {ctx.config.limits.connections}")
            reply = Reply.make(421, "4.3.2", f"{hostname} Too many connections; try again later")
            _refused(ctx, client_ip, reply, acct.CONNECTION_LIMIT)
            await _refuse(stream, reply)
            return
        # Counted from here: a connection still owing its PROXY header holds a place too.
        active += 1
        try:
            if not isinstance(stream, Stream):  # behind a load balancer (Stream: no ABC)
                proxy_ip = client_ip
                # A graceful stop cuts the wait for the header short (it held the stop for the
                # whole grace), as it does a session's wait for a command.
                with trio.CancelScope() as waiting:
                    header_waits.add(waiting)
                    if shared.drain.draining:
                        waiting.cancel()
                    try:
                        client_ip = await _proxied_client(stream, client_ip, ctx.config)
                    finally:
                        header_waits.discard(waiting)
                if waiting.cancelled_caught:
                    client_ip = ""
                if not client_ip:
                    await trio.aclose_forcefully(stream)
                    return
                logger.debug("PROXY header from %s: client %s", proxy_ip, client_ip)
                stream = Stream.from_trio(stream)
            reason = shared.clients.admit(client_ip)
            if reason is not None:
                refusals.note(client_ip, reason)
                reply = Reply.make(
                    421, "4.7.0", f"{hostname} Too many connections from your address; "
                    "try again later"
                )
                _refused(ctx, client_ip, reply, reason)
                await _refuse(stream, reply)
                return
            generation.enter()
            if counting:
                metrics.session_started()
            try:
                await Session(stream, client_ip, ctx).run()
            except Exception:
                logger.exception("session from %s failed", client_ip)
            finally:
                if counting:
                    metrics.session_ended()
                generation.leave()
                shared.clients.release(client_ip)
        finally:
            active -= 1
            if active == 0 and shared.drain.draining:
                drained.set()

    accepting = trio.CancelScope()

    async def accept(nursery: trio.Nursery) -> None:
        sessions = SessionTasks(nursery)  # session tasks, reused from one connection to the next
        with accepting:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    acceptors.start_soon(accept_loop, listener, handle, sessions,
                                         listener in proxied)

    async def drain(shutdown: trio.Event, nursery: trio.Nursery) -> None:
        """Graceful shutdown: stop accepting, let sessions finish the message they are busy
        with (those waiting for a command get 421 at once), and stop when none is left or
        `timeouts.shutdown_grace` has passed; legs still inside DATA then are dropped."""
        await shutdown.wait()
        grace = current.config.timeouts.shutdown_grace
        logger.info("shutting down: %d sessions to finish, at most %gs", active, grace)
        accepting.cancel()
        for listener in listeners:
            await listener.aclose()
        shared.drain.start()
        for waiting in list(header_waits):
            waiting.cancel()
        if active == 0:
            drained.set()
        with trio.move_on_after(grace):
            await drained.wait()
        if active:
            logger.warning("shutdown grace of %gs over: stopping %d sessions", grace, active)
        nursery.cancel_scope.cancel()

    async def reload(reloads: trio.abc.ReceiveChannel[None], nursery: trio.Nursery) -> None:
        nonlocal current
        async for _ in reloads:
            if shared.drain.draining:
                continue
            new = await next_generation(current, shared)
            if new is None:
                continue
            try:
                await nursery.start(new.run)
            except Exception as exc:  # a route source that cannot start: keep the old one
                logger.error("reload failed, still serving the previous configuration: "
                             "starting the route sources: %s", exc)
                continue
            old, current = current, new
            old.retire()
            # `moxy serve` froze what its start made (daemon._main), this old configuration
            # included: back in the collector's sight, its cycles are freed once it has ended.
            # (Not frozen again: sessions are running now, and what is frozen is never freed.)
            gc.unfreeze()
            shared.clients.configure(new.config.limits)
            logging.getLogger().setLevel(new.config.log.level.upper())
            logger.info("reloaded %s (configuration %d); %d sessions finish under the "
                        "previous one", new.config.path, new.number, old.sessions)

    # Accounting outlives the sessions' nursery, so the events of the last sessions are
    # written; cancelling it makes it flush its queues (bounded) before it returns.
    async with trio.open_nursery() as outer:
        await outer.start(accounting.run)
        try:
            async with trio.open_nursery() as nursery:
                if metrics.registry is not None:
                    # Also in a worker, which serves no /metrics: its master sums what the
                    # workers count, the sinks' backlog and drops included.
                    nursery.start_soon(_observe, accounting, metrics, shared.destinations,
                                       lambda: current.ctx.upstream.pool)
                    if scrapes:
                        nursery.start_soon(metrics_http.serve, scrapes, metrics.registry)
                await nursery.start(current.run)
                if control_socket is not None:
                    destinations = shared.destinations
                    await nursery.start(control.serve_control, control_socket, destinations)
                nursery.start_soon(accept, nursery)
                if shutdown is not None:
                    nursery.start_soon(drain, shutdown, nursery)
                if reloads is not None:
                    nursery.start_soon(reload, reloads, nursery)
                logger.info("moxy %s listening on %s (%s; configuration %s)", __version__,
                            ", ".join(_fmt(b) for b in bound), native.describe(),
                            config.path)
                if stale := native.stale():
                    logger.warning("compiled modules older than their source, running the old "
                                   "code: %s (make native rebuilds them)", ", ".join(stale))
                task_status.started(bound)
        finally:
            outer.cancel_scope.cancel()
            if own_control:  # a worker's socket belongs to the master
                assert control_socket is not None and control_path is not None
                control.unbind(control_socket, control_path)


async def _observe(accounting: Accounting | RemoteAccounting, metrics: Metrics,
                   destinations: Destinations, pool: Callable[[], ConnectionPool | None]) -> None:
    """For the metrics, once a second: the accounting sinks' backlog and drops, and the
    upstream connections open and idle (in the pool of the configuration in force)."""
    while True:
        metrics.observe_sinks(accounting.stats())
        idle = pool()
        metrics.upstream_connections(destinations.connections, 0 if idle is None else len(idle))
        await trio.sleep(1)


async def _refuse(stream: trio.SocketStream | Stream, reply: Reply) -> None:
    """Send `reply` (within 5 s) and close."""
    if isinstance(stream, Stream):
        with contextlib.suppress(StreamBroken, StreamTimeout):
            await stream.send(reply.to_bytes(), trio.current_time() + 5)
        await stream.aclose()
        return
    with trio.move_on_after(5):
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(reply.to_bytes())
    await trio.aclose_forcefully(stream)


def _refused(ctx: ServerContext, client_ip: str, reply: Reply, reason: str) -> None:
    """A connection refused before its session: a "connection" event and the metric."""
    ctx.metrics.connection_refused(reason)
    ctx.emit(*acct.connection_event(
        client_ip, reply.code, str(reply), reason, ctx.config.server.node
    ))


class _RefusalLog:
    """Connections refused by a limit (`what`), logged at most every 10 s: a flood must not
    flood the log too (each refusal is still an event and a metric)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.throttle = Throttle()

    def note(self, client_ip: str, reason: str) -> None:
        if count := self.throttle.due():
            logger.warning("%s: refused %s (latest from %s: %s)", self.what,
                           plural(count, "connection"), client_ip, reason)


def _is_proxy_address(listener: trio.SocketListener, config: Config) -> bool:
    """Is this socket, bound by a master of workers, one of `listen_proxy`'s? Compared with
    what those addresses resolve to, as the master bound them (a wildcard matched every
    address of both families: a plain `listen` on 127.0.0.1 with `listen_proxy` on `[::]` of
    the same port expected a PROXY header from every client)."""
    host, port = listener.socket.getsockname()[:2]
    for address in config.server.listen_proxy:
        if address.port != port:
            continue
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError:
            continue
        if any(info[4][0] == host for info in infos):
            return True
    return False


async def _proxied_client(stream: trio.SocketStream, peer: str, config: Config) -> str:
    """The client address a load balancer's PROXY header gives; "" when the connection is to be
    refused: not from `proxy_protocol_from`, or no valid header (both logged)."""
    try:
        address = ipaddress.ip_address(peer)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
    except ValueError:
        address = None
    if address is None or not any(address in n for n in config.server.proxy_protocol_from):
        logger.warning("PROXY listener: connection from %s refused (not in "
                       "server.proxy_protocol_from)", peer)
        return ""
    try:
        header = await read_header(stream, config.timeouts.client_command)
    except ProxyProtocolError as exc:
        logger.warning("PROXY listener: connection from %s refused: %s", peer, exc)
        return ""
    return header.source or peer


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
