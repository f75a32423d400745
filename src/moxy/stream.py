"""The hot path's byte stream, for the client side and the legs alike: where speed lives.

A plain TCP connection is used through its socket directly: a read yields once, tries the
socket, and only when the kernel has nothing waits for readiness under a deadline; a write
goes straight to the socket and waits only when the kernel's buffer is full. trio's
SocketStream adds two checkpoints and a conflict detector per call, and a `move_on_after` per
call costs a cancel scope even when nothing waits. After STARTTLS the stream reads and writes
through a `trio.SSLStream` over the same socket instead.

Timeouts are absolute deadlines (`trio.current_time()` based), so a reply read in several
pieces has one deadline for all of them; `receive_within` and `send_within` take seconds
instead and read the clock only when the call must wait (three Python calls saved on each
call that need not). Errors are `StreamTimeout` and `StreamBroken`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from moxy.schedule import yield_now

_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only (not Final: mypyc)
CANCEL_EVERY: Final = 8  # reads: see receive_within
_LOST: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# Looked up once: `trio.lowlevel.checkpoint_if_cancelled` on every read would be two attribute
# lookups.
_yield: Final = yield_now  # trio's cancel_shielded_checkpoint, cheaper (moxy.schedule)
_if_cancelled: Final = trio.lowlevel.checkpoint_if_cancelled


def recv_fallback(fd: int, size: int) -> bytes | None:
    """Up to `size` bytes from the non-blocking socket `fd` (b"" at its end), None when
    nothing has arrived; OSError for the rest. The native build runs moxy._sockio.recv."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None


def send_fallback(fd: int, data: bytes | bytearray | memoryview) -> int:
    """As much of `data` as the kernel takes now, to the non-blocking socket `fd` (0: none);
    OSError for the rest (EPIPE, not SIGPIPE: Python ignores that signal). The native build
    runs moxy._sockio.send."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


try:  # the native build's (C)
    from moxy._sockio import recv as _recv
    from moxy._sockio import send as _send
except ImportError:  # pure Python
    _recv, _send = recv_fallback, send_fallback


TLS_UNREAD: Final = b"(TLS records not yet read)"  # what Stream.unasked says of them


class StreamTimeout(Exception):
    """The deadline passed (or the wait was interrupted, see `Stream.interrupt`)."""


class StreamBroken(Exception):
    """The connection is gone; the text says how."""


def _detail(exc: BaseException) -> str:
    return str(exc.__cause__ or exc) or type(exc).__name__


async def _connected(sock: socket.socket, timeout: float) -> None:
    """Wait for a connection attempt under way (EINPROGRESS) to end: OSError if it failed."""
    with trio.move_on_after(timeout):
        await trio.lowlevel.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
        return
    raise StreamTimeout


class Stream:
    """One TCP connection, plain or (after `start_tls`) TLS."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.socket = sock
        # The plain reads and writes use the descriptor; -1 once closed (aclose), so that a
        # number the system has given to a new connection since is never written to.
        self.fd = sock.fileno()
        self.ssl: trio.SSLStream[trio.SocketStream] | None = None
        self.interrupted = False  # see interrupt()
        self.writing = False  # a write waits for room: its data is partly sent (say_now)
        self.reads = 0  # plain reads so far (see receive_within)
        self.deadline = 0.0  # see receive_within()
        self._scope: trio.CancelScope | None = None  # an interruptible wait in progress
        self._waiters = 0  # tasks in a readiness wait on the socket (see aclose)

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> Stream:
        """Take the socket over from a trio SocketStream (which is unusable afterwards)."""
        tsock = stream.socket
        sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
        return cls(sock)

    @classmethod
    async def connect(cls, family: int, address: tuple[str, int], timeout: float) -> Stream:
        """A TCP connection to the IP address `address` within `timeout` seconds (else
        StreamTimeout), with TCP_NODELAY. OSError when it cannot be made."""
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # connect_ex: the usual EINPROGRESS as a number, not an exception to make and catch.
            error = sock.connect_ex(address)
            if error == errno.EINPROGRESS:  # writable once the handshake is over
                try:
                    # Over loopback the handshake is already over when connect() returns: then
                    # no deadline, no readiness wait.
                    sock.getpeername()
                except OSError:
                    await _connected(sock, timeout)
            elif error:
                raise OSError(error, os.strerror(error))
            await trio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            trio.lowlevel.notify_closing(sock)
            sock.close()
            raise
        return cls(sock)

    # -- reading and writing -------------------------------------------------------------

    async def receive(self, size: int, deadline: float, interruptible: bool = False) -> bytes:
        """Up to `size` bytes by the absolute `deadline` (the rest of a reply that comes in
        pieces); b"" at the end of the stream. `interruptible`: `interrupt()` ends this wait
        (and every later one) with StreamTimeout."""
        return await self.receive_within(size, deadline - trio.current_time(), interruptible)

    async def receive_within(
        self, size: int, timeout: float, interruptible: bool = False
    ) -> bytes:
        """Up to `size` bytes within `timeout` seconds; b"" at the end of the stream. A read
        yields once first (the peer's answer has often arrived by then, which saves a wait).
        The deadline is only computed when the call must wait: then it is also kept in
        `self.deadline` for the rest of a reply that comes in pieces; otherwise that is 0."""
        if self.ssl is not None:
            self.deadline = deadline = trio.current_time() + timeout
            return await self._receive_tls(size, deadline, interruptible)
        # The yield lets others run; whether this task was cancelled is asked on every
        # CANCEL_EVERY-th read only (and by every wait): a full checkpoint costs about as much
        # again, and a session notices a cancel within that many reads of a busy client.
        self.reads += 1
        await _yield()
        if not self.reads % CANCEL_EVERY:  # trio's checkpoint() is these two, in this order
            await _if_cancelled()
        try:
            data = _recv(self.fd, size)
        except OSError as exc:
            raise StreamBroken(_detail(exc)) from None
        if data is None:  # nothing yet
            self.deadline = deadline = trio.current_time() + timeout
            return await self._receive_waiting(size, deadline, interruptible)
        self.deadline = 0.0
        return data

    async def _receive_waiting(self, size: int, deadline: float, interruptible: bool) -> bytes:
        while True:
            await self._wait(trio.lowlevel.wait_readable, deadline, interruptible)
            try:
                data = _recv(self.fd, size)
            except OSError as exc:
                raise StreamBroken(_detail(exc)) from None
            if data is not None:
                return data

    async def send(self, data: bytes, deadline: float) -> None:
        """All of `data` by the absolute `deadline`, or StreamTimeout/StreamBroken."""
        await self.send_within(data, deadline - trio.current_time())

    async def send_within(self, data: bytes, timeout: float) -> None:
        """All of `data` within `timeout` seconds, or StreamTimeout/StreamBroken; the deadline
        is only computed when the call must wait (the kernel's buffer was full).

        Not a cancellation point unless it waits: every loop of Moxy's reads too, and a read
        is one. A write that must not happen once cancelled (the end-of-data sequence) checks
        first (`Leg.finish`)."""
        if self.ssl is not None:
            return await self._send_tls(data, trio.current_time() + timeout)
        try:
            sent = _send(self.fd, data)
        except OSError as exc:
            raise StreamBroken(_detail(exc)) from None
        if sent < len(data):
            await self._send_rest(memoryview(data)[sent:], trio.current_time() + timeout)

    async def _send_rest(self, view: memoryview, deadline: float) -> None:
        self.writing = True
        try:
            while view:
                await self._wait(trio.lowlevel.wait_writable, deadline, False)
                try:
                    sent = _send(self.fd, view)
                except OSError as exc:
                    raise StreamBroken(_detail(exc)) from None
                view = view[sent:]
        finally:
            self.writing = False

    async def _send_tls(self, data: bytes, deadline: float) -> None:
        assert self.ssl is not None
        with trio.move_on_at(deadline):
            try:
                await self.ssl.send_all(data)
            except _LOST as exc:
                raise StreamBroken(_detail(exc)) from None
            return
        raise StreamTimeout

    async def _wait(
        self, wait: Callable[[socket.socket], Awaitable[None]], deadline: float,
        interruptible: bool,
    ) -> None:
        if interruptible and self.interrupted:
            raise StreamTimeout
        with trio.CancelScope(deadline=deadline) as scope:
            if interruptible:
                self._scope = scope
            self._waiters += 1
            try:
                await wait(self.socket)
            except trio.ClosedResourceError as exc:
                raise StreamBroken(_detail(exc)) from None
            finally:
                self._scope = None
                self._waiters -= 1
        if scope.cancelled_caught:
            raise StreamTimeout

    async def _receive_tls(self, size: int, deadline: float, interruptible: bool) -> bytes:
        assert self.ssl is not None
        if interruptible and self.interrupted:
            raise StreamTimeout
        with trio.CancelScope(deadline=deadline) as scope:
            if interruptible:
                self._scope = scope
            try:
                return bytes(await self.ssl.receive_some(size))
            except _LOST as exc:
                raise StreamBroken(_detail(exc)) from None
            finally:
                self._scope = None
        raise StreamTimeout

    def interrupt(self) -> None:
        """End the interruptible wait in progress, if any, and refuse to start new ones (a
        server shutting down tells sessions waiting for a command so)."""
        self.interrupted = True
        if self._scope is not None:
            self._scope.cancel()

    # -- TLS, options, closing ---------------------------------------------------------------

    async def start_tls(
        self, context: ssl.SSLContext, deadline: float, *, server_side: bool = False,
        server_hostname: str | None = None, interruptible: bool = False,
    ) -> None:
        """Switch to TLS and do the handshake: StreamTimeout (the deadline, or `interrupt`
        when `interruptible`), or StreamBroken with the reason."""
        if interruptible and self.interrupted:
            raise StreamTimeout
        transport = trio.SocketStream(trio.socket.from_stdlib_socket(self.socket))
        self.ssl = trio.SSLStream(
            transport, context, server_side=server_side, server_hostname=server_hostname
        )
        with trio.CancelScope(deadline=deadline) as scope:
            if interruptible:
                self._scope = scope
            try:
                await self.ssl.do_handshake()
            except _LOST as exc:
                raise StreamBroken(_detail(exc)) from None
            finally:
                self._scope = None
            return
        raise StreamTimeout

    def unasked(self, size: int) -> bytes | None:
        """Whatever the peer sent that was not read yet, without waiting: None when nothing
        has come, b"" when it closed; StreamBroken when it reset.

        Over TLS, what the peer sent cannot be decrypted without a read that might wait, so
        it is judged unread: records held by the TLS object, or bytes in the socket, give a
        placeholder (`TLS_UNREAD`). Asked between a reply and the next command (after a 354,
        of an idle connection), that is a peer out of step; its session tickets came long
        before, with the reply to the EHLO after STARTTLS."""
        tls = self.ssl
        if tls is not None:
            # trio's SSLStream keeps its TLS object and incoming buffer private (trio 0.35).
            if tls._ssl_object.pending() or tls._incoming.pending:
                return TLS_UNREAD
            try:
                peeked = self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                raise StreamBroken(_detail(exc)) from None
            return TLS_UNREAD if peeked else b""
        try:
            return _recv(self.fd, size)
        except OSError as exc:
            raise StreamBroken(_detail(exc)) from None

    def say_now(self, data: bytes) -> None:
        """Best effort, never waiting: what the kernel takes of `data` at once, on a plain
        connection with no write half done (a session stopped by the server's shutdown says
        421 this way)."""
        if self.ssl is None and not self.writing:
            with contextlib.suppress(OSError):
                _send(self.fd, data)

    def ack_now(self) -> None:
        """TCP_QUICKACK: ACK what arrived at once rather than after the delayed-ACK timer."""
        if _QUICKACK is not None:
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    async def aclose(self) -> None:
        """Close at once (TLS without close_notify): callers close only to end or abandon."""
        self.fd = -1  # before the number can be the system's to give again
        if self.ssl is not None:
            await trio.aclose_forcefully(self.ssl)
            return
        if self._waiters:  # wake them (ClosedResourceError): they must not wait forever
            trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
