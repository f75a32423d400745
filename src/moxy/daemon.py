"""`moxy serve`: logging, signals (SIGTERM/SIGINT stop, SIGHUP reloads, SIGUSR1 reopens the
accounting sinks), privileges and trio.run — in this process, or in `[server] workers`
processes under a master (src/moxy/workers.py). The server itself is `moxy.server.serve`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Final

import trio

from moxy import __version__, control, privileges, workers
from moxy.accounting.remote import accounting_for
from moxy.accounting.sinks import check_sinks
from moxy.config import Config
from moxy.destinations import raise_open_file_limit
from moxy.gil import set_switch_interval
from moxy.logsetup import configure_logging
from moxy.lookup.build import Routing
from moxy.server import serve
from moxy.tls import TlsContexts

logger = logging.getLogger("moxy")


async def _main(
    config: Config,
    tls: TlsContexts,
    routing: Routing,
    sockets: Sequence[socket.socket] | None = None,
    control_socket: socket.socket | None = None,
    master: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain gracefully; a second signal stops at once.
    A worker (`master`: its master's pid) takes both from its master instead, as SIGUSR2.
    SIGHUP reloads the configuration; SIGUSR1 makes the accounting sinks reopen their files
    (after logrotate)."""
    shutdown = trio.Event()
    accounting = accounting_for(config)
    send_reload, reloads = trio.open_memory_channel[None](1)

    async def signals(stop_now: trio.CancelScope) -> None:
        with trio.open_signal_receiver(
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2
        ) as received:
            # SIGHUP, SIGUSR1 and SIGUSR2 were blocked since the start (see run): one sent
            # meanwhile arrives now (Linux keeps a blocked signal pending even while it is
            # ignored).
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
            async for signum in received:
                name = signal.Signals(signum).name
                if signum in _STOPS and master is not None and os.getppid() == master:
                    # A worker stops when its master says so (SIGUSR2, below): a signal sent to
                    # the whole process group (Ctrl-C, systemd's default KillMode) reaches the
                    # worker too, and must not count as a first or second stop beside the
                    # master's word. A worker whose master is gone obeys signals itself.
                    logger.debug("received %s: the master passes it on", name)
                    continue
                if signum in _STOPS or signum == signal.SIGUSR2:
                    if not shutdown.is_set():
                        logger.info("received %s, stopping (again to stop at once)", name)
                        shutdown.set()
                    else:
                        logger.info("received %s again, stopping now", name)
                        stop_now.cancel()
                elif signum == signal.SIGUSR1:
                    logger.info("received SIGUSR1, reopening the accounting sinks")
                    accounting.reopen()
                elif signum == signal.SIGHUP:
                    logger.info("received SIGHUP, reloading %s", config.path)
                    # When a reload is pending already, it reads the newest file anyway.
                    with contextlib.suppress(trio.WouldBlock):
                        send_reload.send_nowait(None)

    async def serving(task_status: trio.TaskStatus[object]) -> None:
        await serve(config, routing=routing, tls=tls, sockets=sockets, shutdown=shutdown,
                    accounting=accounting, control_socket=control_socket, reloads=reloads,
                    task_status=task_status)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(signals, nursery.cancel_scope)
        await nursery.start(serving)
        # Everything made so far (modules, configuration, routes, sinks) lives as long as the
        # process: out of the collector's sight, a full collection walks only what sessions
        # made since. Events waiting for their sink's batch live long enough to reach the
        # oldest generation, and without this each full collection took 20-30 ms.
        gc.freeze()


# Held (ignored and blocked) from the start until the event loop's receiver takes them.
_HELD: Final = {signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
_STOPS: Final = (signal.SIGTERM, signal.SIGINT)


def run(config: Config) -> int:
    """`moxy serve`: serve until SIGTERM/SIGINT, then drain for up to
    `timeouts.shutdown_grace`. Messages still in DATA after that (or at a second signal) are
    aborted upstream (no partial delivery) and their clients, which got no 250, retry.
    SIGHUP reloads the configuration (src/moxy/reload.py).

    A routes or GDBM file that cannot be used raises `RoutesFileError` or `ConfigError`
    before anything listens. Started as root, Moxy binds its listeners, then serves as
    `[server] user` (src/moxy/privileges.py)."""
    configure_logging(config.log.level)
    set_switch_interval(config.server.gil_switch_interval)  # workers inherit it
    raise_open_file_limit(config.limits.upstream_connections, config.limits.connections)
    # Until the event loop takes SIGHUP over, a reload request must neither kill the process
    # nor be lost: blocked, it stays pending (in a worker too, which inherits the mask) until
    # _main's receiver unblocks it. Ignored once that receiver is gone (the very end).
    # SIGUSR1 (logrotate) likewise: a worker still starting must not miss its reopen, nor
    # SIGUSR2, the master's "drain" (workers.py).
    for signum in _HELD:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        switch = privileges.plan(config)
    except privileges.PrivilegeError as exc:
        print(f"moxy: {exc}", file=sys.stderr)
        return 2
    routing = Routing.build(config)
    # Read now, as root if started so: a key only root may read (Let's Encrypt's) works.
    tls = TlsContexts.read(config)
    # A sink that cannot be made, or a log its writer cannot write, stops the start.
    check_sinks(config, None if switch is None else (switch.user, switch.uid, switch.gid))
    if config.server.workers > 1:
        # Checked once here so that a broken routes file stops the start; every worker then
        # builds its own sources after the fork (no connection is shared between processes).
        del routing
        # The master binds the workers' control sockets too: a bad path stops the start, and a
        # restarted worker answers on the same socket.
        controls = _bind_controls(config, switch)
        if controls is None:
            return 1
        try:
            status = workers.supervise(config, tls, functools.partial(_worker, controls), switch)
        finally:
            _unbind_controls(config, controls)
        return _stopped(status)
    if switch is None:
        return _stopped(_serve_here(config, tls, routing))
    # Root binds what needs binding (port 25, the control socket), then Moxy gives root up.
    controls = _bind_controls(config, switch)
    if controls is None:
        return 1
    try:
        try:
            sockets = workers.bind(config)
            privileges.drop(switch)
        except OSError as exc:
            print(f"moxy: {exc.strerror or exc}", file=sys.stderr)
            return 1
        status = _serve_here(config, tls, routing, sockets, controls[0] if controls else None)
    finally:
        _unbind_controls(config, controls)
    return _stopped(status)


def _stopped(status: int) -> int:
    """The last line of a Moxy that served and stopped as asked (the master's, with workers)."""
    if status == 0:
        logger.info("moxy %s stopped", __version__)
    return status


def _bind_controls(
    config: Config, switch: privileges.Switch | None = None
) -> list[socket.socket] | None:
    """The control sockets (one, or one per worker), given to `switch`'s user; None after one
    line when one cannot be bound."""
    paths = control.socket_paths(config)
    owner = None if switch is None else (switch.uid, switch.gid)
    controls: list[socket.socket] = []
    try:
        for path in paths:
            controls.append(control.bind(path, owner))
    except OSError as exc:
        for sock, path in zip(controls, paths, strict=False):
            control.unbind(sock, path)
        print(f"moxy: {exc.strerror or exc}", file=sys.stderr)
        return None
    return controls


def _unbind_controls(config: Config, controls: list[socket.socket]) -> None:
    for sock, path in zip(controls, control.socket_paths(config), strict=True):
        control.unbind(sock, path)


def _serve_here(
    config: Config,
    tls: TlsContexts,
    routing: Routing,
    sockets: Sequence[socket.socket] | None = None,
    control_socket: socket.socket | None = None,
    master: int | None = None,
) -> int:
    status = 0
    # Until the signal task listens, SIGUSR1 and SIGUSR2 stay ignored and blocked as run()
    # left them (setting SIG_IGN again would discard one already pending).
    try:
        trio.run(_main, config, tls, routing, sockets, control_socket, master)
    except* OSError as group:
        for error in group.exceptions:
            print(f"moxy: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        status = 1
    return status


def _worker(
    controls: list[socket.socket], config: Config, tls: TlsContexts,
    sockets: list[socket.socket], number: int,
) -> int:
    control_socket = controls[number] if controls else None
    return _serve_here(config, tls, Routing.build(config), sockets, control_socket,
                       os.getppid())
