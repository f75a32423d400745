"""The load `bench_compare.py` makes besides `smtp-source`: a pipelining client for the
ten-domain case, the latency probe (one message at a time beside a steady load) and the RCPT
time against a destination that leaves Nagle on."""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxies
from proxies import need

SENDER, DOMAINS = "bench@client.test", [f"d{i}.bench.test" for i in range(10)]


# --- a pipelining client for the ten-domain case and the latency probe ---------------------


class Client:
    """One SMTP session over a raw socket, pipelining MAIL, RCPTs and DATA."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 10)
        self.sock.settimeout(30)
        self.buf = b""
        self.replies(1)
        self.sock.sendall(b"EHLO client.test\r\n")
        self.replies(1)

    def replies(self, count: int) -> list[bytes]:
        got: list[bytes] = []
        while len(got) < count:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise SystemExit("bench: a server closed the connection")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                got.append(line)
        return got

    def send(self, recipients: list[str], body: bytes) -> None:
        head = f"MAIL FROM:<{SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in recipients)
        self.sock.sendall(head.encode() + b"DATA\r\n")
        answers = self.replies(len(recipients) + 2)
        if not answers[-1].startswith(b"354"):
            raise SystemExit(f"bench: DATA refused: {answers}")
        self.sock.sendall(body + b".\r\n")
        final = self.replies(1)[0]
        if not final.startswith(b"250"):
            raise SystemExit(f"bench: message refused: {final!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.sock.close()


def body_of(size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return b"Subject: bench\r\n\r\n" + line * max(size // len(line), 1)


def ten_domains(port: int, messages: int, size: int, sessions: int = 20) -> float:
    """`messages` messages, each to one user in each of ten domains, over `sessions` threads
    reusing their connections."""
    body, recipients = body_of(size), [f"user@{d}" for d in DOMAINS]
    per = [messages // sessions + (i < messages % sessions) for i in range(sessions)]

    def session(count: int) -> None:
        client = Client(port)
        for _ in range(count):
            client.send(recipients, body)
        client.close()

    threads = [threading.Thread(target=session, args=(n,)) for n in per]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def latency(port: int, probes: int) -> tuple[float, float]:
    """p50 and p99 (ms) of one message's MAIL-to-250 time, with 19 smtp-source sessions
    loading the same server meanwhile."""
    load = subprocess.Popen(
        [need("smtp-source", "postfix"), "-m", "1000000", "-s", "19", "-d", "-l", "100",
         "-f", SENDER, "-t", "user@bench.test", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        client, body, times = Client(port), body_of(100), []
        for _ in range(probes):
            started = time.perf_counter()
            client.send(["user@bench.test"], body)
            times.append((time.perf_counter() - started) * 1000)
        client.close()
    finally:
        load.terminate()
        load.wait()
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def nagle_rcpt_ms(workdir: Path, count: int) -> float:
    """Median RCPT time through Moxy to a destination with Nagle on (tests/peers/nagle_mta)."""
    sys.path.insert(0, str(proxies.ROOT / "tests"))
    from peers.nagle_mta import NagleMta  # type: ignore[import-not-found]  # (tests/ on the path)

    with NagleMta() as mta, proxies.moxy(workdir, f"bench.test  {mta.address}\n") as moxy:
        client, times = Client(moxy.port), []
        for _ in range(count):
            client.sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
            client.replies(1)
            started = time.perf_counter()
            client.sock.sendall(b"RCPT TO:<user@bench.test>\r\n")
            client.replies(1)
            times.append((time.perf_counter() - started) * 1000)
            client.sock.sendall(b"RSET\r\n")
            client.replies(1)
        client.close()
    return statistics.median(times[1:])
