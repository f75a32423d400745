"""Worker processes: `[server] workers = N` runs N trio event loops, one per process.

The master binds the listening sockets, forks the workers, which all accept on them (the kernel
spreads connections among them), restarts a worker that dies, and on SIGTERM/SIGINT passes the
signal on (the workers drain gracefully; a second signal stops them at once) and waits for
every worker to finish. The master itself runs no event loop and holds
no route source: fork and a running trio loop (or a live Redis/LDAP connection) do not mix.
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

from moxy.config import Config

logger = logging.getLogger("moxy.master")

BACKLOG = 1024
RESTART_DELAY = 1.0  # a worker that dies at once must not make the master spin
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def bind(config: Config) -> list[socket.socket]:
    """Listening sockets for every `[server] listen` address, as trio.open_tcp_listeners makes
    them (SO_REUSEADDR; IPv6 sockets are IPv6-only, so `0.0.0.0` and `[::]` can both be used)."""
    sockets: list[socket.socket] = []
    try:
        for address in (*config.server.listen, *config.server.listen_proxy):
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
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def supervise(config: Config, worker: Callable[[list[socket.socket]], int]) -> int:
    """Run `worker(sockets)` in `config.server.workers` child processes until told to stop."""
    try:
        sockets = bind(config)
    except OSError as exc:
        print(f"moxy: {exc.strerror or exc}", file=sys.stderr)
        return 1
    names = ", ".join(_name(s) for s in sockets)
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    children: dict[int, int] = {}  # pid -> worker number

    def spawn(number: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                status = worker(sockets)
            except BaseException:
                logger.exception("worker %d failed", number)
            finally:
                logging.shutdown()
                os._exit(status)
        children[pid] = number

    for slot in range(config.server.workers):
        spawn(slot)
    logger.info("master %d: %d workers listening on %s", os.getpid(), len(children), names)
    stopping = False
    try:
        while children:
            info = signal.sigtimedwait(_SIGNALS, 1.0)
            if info is not None and info.si_signo != signal.SIGCHLD:
                # The first signal makes the workers drain; a second one stops them at once.
                logger.info("received %s, %s workers", signal.Signals(info.si_signo).name,
                            "stopping" if stopping else "draining")
                stopping = True
                for pid in children:
                    _kill(pid, signal.SIGTERM)
            for pid, status in _reap():
                if pid not in children or stopping:
                    children.pop(pid, None)
                    continue
                slot = children.pop(pid)
                logger.error("worker %d (pid %d) ended (%s); starting it again",
                             slot, pid, _describe(status))
                time.sleep(RESTART_DELAY)
                spawn(slot)
    finally:
        for sock in sockets:
            sock.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return 0


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
