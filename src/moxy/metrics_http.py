"""The /metrics endpoint that Prometheus scrapes: a trio task in a single Moxy process, or a
thread of the master of several workers, which sums the workers' values (MultiProcessCollector).

Both answer GET (and HEAD) /metrics and nothing else; a scrape never waits for mail traffic nor
the other way round (the text is rendered in a worker thread).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from wsgiref.simple_server import WSGIServer

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import start_http_server

from moxy import metrics
from moxy.config import ListenAddress

logger = logging.getLogger("moxy.metrics")

REQUEST_LIMIT = 8192  # octets of request head read; a scrape sends a few hundred
REQUEST_TIMEOUT = 10.0
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
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        if len(head) > REQUEST_LIMIT:
            await stream.send_all(_response(431, b"request too large\n"))
            return
        try:
            data = await stream.receive_some(4096)
        except (trio.BrokenResourceError, OSError):
            return
        if not data:
            return
        head += data
    method, _, rest = head.split(b"\n", 1)[0].decode("latin-1").strip().partition(" ")
    path = rest.split(" ", 1)[0].split("?", 1)[0]
    if path != "/metrics":
        response = _response(404, b"not found: try /metrics\n")
    elif method not in ("GET", "HEAD"):
        response = _response(405, b"method not allowed\n")
    else:
        body = await trio.to_thread.run_sync(generate_latest, registry)
        response = _response(200, body, CONTENT_TYPE, head_only=method == "HEAD")
    with contextlib.suppress(trio.BrokenResourceError, OSError):
        await stream.send_all(response)


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


# --- several workers: a thread of the master ------------------------------------------------


class MasterEndpoint:
    """/metrics of every worker, served by the master, which runs no event loop.

    `start` must run before the workers are forked (they inherit the multiprocess setting) and
    while the master's signals are blocked (the server's threads inherit that mask, so SIGTERM
    still reaches the master's sigtimedwait)."""

    def __init__(self, directory: str, server: WSGIServer, thread: threading.Thread) -> None:
        self.directory = directory
        self.server = server
        self.thread = thread

    @classmethod
    def start(cls, address: ListenAddress) -> MasterEndpoint:
        directory = metrics.start_multiprocess()
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        try:
            server, thread = start_http_server(address.port, address.host, registry)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise OSError(
                exc.errno, f"cannot listen on metrics address {address}: {exc.strerror}"
            ) from None
        logger.info("metrics of all workers on http://%s/metrics (values kept in %s)",
                    address, directory)
        return cls(directory, server, thread)

    def in_worker(self) -> None:
        """In a newly forked worker: let go of the master's listening socket."""
        self.server.socket.close()

    def worker_ended(self, pid: int) -> None:
        """A worker is gone: its gauges (open connections, backlogs) stop counting; its
        counters and histograms keep their totals."""
        prometheus_multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        shutil.rmtree(self.directory, ignore_errors=True)
