"""The /metrics endpoint that Prometheus scrapes: a trio task in a single Moxy process, or
threads of the master of several workers, which sums the workers' values
(MultiProcessCollector).

Both read a request head the same way (`_request`) and answer GET (and HEAD) /metrics and
nothing else, within the same bounds (REQUEST_LIMIT, REQUEST_TIMEOUT, MAX_SCRAPES); a scrape
never waits for mail traffic nor the other way round (the text is rendered in a thread).
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import shutil
import socket
import threading
import time

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

from moxy import metrics
from moxy.config import ListenAddress

logger = logging.getLogger("moxy.metrics")

REQUEST_LIMIT = 8192  # octets of request head read; a scrape sends a few hundred
REQUEST_TIMEOUT = 10.0  # seconds for a whole request, from its connection to the answer sent
MAX_SCRAPES = 16  # concurrent requests; more are closed at once
# The classic text format, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --- one process: a trio task ---------------------------------------------------------------


async def listen(address: ListenAddress | None) -> list[trio.SocketListener]:
    """The listeners of the /metrics endpoint (none for None); an address that cannot be bound
    raises OSError naming it."""
    if address is None:
        return []
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot listen on metrics address {address}: {exc.strerror}"
        ) from None
    logger.info("metrics on http://%s/metrics", address)
    return listeners


async def serve(listeners: list[trio.SocketListener], registry: CollectorRegistry) -> None:
    """Serve /metrics on `listeners` until cancelled."""
    active = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal active
        try:
            if active >= MAX_SCRAPES:
                return
            active += 1
            try:
                with trio.move_on_after(REQUEST_TIMEOUT):
                    await _answer(stream, registry)
            except Exception:
                # A bug here must not end the server (and with it the mail sessions).
                logger.exception("metrics request failed")
            finally:
                active -= 1
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners)


async def _answer(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    head = b""
    while (request := _request(head)) is None:
        try:
            data = await stream.receive_some(4096)
        except (trio.BrokenResourceError, OSError):
            return
        if not data:
            return
        head += data
    if isinstance(request, str):
        request = await trio.to_thread.run_sync(_scrape, request, registry)
    with contextlib.suppress(trio.BrokenResourceError, OSError):
        await stream.send_all(request)


# --- what both answer -----------------------------------------------------------------------


def _request(head: bytes) -> bytes | str | None:
    """What the request head read so far asks for: None while it is unfinished (and within
    REQUEST_LIMIT), the method of a scrape ("GET" or "HEAD"), or else the response to send."""
    if b"\r\n\r\n" not in head and b"\n\n" not in head:
        return None if len(head) <= REQUEST_LIMIT else _response(431, b"request too large\n")
    method, _, rest = head.split(b"\n", 1)[0].decode("latin-1").strip().partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if path != "/metrics":
        return _response(404, b"not found: try /metrics\n")
    if method not in ("GET", "HEAD"):
        return _response(405, b"method not allowed\n")
    return method


def _scrape(method: str, registry: CollectorRegistry) -> bytes:
    """The response to a scrape (blocking: rendering takes a while with many series)."""
    return _response(200, generate_latest(registry), CONTENT_TYPE, head_only=method == "HEAD")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


def _response(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + (b"" if head_only else body)


# --- several workers: threads of the master -------------------------------------------------


class MasterEndpoint:
    """/metrics of every worker, served by the master, which runs no event loop: a thread
    accepts, and each request gets a thread of its own, at most MAX_SCRAPES at once (more are
    closed at once), each ended by REQUEST_TIMEOUT.

    `start` must run before the workers are forked (they inherit the multiprocess setting) and
    while the master's signals are blocked (the threads inherit that mask, so SIGTERM still
    reaches the master's sigtimedwait)."""

    def __init__(self, directory: str, listeners: list[socket.socket]) -> None:
        self.directory = directory
        self.listeners = listeners
        self.registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self._connections: set[socket.socket] = set()  # being answered
        self._wake, self._waker = socket.socketpair()  # a byte on it stops the accepting
        self._selector = selectors.PollSelector()  # no file descriptor of its own to inherit
        for sock in (*listeners, self._wake):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._accept, name="moxy-metrics", daemon=True)

    @classmethod
    def start(cls, address: ListenAddress, listeners: list[socket.socket]) -> MasterEndpoint:
        """Serve on `listeners` (bound to `address`, listening)."""
        endpoint = cls(metrics.start_multiprocess(), listeners)
        endpoint.thread.start()
        logger.info("metrics of all workers on http://%s/metrics (values kept in %s)",
                    address, endpoint.directory)
        return endpoint

    def _accept(self) -> None:
        while True:
            for key, _ in self._selector.select():
                listener = key.fileobj
                assert isinstance(listener, socket.socket)
                if listener is self._wake:
                    return
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:  # out of file descriptors, say: do not spin
                    logger.warning("metrics: cannot accept: %s", exc)
                    time.sleep(0.1)
                    continue
                if not self._slots.acquire(blocking=False):
                    conn.close()
                    continue
                self._connections.add(conn)
                try:
                    threading.Thread(
                        target=self._handle, args=(conn,), name="moxy-scrape", daemon=True
                    ).start()
                except RuntimeError:  # no thread to be had
                    self._finished(conn)

    def _handle(self, conn: socket.socket) -> None:
        try:
            deadline = time.monotonic() + REQUEST_TIMEOUT
            head = b""
            while (request := _request(head)) is None:
                conn.settimeout(max(deadline - time.monotonic(), 0.001))
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            if isinstance(request, str):
                request = _scrape(request, self.registry)
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.sendall(request)
        except OSError:  # the timeout (TimeoutError) included
            pass
        except Exception:
            logger.exception("metrics request failed")
        finally:
            self._finished(conn)

    def _finished(self, conn: socket.socket) -> None:
        self._connections.discard(conn)
        conn.close()
        self._slots.release()

    def in_worker(self) -> None:
        """In a newly forked worker: let go of the master's sockets (the threads that use
        them stayed in the master)."""
        for sock in (*self.listeners, self._wake, self._waker, *list(self._connections)):
            sock.close()

    def worker_ended(self, pid: int) -> None:
        """A worker is gone: its gauges (open connections, backlogs) stop counting; its
        counters and histograms keep their totals."""
        prometheus_multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._waker.send(b"x")
        self.thread.join(5)
        for conn in list(self._connections):  # their threads end at once
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for sock in (*self.listeners, self._wake, self._waker):
            sock.close()
        self._selector.close()
        shutil.rmtree(self.directory, ignore_errors=True)
