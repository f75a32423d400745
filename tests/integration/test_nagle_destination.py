"""A destination that leaves Nagle on and writes each reply separately must not make Moxy wait
for its own delayed ACK (~40 ms) on every pipelined MAIL/RCPT exchange."""

from __future__ import annotations

import smtplib
import statistics
import time

import trio

from peers.moxy import StartMoxy
from peers.nagle_mta import NagleMta

from .helpers import SENDER

TRANSACTIONS = 40


def _rcpt_times(host: str, port: int) -> list[float]:
    times = []
    with smtplib.SMTP(host, port, timeout=15) as client:
        client.ehlo("client.test")
        for n in range(TRANSACTIONS):
            client.mail(SENDER)
            started = time.perf_counter()
            code, _ = client.rcpt("user@example.org")
            times.append(time.perf_counter() - started)
            assert code == 250
            client.data(f"Subject: {n}\r\n\r\nbody\r\n".encode())
    return times


async def test_rcpt_to_a_nagle_destination_shows_no_delayed_ack_steps(moxy: StartMoxy) -> None:
    with NagleMta() as destination:
        server = await moxy({"example.org": destination.address})
        times = await trio.to_thread.run_sync(_rcpt_times, server.host, server.port)
        assert destination.messages == TRANSACTIONS
    # Each RCPT after the first transaction sends RSET+MAIL+RCPT in one write; a delayed ACK
    # would show as >= 40 ms per exchange. The margin allows a loaded machine its hiccups.
    stalls = [t for t in times[1:] if t >= 0.035]
    assert len(stalls) <= TRANSACTIONS // 5, (
        f"{len(stalls)} of {TRANSACTIONS - 1} RCPTs took >= 35 ms "
        f"(median {statistics.median(times) * 1000:.1f} ms)"
    )
