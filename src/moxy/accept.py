"""The accept loops: connections from a listener into sessions' nursery.

A plain listener's socket is read directly (accept until it would block, then one readiness
wait), each connection handed on as a `moxy.stream.Stream`; a PROXY listener's connections go
through trio's listener as SocketStreams, since the header is read through one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio
from outcome import Value

from moxy.logsetup import Throttle
from moxy.stream import Stream

logger = logging.getLogger("moxy")


def _peer_ip(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "unknown"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)



# Accept errors that mean "out of resources for now", as trio.serve_listeners treats them.
_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# Accept errors about that one connection (gone before it was accepted, refused by a
# firewall...): trio.SocketListener.accept ignores the same.
_IGNORED_ERRORS = {
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    ) if hasattr(errno, name)
}
# Connections accepted in a row before the accept loop lets the other tasks run.
ACCEPT_BATCH = 16
# Session tasks kept waiting for the next connection once theirs has ended (SessionTasks).
IDLE_TASKS = 32

Handle = Callable[[trio.SocketStream | Stream, str], Awaitable[None]]


class SessionTasks:
    """Where the accept loops put connections: with a session task whose connection has ended
    and that waits for the next one, else in a new task in `nursery`.

    Starting a task and ending it cost trio about 4 µs (a coroutine, a Task, a copy of the
    context, the nursery's bookkeeping; a bare loop on this project's benchmark machine),
    out of about 130 µs a new connection's message costs; waking a waiting task with the next
    connection is one reschedule. At most `keep` tasks wait (each a suspended coroutine), and
    the nursery's cancellation ends them like any other task in it.
    """

    def __init__(self, nursery: trio.Nursery, keep: int = IDLE_TASKS) -> None:
        self.nursery = nursery
        self.keep = keep
        self.idle: list[trio.lowlevel.Task] = []

    def start_soon(self, handle: Handle, stream: trio.SocketStream | Stream,
                   client_ip: str) -> None:
        if self.idle:
            trio.lowlevel.reschedule(self.idle.pop(), Value((handle, stream, client_ip)))
        else:
            self.nursery.start_soon(self._serve, handle, stream, client_ip)

    async def _serve(self, handle: Handle, stream: trio.SocketStream | Stream | None,
                     client_ip: str) -> None:
        while stream is not None:
            await handle(stream, client_ip)
            stream = None  # ended: its closed socket is not kept while the task waits
            if len(self.idle) >= self.keep:
                return
            task = trio.lowlevel.current_task()
            self.idle.append(task)
            handle, stream, client_ip = await trio.lowlevel.wait_task_rescheduled(
                functools.partial(self._forget, task)
            )

    def _forget(self, task: trio.lowlevel.Task, _: object) -> trio.lowlevel.Abort:
        """A waiting task cancelled (the server is stopping): it ends with Cancelled."""
        self.idle.remove(task)
        return trio.lowlevel.Abort.SUCCEEDED


async def accept_loop(
    listener: trio.SocketListener,
    handle: Handle,
    nursery: trio.Nursery | SessionTasks,
    behind_proxy: bool = False,
) -> None:
    """Accept connections into `nursery` (the sessions' nursery, or the SessionTasks over it),
    so that they outlive this loop when it is stopped.

    A plain listener's connections become a Stream at once, with TCP_NODELAY, and the client's
    address from accept(): no SocketStream made only to be taken apart (src/moxy/stream.py), no
    getpeername(). The listening socket is read directly: accept() until it would block, then
    one wait for readiness; so a burst of connections costs one wake-up, not one each, and an
    accepted socket costs no more system calls than it needs. A PROXY listener's connections
    start as trio SocketStreams (the header is read through one)."""
    sock = getattr(listener.socket, "_sock", None)  # the stdlib socket inside trio's
    # socket.accept() without its wrapper, which reads the listener's family and type as
    # enums for every connection: the accepted socket's are the listener's.
    accept: Callable[[], tuple[int, Any]] | None = getattr(sock, "_accept", None)
    try:
        if behind_proxy or type(sock) is not socket.socket or accept is None:
            await _accept_trio(listener, handle, nursery, behind_proxy)
        else:
            await _accept_plain(sock, accept, handle, nursery)
    except trio.ClosedResourceError:
        # The listener was closed under a loop that was not yet told to stop (a stop at once
        # racing the drain, which closes it): the end of accepting, not an error.
        return


async def _accept_plain(
    sock: socket.socket,
    accept: Callable[[], tuple[int, Any]],
    handle: Handle,
    nursery: trio.Nursery | SessionTasks,
) -> None:
    family, kind, proto = int(sock.family), int(sock.type), sock.proto
    in_row = 0
    while True:
        try:
            fd, address = accept()
            conn = socket.socket(family, kind, proto, fd)
        except BlockingIOError:
            in_row = 0
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            await _accept_failed(exc)
            in_row = 0
            continue
        # Blocking until Stream() makes it non-blocking (one system call, not two); the
        # options are set before that, no I/O is done in between. (No contextlib.suppress:
        # its frames cost more than the try.)
        try:  # noqa: SIM105
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        client_ip = str(address[0]) if isinstance(address, tuple) else str(address)
        nursery.start_soon(handle, Stream(conn), client_ip)
        in_row += 1
        if in_row >= ACCEPT_BATCH:  # a flood must not starve the sessions
            in_row = 0
            await trio.lowlevel.checkpoint()


_PAUSES: Final = Throttle()  # accept's pauses for want of resources, said every 10 s


async def _accept_failed(exc: OSError) -> None:
    """An accept error: ignored when it concerns that one connection, a 100 ms pause when out
    of resources (file descriptors, memory), raised otherwise."""
    if exc.errno in _IGNORED_ERRORS:
        await trio.lowlevel.checkpoint()
        return
    if exc.errno == errno.EBADF:  # as trio.SocketListener.accept says it
        raise trio.ClosedResourceError from None
    if exc.errno not in _RESOURCE_ERRORS:
        raise exc
    if pauses := _PAUSES.due():  # a line per pause was 10 a second
        logger.error("accept: %s; pausing 100 ms (%d pause(s) since this was last said)",
                     exc.strerror, pauses)
    await trio.sleep(0.1)



async def _accept_trio(
    listener: trio.SocketListener,
    handle: Handle,
    nursery: trio.Nursery | SessionTasks,
    behind_proxy: bool,
) -> None:
    """Accept through trio's listener: a PROXY listener, or a trio without the stdlib socket
    where `accept_loop` looks for it."""
    tsock = listener.socket
    while True:
        stream: trio.SocketStream | Stream
        try:
            if behind_proxy:
                proxied = await listener.accept()
                stream, client_ip = proxied, _peer_ip(proxied)
            else:
                conn, address = await tsock.accept()
                sock = socket.socket(conn.family, conn.type, conn.proto, fileno=conn.detach())
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                stream = Stream(sock)
                client_ip = str(address[0]) if isinstance(address, tuple) else str(address)
        except OSError as exc:
            await _accept_failed(exc)
            continue
        nursery.start_soon(handle, stream, client_ip)
