"""The control socket (`[destinations] control_socket`): a unix socket on which a running server
answers `moxy destinations list|clear [ADDRESS]` about its dead-destination set.

One request line (`list`, `clear` or `clear ADDRESS`) in, JSON lines out, then the server
closes. With `[server] workers`, each worker has its own state and its own socket, the path
with `.N` appended (N = 0 … workers-1).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from moxy.config import Config
from moxy.destinations import Destinations
from moxy.lookup.base import parse_destination
from moxy.privileges import current_user

logger = logging.getLogger("moxy.control")

MAX_REQUEST = 1024
BACKLOG = 128  # connections waiting to be accepted (moxy destinations, scripts)
MAX_PATH = 107  # bytes of a unix socket path: Linux's sun_path holds 108, the last one a NUL
TIMEOUT = 5.0


class ControlError(Exception):
    """The running server cannot be asked (no socket configured, not running, bad answer)."""


def socket_paths(config: Config) -> list[Path]:
    """Where the server of `config` listens: one path, or one per worker."""
    path = config.destinations.control_socket
    if path is None:
        return []
    if config.server.workers == 1:
        return [path]
    return [path.with_name(f"{path.name}.{n}") for n in range(config.server.workers)]


def check_paths(config: Config) -> list[str]:
    """What would stop `bind` at the start, one line each, without binding (`moxy
    check-config`): a directory that is missing or that this process cannot create the socket
    in (serve binds it as the user that starts it, root before a switch), a path too long."""
    paths = socket_paths(config)
    errors: list[str] = []
    if paths and len(os.fsencode(paths[-1])) > MAX_PATH:  # the last is the longest
        errors.append(f"destinations.control_socket: {paths[-1]} is longer than the "
                      f"{MAX_PATH} bytes of a unix socket path")
    directory = paths[0].parent if paths else None  # every worker's socket is in one directory
    if directory is not None and not directory.is_dir():
        errors.append(f"destinations.control_socket: directory {directory} does not exist")
    elif directory is not None and not os.access(directory, os.W_OK | os.X_OK):
        errors.append(f"destinations.control_socket: directory {directory} is not writable by "
                      f"user {current_user()}, who binds the socket")
    return errors


def answer(destinations: Destinations, request: str) -> list[dict[str, object]]:
    """The JSON objects that answer one request line."""
    verb, _, argument = request.strip().partition(" ")
    argument = argument.strip()
    if verb == "list" and not argument:
        return [entry.to_json() for entry in destinations.down()]
    if verb == "clear":
        try:
            address = parse_destination(argument) if argument else None
        except ValueError as exc:
            return [{"error": str(exc)}]
        return [{"cleared": destinations.clear(address)}]
    return [{"error": f"unknown request {request.strip()[:60]!r} (list, clear [ADDRESS])"}]


def bind(path: Path, owner: tuple[int, int] | None = None) -> socket.socket:
    """A listening unix socket at `path`, mode 0600, given to `owner` (uid, gid: the user
    root switches to, who runs `moxy destinations`). A stale socket file there (left by a
    server that did not stop cleanly) is replaced; one a running server answers on is not: a
    second `moxy serve` of the same configuration, failing, removed the running one's socket."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            if _answers(path):
                raise OSError(errno.EADDRINUSE, f"cannot listen on control socket {path}: a "
                              "running Moxy answers on it")
            path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)  # before listen(): nobody else can connect in between
        if owner is not None:
            os.chown(path, *owner)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on control socket {path}: "
                      f"{exc.strerror or exc}") from None
    return sock


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False  # nobody listens: stale
        except OSError:
            return True  # there, but busy (EAGAIN: its queue is full) or not ours to judge
    return True


def unbind(sock: socket.socket, path: Path) -> None:
    sock.close()
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. a directory only root may write, after the switch of user
        logger.warning("cannot remove the control socket %s: %s", path, exc.strerror or exc)


async def serve_control(
    sock: socket.socket,
    destinations: Destinations,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on the listening `sock` until cancelled (its owner closes it)."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_handle, stream, destinations)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()


async def _handle(stream: trio.SocketStream, destinations: Destinations) -> None:
    with trio.move_on_after(TIMEOUT):
        try:
            request = b""
            while b"\n" not in request and len(request) < MAX_REQUEST:
                data = await stream.receive_some(MAX_REQUEST)
                if not data:
                    break
                request += data
            text = request.split(b"\n", 1)[0].decode("utf-8", "replace")
            lines = answer(destinations, text)
            await stream.send_all(b"".join(json.dumps(o).encode() + b"\n" for o in lines))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug here must not take the server down with it
            logger.exception("control request failed")
    await trio.aclose_forcefully(stream)


# -- the client side (`moxy destinations`) ---------------------------------------------------


def _connect(sock: socket.socket, path: Path) -> None:
    """Connect, waiting up to TIMEOUT for room in the server's queue: a unix socket with a
    timeout fails at once when the queue is full (EAGAIN), and many clients asking at once
    failed (453 of 800)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def ask(path: Path, request: str) -> list[dict[str, object]]:
    """Send one request to the server listening on `path`; raises ControlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            _connect(sock, path)
            sock.sendall(request.encode() + b"\n")
            data = b"".join(_receive(sock))
    except OSError as exc:
        # No socket file, or nobody listening on it: a server stopped (or not started yet).
        hint = (" (is Moxy running?)"
                if isinstance(exc, FileNotFoundError | ConnectionRefusedError) else "")
        raise ControlError(f"cannot ask the server at {path}: "
                           f"{exc.strerror or exc}{hint}") from None
    try:
        objects = [json.loads(line) for line in data.splitlines() if line.strip()]
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        raise ControlError(f"unexpected answer from {path}") from None
    if not all(isinstance(o, dict) for o in objects):
        raise ControlError(f"unexpected answer from {path}")
    return objects


def describe(answer: dict[str, object]) -> list[str]:
    """Lines for people: one per address down, or per address cleared. Raises ControlError for
    an answer of another shape (a server of another version)."""
    try:
        return _describe(answer)
    except (KeyError, TypeError, ValueError, OverflowError):  # Overflow: "since": 1e300
        raise ControlError(f"unexpected answer from the server: {_shown(answer)}") from None


def _shown(answer: dict[str, object]) -> str:
    """The start of an answer, for a message: repr() of a nested one can itself fail."""
    try:
        return f"{answer!r:.200}"
    except (RecursionError, ValueError):  # ValueError: an int of more digits than str() makes
        return "(not printable)"


def _describe(answer: dict[str, object]) -> list[str]:
    if "cleared" in answer:
        return [f"cleared {a}" for a in answer["cleared"]]  # type: ignore[attr-defined]
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(answer["since"])))  # type: ignore[arg-type]
    retry = float(answer["retry_in"])  # type: ignore[arg-type]
    when = "being retried now" if answer["probing"] else (
        f"next try in {retry:.0f}s" if retry > 0 else "next leg tries it"
    )
    return [f"{answer['address']}  down since {since}, {answer['failures']} failures, {when}: "
            f"{answer['reason']}"]


def _receive(sock: socket.socket) -> Iterator[bytes]:
    total = 0
    while chunk := sock.recv(65536):
        total += len(chunk)
        if total > 16 * 1024 * 1024:
            raise OSError(0, "answer too long")
        yield chunk
