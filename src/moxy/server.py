"""Listeners and the server's lifetime: one nursery owns every session, signals stop it.

`serve()` is the async entry point (tests start it with `nursery.start`); `run()` is what
`moxy serve` calls: logging, signals, trio.run — in this process, or in `[server] workers`
processes under a master (src/moxy/workers.py).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from moxy import workers
from moxy.accounting.textlog import TextLog
from moxy.config import Config
from moxy.lookup.base import Router
from moxy.lookup.build import Routing
from moxy.proxy_protocol import ProxyProtocolError, read_header
from moxy.session import ServerContext, Session
from moxy.smtp.replies import Reply
from moxy.tls import UpstreamTls, server_context
from moxy.upstream import ConnectionPool, UpstreamSettings

logger = logging.getLogger("moxy")


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


async def serve(
    config: Config,
    *,
    routing: Routing | None = None,
    router: Router | None = None,
    sockets: Sequence[socket.socket] | None = None,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every listen address, report what was bound, and serve until cancelled, or until
    `shutdown` is set and the sessions have drained (see `drain`).

    Recipients are routed by `routing` (built from `config.routes` when neither it nor `router`
    is given), which is kept current while serving and whose backends are closed at the end.
    A `router` is used as it is. With `sockets` (listening sockets made by the master of
    several workers) Moxy accepts on those instead of binding `config.server.listen`.
    """
    if router is None:
        routing = routing or Routing.build(config)
        router = routing.router
    textlog = TextLog(config.log.file)
    pool = None
    if config.limits.idle_upstreams:
        pool = ConnectionPool(config.limits.idle_upstreams, config.timeouts.upstream_idle)
    ctx = ServerContext(
        config=config,
        router=router,
        emit=textlog.emit,
        upstream=UpstreamSettings(
            helo_name=config.proxy.helo_name or config.server.hostname,
            timeouts=config.timeouts,
            reply_line=config.limits.reply_line,
            pool=pool,
            tls=UpstreamTls.from_config(config),
        ),
        tls=server_context(config),
    )
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
            new = await trio.open_tcp_listeners(address.port, host=address.host)
        except OSError as exc:
            for listener in listeners:
                await listener.aclose()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        listeners += new
        if behind_proxy:
            proxied.update(new)
    bound: list[tuple[str, int]] = []
    for listener in listeners:
        name = listener.socket.getsockname()
        bound.append((str(name[0]), int(name[1])))
    active = 0
    drained = trio.Event()

    async def handle(stream: trio.SocketStream, behind_proxy: bool = False) -> None:
        nonlocal active
        client_ip = _peer_ip(stream)
        if behind_proxy:
            proxy_ip, client_ip = client_ip, await _proxied_client(stream, client_ip, config)
            if not client_ip:
                await trio.aclose_forcefully(stream)
                return
            logger.debug("PROXY header from %s: client %s", proxy_ip, client_ip)
        if active >= config.limits.connections:
            logger.warning("connection limit %d reached; refusing %s",
                           config.limits.connections, client_ip)
            with trio.move_on_after(5):
                try:
                    reply = Reply.make(421, "4.3.2", f"{config.server.hostname} Too many "
                                       "connections; try again later")
                    await stream.send_all(reply.to_bytes())
                except (trio.BrokenResourceError, OSError):
                    pass
            await trio.aclose_forcefully(stream)
            return
        active += 1
        try:
            await Session(stream, client_ip, ctx).run()
        except Exception:
            logger.exception("session from %s failed", client_ip)
        finally:
            active -= 1
            if active == 0 and ctx.drain.draining:
                drained.set()

    accepting = trio.CancelScope()

    async def accept(nursery: trio.Nursery) -> None:
        with accepting:
            async with trio.open_nursery() as acceptors:
                for listener in listeners:
                    handler = functools.partial(handle, behind_proxy=listener in proxied)
                    acceptors.start_soon(_accept_loop, listener, handler, nursery)

    async def drain(shutdown: trio.Event, nursery: trio.Nursery) -> None:
        """Graceful shutdown: stop accepting, let sessions finish the message they are busy
        with (those waiting for a command get 421 at once), and stop when none is left or
        `timeouts.shutdown_grace` has passed; legs still inside DATA then are dropped."""
        await shutdown.wait()
        grace = config.timeouts.shutdown_grace
        logger.info("shutting down: %d sessions to finish, at most %gs", active, grace)
        accepting.cancel()
        for listener in listeners:
            await listener.aclose()
        ctx.drain.start()
        if active == 0:
            drained.set()
        with trio.move_on_after(grace):
            await drained.wait()
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(textlog.run)
        if pool is not None:
            nursery.start_soon(pool.run)
        if routing is not None:
            await nursery.start(routing.run)
        nursery.start_soon(accept, nursery)
        if shutdown is not None:
            nursery.start_soon(drain, shutdown, nursery)
        logger.info("moxy listening on %s", ", ".join(_fmt(b) for b in bound))
        task_status.started(bound)


def _is_proxy_address(listener: trio.SocketListener, config: Config) -> bool:
    host, port = listener.socket.getsockname()[:2]
    return any(
        a.port == port and (a.host == host or a.host in ("0.0.0.0", "::"))
        for a in config.server.listen_proxy
    )


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


# Accept errors that mean "out of resources for now", as trio.serve_listeners treats them.
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


async def _accept_loop(
    listener: trio.SocketListener,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    """Accept connections into `nursery`, so that they outlive this loop when it is stopped."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            logger.error("accept: %s; pausing 100 ms", exc.strerror)
            await trio.sleep(0.1)
            continue
        nursery.start_soon(handle, stream)


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s moxy[%(process)d] %(levelname)s %(name)s: %(message)s",
    )


async def _main(
    config: Config, routing: Routing, sockets: Sequence[socket.socket] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT, then drain gracefully; a second signal stops at once."""
    shutdown = trio.Event()

    async def signals(stop_now: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            async for signum in received:
                name = signal.Signals(signum).name
                if not shutdown.is_set():
                    logger.info("received %s, stopping (again to stop at once)", name)
                    shutdown.set()
                else:
                    logger.info("received %s again, stopping now", name)
                    stop_now.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(signals, nursery.cancel_scope)
        await serve(config, routing=routing, sockets=sockets, shutdown=shutdown)
        nursery.cancel_scope.cancel()


def run(config: Config) -> int:
    """`moxy serve`: serve until SIGTERM/SIGINT, then drain for up to
    `timeouts.shutdown_grace`. Messages still in DATA after that (or at a second signal) are
    aborted upstream (no partial delivery) and their clients, which got no 250, retry.

    A routes or GDBM file that cannot be used raises `RoutesFileError` or `ConfigError`
    before anything listens."""
    configure_logging(config.log.level)
    routing = Routing.build(config)
    if config.server.workers > 1:
        # Checked once here so that a broken routes file stops the start; every worker then
        # builds its own sources after the fork (no connection is shared between processes).
        del routing
        return workers.supervise(config, functools.partial(_worker, config))
    return _serve_here(config, routing)


def _serve_here(
    config: Config, routing: Routing, sockets: Sequence[socket.socket] | None = None
) -> int:
    status = 0
    try:
        trio.run(_main, config, routing, sockets)
    except* OSError as group:
        for error in group.exceptions:
            print(f"moxy: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        status = 1
    return status


def _worker(config: Config, sockets: list[socket.socket]) -> int:
    return _serve_here(config, Routing.build(config), sockets)
