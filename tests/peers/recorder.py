"""A scriptable, recording SMTP server: the upstream that Moxy's integration tests talk to.

Every stage of the SMTP dialogue can be told to answer with a given reply line, to wait first,
to answer 421 and hang up, to drop the connection, or to hang. Everything the server sees is
recorded: connections with their command transcripts, and messages exactly as they arrived on
the wire (still dot-stuffed, without the final ".\\r\\n").

It runs in plain threads (one per connection) so that sync tests and trio tests can both use it;
`stop()` unblocks and joins every thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NoReturn

import attrs

# --- what a stage can be told to do ------------------------------------------------------------


@attrs.frozen
class Disconnect:
    """Close the connection at once, without a reply."""


@attrs.frozen
class Hang:
    """Never answer; keep reading (and discarding) until the peer gives up or the server stops."""


@attrs.frozen
class Delay:
    """Wait `seconds`, then carry out `then` (a reply line, or the stage's default when None)."""

    seconds: float
    then: Step | None = None


@attrs.frozen
class Late:
    """Reply `now`; `seconds` later, in a write of its own, say `later` unasked (a destination
    out of step, seen by the next command on that connection)."""

    now: str
    later: str
    seconds: float = 0.2


Step = str | Disconnect | Hang | Delay | Late
"""A reply (`"550 5.1.1 No such user"`, multi-line as `"250-a\\r\\n250 b"`) or an action.

A reply whose code is 421 also closes the connection, as a real server shutting down would.
"""

DISCONNECT = Disconnect()
HANG = Hang()


def delay(seconds: float, then: Step | None = None) -> Delay:
    return Delay(seconds, then)


def reply_421(text: str = "4.3.2 Service shutting down") -> str:
    return f"421 {text}"


Steps = Step | Sequence[Step]
"""One step for every occurrence, or one per occurrence in order (the last one repeats)."""

STAGES = (
    "greeting", "ehlo", "helo", "mail", "rcpt", "data", "body", "end_of_data", "rset", "noop",
    "quit", "starttls", "xclient",
)  # fmt: skip

DEFAULT_EHLO_KEYWORDS = ("PIPELINING", "SIZE 209715200", "8BITMIME", "ENHANCEDSTATUSCODES")

DEFAULT_REPLIES: Mapping[str, str] = {
    "greeting": "220 recorder.test ESMTP recorder",
    "helo": "250 recorder.test",
    "mail": "250 2.1.0 Ok",
    "rcpt": "250 2.1.5 Ok",
    "data": "354 End data with <CR><LF>.<CR><LF>",
    "end_of_data": "250 2.0.0 Ok: queued",
    "rset": "250 2.0.0 Ok",
    "noop": "250 2.0.0 Ok",
    "quit": "221 2.0.0 Bye",
    "starttls": "220 2.0.0 Ready to start TLS",
    "xclient": "220 recorder.test ESMTP recorder",  # Postfix answers XCLIENT with a greeting
}


# --- what it records ---------------------------------------------------------------------------


@attrs.define
class Message:
    """One transaction that reached the end-of-data sequence (whatever the reply to it was)."""

    connection: int  # index into Recorder.connections
    helo: str
    mail_from: str  # MAIL FROM argument without brackets and parameters
    mail_params: str  # whatever followed the reverse-path
    rcpts: list[str]  # recipients this server accepted (2xx) in the transaction
    size: int
    sha256: str
    data: bytes | None  # wire bytes up to and including the CRLF before ".", None if not kept
    head: bytes  # the first 64 KiB of data, kept even when data is not
    reply: str  # what this server answered at end of data

    @property
    def accepted(self) -> bool:
        return self.reply[:1] == "2"


@attrs.define
class Connection:
    index: int
    peer: tuple[str, int]
    commands: list[str] = attrs.field(factory=list)  # every command line, without CRLF
    quit: bool = False  # the peer sent QUIT
    closed: threading.Event = attrs.field(factory=threading.Event)
    disconnected_by_script: bool = False
    tls: str = ""  # the TLS version once STARTTLS succeeded
    tls_error: str = ""  # why a STARTTLS handshake failed
    xclient: dict[str, str] = attrs.field(factory=dict)  # attributes of an accepted XCLIENT


# --- the server --------------------------------------------------------------------------------

_COMMAND_LIMIT = 4096  # longer lines are a bug in the client under test; fail loudly
_HEAD_KEEP = 64 * 1024
_CRLF_TERMINATOR = re.compile(rb"\r\n\.\r\n")
# What vulnerable servers accept as end of data: a "." line ended by LF or CRLF on either side.
_LENIENT_TERMINATOR = re.compile(rb"\r?\n\.\r?\n")


class _Closed(Exception):
    """The connection is over (peer EOF, our own disconnect, or server stop)."""


class Recorder:
    """A recording SMTP server on 127.0.0.1, port chosen by the kernel.

    `script` maps a stage name (see STAGES) to a Step or a sequence of Steps, counted per stage
    over the recorder's lifetime. `rcpt_script` maps a recipient address (case-insensitive) to
    Steps and wins over the "rcpt" stage. "body" acts once `body_after` bytes of a message body
    have arrived (use it to fail mid-body). `esmtp=False` answers EHLO with 502 (HELO only).
    `lenient_end_of_data=True` ends DATA at a "." line ended by a bare LF too, like the servers
    that SMTP smuggling exploits. `keep_data=False` keeps only size, sha256 and the first 64 KiB.

    `starttls`: offer STARTTLS and, after the "starttls" stage's 220, do the handshake with
    this server context; `broken_tls=True` offers it but answers the handshake with clear-text
    garbage. `xclient` (e.g. "NAME ADDR PROTO HELO") is advertised as the XCLIENT keyword and
    the attributes of an XCLIENT command are recorded (answered by the "xclient" stage).
    """

    def __init__(
        self,
        script: Mapping[str, Steps] | None = None,
        *,
        rcpt_script: Mapping[str, Steps] | None = None,
        esmtp: bool = True,
        ehlo_keywords: Iterable[str] = DEFAULT_EHLO_KEYWORDS,
        body_after: int = 1,
        lenient_end_of_data: bool = False,
        keep_data: bool = True,
        name: str = "recorder",
        host: str = "127.0.0.1",
        starttls: ssl.SSLContext | None = None,
        broken_tls: bool = False,
        xclient: str | None = None,
    ) -> None:
        script = dict(script or {})
        unknown = set(script) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; known: {STAGES}")
        self.name = name
        self._script = {stage: _as_list(steps) for stage, steps in script.items()}
        self._rcpt_script = {a.lower(): _as_list(s) for a, s in (rcpt_script or {}).items()}
        self._counts: dict[str, int] = {}
        self.esmtp = esmtp
        self.ehlo_keywords = tuple(ehlo_keywords)
        self.body_after = body_after
        self.lenient_end_of_data = lenient_end_of_data
        self.keep_data = keep_data
        self.starttls = starttls
        self.broken_tls = broken_tls
        self.xclient = xclient

        self.connections: list[Connection] = []
        self.messages: list[Message] = []
        self.errors: list[str] = []  # protocol errors the recorder noticed in its client
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"{name}-accept", daemon=True
        )
        self._acceptor.start()

    # -- for tests --

    @property
    def address(self) -> str:
        """As a routes file wants it: `127.0.0.1:PORT` or `[::1]:PORT`."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def delivered(self) -> list[Message]:
        """Messages this server accepted (2xx at end of data)."""
        with self._lock:
            return [m for m in self.messages if m.accepted]

    def commands(self) -> list[str]:
        """Every command line received, over all connections, in order per connection."""
        with self._lock:
            return [c for conn in self.connections for c in conn.commands]

    def verbs(self, connection: int | None = None) -> list[str]:
        """The command verbs (upper-cased first word), for one connection or all."""
        with self._lock:
            conns = self.connections if connection is None else [self.connections[connection]]
            return [c.split(" ", 1)[0].split(":", 1)[0].upper() for x in conns for c in x.commands]

    def wait_for(
        self, condition: Callable[[], object], timeout: float = 5.0, what: str = "condition"
    ) -> None:
        """Poll `condition` until it is true; raise AssertionError after `timeout` seconds.

        A condition that raises IndexError counts as false (`lambda: r.connections[0].quit`
        before the first connection arrived)."""
        deadline = time.monotonic() + timeout
        while not _holds(condition):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out waiting for {what}")
            time.sleep(0.01)

    def wait_closed(self, connection: int = 0, timeout: float = 5.0) -> None:
        """Wait until connection number `connection` has ended (either side closed it)."""
        self.wait_for(
            lambda: self.connections[connection].closed.is_set(),
            timeout,
            f"connection {connection} to close",
        )

    def stop(self) -> None:
        self._stopping.set()
        # On Linux, close() alone does not wake a thread blocked in accept(); shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)
        alive = [t.name for t in self._threads if t.is_alive()]
        if self._acceptor.is_alive() or alive:
            raise RuntimeError(f"{self.name}: threads did not stop: {alive}")

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Recorder {self.name} {self.address}>"

    # -- script --

    def _step(self, stage: str, arg: str | None = None) -> Step:
        with self._lock:
            steps: list[Step] | None = None
            key = stage
            if stage == "rcpt" and arg is not None and arg.lower() in self._rcpt_script:
                steps = self._rcpt_script[arg.lower()]
                key = f"rcpt:{arg.lower()}"
            elif stage in self._script:
                steps = self._script[stage]
            n = self._counts.get(key, 0)
            self._counts[key] = n + 1
        if steps is None:
            return self._default(stage)
        return steps[min(n, len(steps) - 1)]

    def _default(self, stage: str) -> str:
        if stage == "ehlo":
            if not self.esmtp:
                return "502 5.5.2 Error: command not recognized"
            lines = ["recorder.test", *self.ehlo_keywords]
            if self.xclient is not None:
                lines.append(f"XCLIENT {self.xclient}")
            return "\r\n".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{line}" for i, line in enumerate(lines)
            )
        return DEFAULT_REPLIES[stage]

    # -- threads --

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except OSError:
                return
            # Each reply goes out when written, as from a real server: with Nagle, the second of
            # two pipelined replies would wait for the client's delayed ACK (40 ms on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                conn = Connection(len(self.connections), peer[:2])
                self.connections.append(conn)
                self._sockets.add(sock)
                thread = threading.Thread(
                    target=self._serve,
                    args=(sock, conn),
                    name=f"{self.name}-conn{conn.index}",
                    daemon=True,
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, conn: Connection) -> None:
        session = _Session(self, sock, conn)
        try:
            session.run()
        except _Closed:
            pass
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(sock)
                self._sockets.discard(session.sock)
            try:
                session.sock.close()
                sock.close()
            finally:
                conn.closed.set()


def _holds(condition: Callable[[], object]) -> bool:
    try:
        return bool(condition())
    except IndexError:
        return False


def _as_list(steps: Steps) -> list[Step]:
    if isinstance(steps, str | Disconnect | Hang | Delay):
        return [steps]
    result = list(steps)
    if not result:
        raise ValueError("empty step sequence")
    return result


class _Session:
    """One connection: a minimal but honest SMTP server loop."""

    def __init__(self, recorder: Recorder, sock: socket.socket, conn: Connection) -> None:
        self.r = recorder
        self.sock = sock
        self.conn = conn
        self.buffer = bytearray()
        self.helo = ""
        self.mail_from: str | None = None
        self.mail_params = ""
        self.rcpts: list[str] = []

    # -- I/O --

    def recv(self) -> bytes:
        if self.r._stopping.is_set():
            raise _Closed
        data = self.sock.recv(1 << 16)
        if not data:
            raise _Closed
        return data

    def read_line(self) -> str:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                raw = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                if not raw.endswith(b"\r\n"):
                    self.r.errors.append(f"command line not ended by CRLF: {raw!r}")
                return raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if len(self.buffer) > _COMMAND_LIMIT:
                self.r.errors.append(f"command line too long: {bytes(self.buffer[:80])!r}...")
                raise _Closed
            self.buffer += self.recv()

    def perform(self, stage: str, step: Step | None = None, arg: str | None = None) -> str:
        """Carry out the scripted step for `stage`; return the reply sent."""
        if step is None:
            step = self.r._step(stage, arg)
        while isinstance(step, Delay):
            if self.r._stopping.wait(step.seconds):
                raise _Closed
            step = step.then if step.then is not None else self.r._default(stage)
        if isinstance(step, Disconnect):
            self.conn.disconnected_by_script = True
            raise _Closed
        if isinstance(step, Hang):
            self.hang()
        if isinstance(step, Late):  # in this thread: a TLS socket is not shared with another
            self.sock.sendall(step.now.encode("utf-8") + b"\r\n")
            if self.r._stopping.wait(step.seconds):
                raise _Closed
            self.sock.sendall(step.later.encode("utf-8") + b"\r\n")
            return step.now
        assert isinstance(step, str)
        closing = step.startswith("421")
        self.conn.disconnected_by_script = self.conn.disconnected_by_script or closing
        self.sock.sendall(step.encode("utf-8") + b"\r\n")
        if closing:
            raise _Closed
        return step

    def hang(self) -> NoReturn:
        self.buffer.clear()
        while True:
            self.recv()

    # -- dialogue --

    def run(self) -> None:
        self.perform("greeting")
        while True:
            line = self.read_line()
            with self.r._lock:
                self.conn.commands.append(line)
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb.startswith("MAIL") or verb.startswith("RCPT"):
                verb, _, rest = line.partition(":")
                verb = verb.upper().replace(" ", "")
                arg = rest.strip()
            if verb == "EHLO":
                reply = self.perform("ehlo", self._ehlo_step())
                if reply.startswith("250"):
                    self.helo = arg.strip()
                    self.reset()
            elif verb == "HELO":
                if self.perform("helo").startswith("250"):
                    self.helo = arg.strip()
                    self.reset()
            elif verb == "MAILFROM":
                if self.mail_from is not None:
                    self.send("503 5.5.1 Error: nested MAIL command")
                    continue
                address, params = _split_path(arg)
                if self.perform("mail").startswith("2"):
                    self.mail_from, self.mail_params = address, params
            elif verb == "RCPTTO":
                address, _ = _split_path(arg)
                if self.mail_from is None:
                    self.send("503 5.5.1 Error: need MAIL command")
                    continue
                if self.perform("rcpt", arg=address).startswith("2"):
                    self.rcpts.append(address)
            elif verb == "DATA":
                if self.mail_from is None or not self.rcpts:
                    self.send("503 5.5.1 Error: need RCPT command")
                    continue
                if self.perform("data").startswith("3"):
                    self.receive_body()
            elif verb == "RSET":
                self.perform("rset")
                self.reset()
            elif verb == "NOOP":
                self.perform("noop")
            elif verb == "STARTTLS" and self.offers_tls and not self.conn.tls:
                if self.perform("starttls").startswith("220"):
                    self.start_tls()
            elif verb == "XCLIENT" and self.r.xclient is not None:
                attributes = dict(word.partition("=")[::2] for word in arg.split())
                if self.perform("xclient").startswith("220"):
                    self.conn.xclient = attributes
                    self.helo = ""
                    self.reset()
            elif verb == "QUIT":
                self.conn.quit = True
                self.perform("quit")
                raise _Closed
            else:
                self.send("502 5.5.2 Error: command not recognized")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    @property
    def offers_tls(self) -> bool:
        return self.r.starttls is not None or self.r.broken_tls

    def _ehlo_step(self) -> Step:
        step = self.r._step("ehlo")
        if self.offers_tls and not self.conn.tls and step == self.r._default("ehlo"):
            lines = step.split("\r\n")
            lines[-1] = "250-" + lines[-1][4:]
            step = "\r\n".join([*lines, "250 STARTTLS"])
        return step

    def start_tls(self) -> None:
        self.buffer.clear()
        if self.r.starttls is None:  # broken_tls: what a confused middlebox might send
            self.recv()  # the ClientHello
            self.sock.sendall(b"421 this is not a TLS ServerHello\r\n")
            self.conn.tls_error = "sent clear text instead of a handshake"
            raise _Closed
        try:
            tls = self.r.starttls.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.conn.tls_error = str(exc)
            raise _Closed from None
        with self.r._lock:
            self.r._sockets.discard(self.sock)
            self.r._sockets.add(tls)
        self.sock = tls
        self.conn.tls = tls.version() or "?"
        self.helo = ""
        self.reset()

    def reset(self) -> None:
        self.mail_from = None
        self.mail_params = ""
        self.rcpts = []

    def receive_body(self) -> None:
        """Read up to the end-of-data sequence, hashing as it goes; then answer it."""
        terminator = _LENIENT_TERMINATOR if self.r.lenient_end_of_data else _CRLF_TERMINATOR
        hasher = hashlib.sha256()
        kept: list[bytes] = []
        head = bytearray()
        size = 0
        body_step_done = "body" not in self.r._script
        # The body starts at a line boundary: a virtual CRLF lets ".\r\n" first match too.
        window = bytearray(b"\r\n" + self.buffer)
        self.buffer.clear()
        skip = 2

        def commit(piece: bytes) -> None:
            nonlocal size, skip
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            if not piece:
                return
            size += len(piece)
            hasher.update(piece)
            if len(head) < _HEAD_KEEP:
                head.extend(piece[: _HEAD_KEEP - len(head)])
            if self.r.keep_data:
                kept.append(piece)

        while True:
            match = terminator.search(window)
            if match is not None:
                eol = match.group(0).split(b".", 1)[0]
                commit(bytes(window[: match.start() + len(eol)]))
                self.buffer[:0] = window[match.end() :]
                break
            if len(window) > 4:
                commit(bytes(window[:-4]))
                del window[:-4]
            if not body_step_done and size + len(window) - skip >= self.r.body_after:
                body_step_done = True
                self.perform("body")  # only actions make sense here; a reply is sent as is
            window += self.recv()

        data = b"".join(kept) if self.r.keep_data else None
        kept.clear()
        message = Message(
            connection=self.conn.index,
            helo=self.helo,
            mail_from=self.mail_from or "",
            mail_params=self.mail_params,
            rcpts=list(self.rcpts),
            size=size,
            sha256=hasher.hexdigest(),
            data=data,
            head=bytes(head),
            reply="",
        )
        step = self.r._step("end_of_data")
        # Record the message before answering, so that a test never sees the reply first,
        # and record it even if the script then hangs or drops the connection.
        with self.r._lock:
            self.r.messages.append(message)
        self.reset()
        message.reply = _first_line(step) if isinstance(step, str) else repr(step)
        message.reply = self.perform("end_of_data", step)


def _first_line(step: str) -> str:
    return step.split("\r\n", 1)[0]


def _split_path(arg: str) -> tuple[str, str]:
    """`<a@b> SIZE=10` → ("a@b", "SIZE=10"); tolerant of a missing bracket."""
    arg = arg.strip()
    if arg.startswith("<"):
        end = arg.find(">")
        if end >= 0:
            return arg[1:end], arg[end + 1 :].strip()
    address, _, params = arg.partition(" ")
    return address, params.strip()
