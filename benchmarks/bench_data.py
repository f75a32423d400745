"""Throughput of the DATA body reader (src/moxy/smtp/data.py), the proxy's hot path.

Feeds ~200 MB of realistic text (78-character lines, some dot-stuffed) in 64 KiB reads, as
trio's receive_some would deliver them, and prints MB/s per scenario. Not a test:

    .venv/bin/python benchmarks/bench_data.py [--megabytes 200] [--chunk 65536]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

from moxy.smtp.data import BareNewlines, BodyReader
from moxy.smtp.events import BodyChunk, BodyEnd
from moxy.smtp.replies import Reply
from moxy.smtp.server import ServerConnection

WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "they", "you", "were", "her", "she", "there", "been", "one", "all", "we", "their", "has",
    "would", "when", "if", "so", "no", "message", "delivery", "transport", "header", "received",
    "relay", "domain", "mailbox", "proxy", "upstream", "route",
)


def sample_text(size: int, *, line_end: bytes = b"\r\n", seed: int = 5321) -> bytes:
    """`size` bytes of wrapped prose: lines of at most 78 characters, 1 in 50 starting with a
    (stuffed) dot, cut mid-line at the end as a real read would be."""
    rng = random.Random(seed)
    lines: list[bytes] = []
    total = 0
    while total < size:
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < rng.randint(40, 78):
            words.append(rng.choice(WORDS))
        line = " ".join(words)[:78].encode()
        if rng.randrange(50) == 0:
            line = b".." + line[:76]
        lines.append(line)
        total += len(line) + len(line_end)
    return line_end.join(lines)[:size]


def chunks_of(text: bytes, chunk: int) -> list[bytes]:
    return [text[i : i + chunk] for i in range(0, len(text), chunk)]


def bench_reader(
    chunks: list[bytes], rounds: int, *, max_text_line: int, bare_newlines: BareNewlines = "refuse"
) -> tuple[int, float]:
    reader = BodyReader(max_text_line=max_text_line, bare_newlines=bare_newlines)
    fed = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            for event in reader.feed(chunk):
                assert isinstance(event, BodyChunk), event
            fed += len(chunk)
    assert reader.feed(b"\r\n.\r\n")[-1] == BodyEnd()
    return fed, time.perf_counter() - start


def bench_connection(chunks: list[bytes], rounds: int) -> tuple[int, float]:
    """The same body through ServerConnection: receive_data / next_event as a session does."""
    ok = Reply.make(250, "2.0.0", "Ok")
    conn = ServerConnection(max_message_size=0)
    conn.send(Reply(220, ("bench",)))
    conn.receive_data(b"EHLO b\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    for _ in range(3):
        conn.next_event()
        conn.send(ok)
    conn.next_event()
    conn.send(Reply(354, ("go",)))
    fed = 0
    start = time.perf_counter()
    for _ in range(rounds):
        for chunk in chunks:
            conn.receive_data(chunk)
            while isinstance(conn.next_event(), BodyChunk):
                pass
            fed += len(chunk)
    return fed, time.perf_counter() - start


def report(name: str, run: Callable[[], tuple[int, float]], repeat: int) -> None:
    """Best of `repeat` runs: the least disturbed by whatever else the machine is doing."""
    fed, seconds = min((run() for _ in range(repeat)), key=lambda r: r[1])
    print(f"{name:<44} {fed / 1e6:8.1f} MB in {seconds:6.3f} s  {fed / 1e6 / seconds:8.0f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=200, help="body size (default 200)")
    parser.add_argument("--chunk", type=int, default=65536, help="read size (default 64 KiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario, best kept")
    args = parser.parse_args()
    period = 16 * args.chunk  # text that repeats, so the benchmark does not need 200 MB of RAM
    rounds = max(1, args.megabytes * 1_000_000 // period)
    crlf = chunks_of(sample_text(period), args.chunk)
    bare_lf = chunks_of(sample_text(period, line_end=b"\n"), args.chunk)
    print(f"{rounds * period / 1e6:.0f} MB of 78-character lines in {args.chunk}-byte reads")
    scenarios: list[tuple[str, Callable[[], tuple[int, float]]]] = [
        ("reader, refuse, line limit 1000 (defaults)", lambda: bench_reader(
            crlf, rounds, max_text_line=1000, bare_newlines="refuse")),
        ("reader, refuse, no line limit", lambda: bench_reader(crlf, rounds, max_text_line=0)),
        ("reader, normalise, CRLF input", lambda: bench_reader(
            crlf, rounds, max_text_line=1000, bare_newlines="normalise")),
        ("reader, normalise, bare LF input", lambda: bench_reader(
            bare_lf, rounds, max_text_line=1000, bare_newlines="normalise")),
        ("ServerConnection, refuse, line limit 1000", lambda: bench_connection(crlf, rounds)),
    ]
    for name, run in scenarios:
        report(name, run, args.repeat)


if __name__ == "__main__":
    main()
