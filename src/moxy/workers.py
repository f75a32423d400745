"""Worker processes: `[server] workers = N` runs N trio event loops, one per process.

The master binds the listening sockets (then gives up root, see src/moxy/privileges.py), forks
the workers, which all accept on them (the kernel spreads connections among them), restarts a
worker that dies, and on SIGTERM/SIGINT tells the workers to drain gracefully (SIGUSR2; a
second signal, a second SIGUSR2, stops them at once) and waits for every worker to finish;
SIGUSR1 (logrotate) goes on to every worker too. On SIGHUP it checks the configuration file
and, if it loads, passes SIGHUP on: each worker reloads itself, and a worker started later gets
the new configuration. The master itself runs no event loop and keeps no route source open:
fork and a running trio loop (or a live Redis/LDAP connection) do not mix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from moxy import __version__, privileges, reload
from moxy.config import Config, ConfigError, ListenAddress
from moxy.lookup.file import RoutesFileError
from moxy.metrics_http import MasterEndpoint
from moxy.tls import TlsContexts

logger = logging.getLogger("moxy.master")

BACKLOG = 1024
RESTART_DELAY = 1.0  # a worker that dies at once must not make the master spin
RESTART_DELAY_MAX = 30.0  # the delay doubles while a worker keeps dying young, up to this
STABLE = 10.0  # seconds a worker must have served for its end to count as a fresh failure
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGHUP}


def bind(config: Config) -> list[socket.socket]:
    """Listening sockets for every `[server] listen` address."""
    sockets: list[socket.socket] = []
    try:
        for address in (*config.server.listen, *config.server.listen_proxy):
            try:
                sockets += listen_on(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def listen_on(address: ListenAddress) -> list[socket.socket]:
    """Listening sockets for `address`, as trio.open_tcp_listeners makes them (SO_REUSEADDR;
    IPv6 sockets are IPv6-only, so `0.0.0.0` and `[::]` can both be used)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _metrics_endpoint(config: Config) -> MasterEndpoint | None:
    """/metrics of every worker (`[metrics] listen`), or None."""
    address = config.metrics.listen
    if address is None:
        return None
    try:
        sockets = listen_on(address)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot listen on metrics address {address}: {exc.strerror}"
        ) from None
    return MasterEndpoint.start(address, sockets)


def supervise(
    config: Config,
    tls: TlsContexts,
    worker: Callable[[Config, TlsContexts, list[socket.socket], int], int],
    switch: privileges.Switch | None = None,
) -> int:
    """Run `worker(config, tls, sockets, number)` in `config.server.workers` child processes
    (numbered from 0; a restarted worker keeps its number) until told to stop; with `switch`,
    as that user once the sockets are bound. `tls` holds the certificates read at the start
    (as root: a worker may not be able to read them); after a reload, those it read."""
    try:
        sockets = bind(config)
        if switch is not None:
            privileges.drop(switch)
    except OSError as exc:
        print(f"moxy: {exc.strerror or exc}", file=sys.stderr)
        return 1
    names = ", ".join(_name(s) for s in sockets)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: dict[int, int] = {}  # pid -> worker number
    try:
        # /metrics of every worker; started with the signals blocked (its threads inherit the
        # mask) and before the fork (the workers inherit the multiprocess setting).
        metrics = _metrics_endpoint(config)
    except OSError as exc:
        print(f"moxy: {exc.strerror or exc}", file=sys.stderr)
        for sock in sockets:
            sock.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        return 1

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                # SIGUSR1 and SIGUSR2 stay as daemon.run left them, ignored and blocked, until
                # the worker's loop takes them: one the master sent since the fork is pending,
                # and setting SIG_IGN again here would discard it (POSIX), a drain lost.
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                if metrics is not None:
                    metrics.in_worker()
                status = worker(config, tls, sockets, number)
            except BaseException:
                logger.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = number
        started[number] = time.monotonic()

    # Restarts wait in `due` (slot -> when), not in a sleep: the signals a sleep would merge
    # (two SIGTERMs in it were one, so "again to stop at once" went unheard) are taken
    # meanwhile. A worker that keeps dying young waits twice as long each time.
    started: dict[int, float] = {}
    delays: dict[int, float] = {}
    due: dict[int, float] = {}
    for slot in range(config.server.workers):
        spawn(slot)
    logger.info("moxy %s master %d: %d workers listening on %s (configuration %s)",
                __version__, os.getpid(), len(children), names, config.path)
    stopping = False
    try:
        while children or (due and not stopping):
            now = time.monotonic()
            wait = min([1.0, *(max(when - now, 0.0) for when in due.values())])
            info = signal.sigtimedwait(_SIGNALS, wait)
            if info is not None and info.si_signo == signal.SIGUSR1:
                logger.info("received SIGUSR1, passing it on to the workers")
                for pid in children:
                    _kill(pid, signal.SIGUSR1)
            elif info is not None and info.si_signo == signal.SIGHUP:
                if not stopping:
                    config, tls = _reload(config, tls, children)
            elif info is not None and info.si_signo != signal.SIGCHLD:
                # The first signal makes the workers drain, a second one stops them at once:
                # passed on as SIGUSR2, which only the master sends (a worker ignores the
                # SIGTERM or SIGINT a signal to the whole process group gives it as well).
                logger.info("received %s, %s workers", signal.Signals(info.si_signo).name,
                            "stopping" if stopping else "draining")
                for pid in children:
                    _kill(pid, signal.SIGUSR2)
                stopping = True
            for pid, status in _reap():
                if metrics is not None:
                    metrics.worker_ended(pid)
                if pid not in children or stopping:
                    children.pop(pid, None)
                    continue
                slot = children.pop(pid)
                if time.monotonic() - started.get(slot, 0.0) < STABLE:  # died young again
                    delay = min(delays.get(slot, RESTART_DELAY / 2) * 2, RESTART_DELAY_MAX)
                    delays[slot] = delay
                else:
                    delay = RESTART_DELAY
                    delays[slot] = RESTART_DELAY / 2
                due[slot] = time.monotonic() + delay
                logger.error("worker %d (pid %d) ended (%s); starting it again in %gs",
                             slot, pid, _describe(status), delay)
            if not stopping:
                now = time.monotonic()
                for slot in [s for s, when in due.items() if when <= now]:
                    del due[slot]
                    spawn(slot)
    finally:
        for sock in sockets:
            sock.close()
        if metrics is not None:
            metrics.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0


def _reload(
    config: Config, tls: TlsContexts, children: dict[int, int]
) -> tuple[Config, TlsContexts]:
    """SIGHUP: check the configuration file (and read its certificates); if it loads, pass
    SIGHUP on to every worker (each reloads itself) and return it for the workers started from
    now on."""
    if config.path is None:
        return config, tls
    logger.info("received SIGHUP, checking %s", config.path)
    try:
        new, routing, new_tls = reload.check(config.path)
    except (ConfigError, RoutesFileError) as exc:
        logger.error("reload failed, still serving the previous configuration: %s",
                     reload.describe(exc))
        return config, tls
    except Exception as exc:  # a bug must not take the master down with the workers
        logger.error("reload failed, still serving the previous configuration: %r", exc)
        return config, tls
    del routing  # each worker builds its own
    for pid in children:
        _kill(pid, signal.SIGHUP)
    # Each worker logs what waits for the next restart; one started again from now on gets
    # the new configuration but keeps those settings as they were (reload.RESTART_ONLY).
    return reload.keep_restart_only(config, new), new_tls


def _reap() -> list[tuple[int, int]]:
    ended = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        ended.append((pid, status))
    return ended


def _kill(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
