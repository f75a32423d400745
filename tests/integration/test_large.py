"""A 50 MB message streams through `moxy serve` intact, without Moxy holding it in memory."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peers.client import SmtpClient
from peers.moxy import MoxyProcess, StartMoxy
from peers.recorder import Recorder

from .helpers import SENDER, check_received, split_received

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]

MESSAGE_SIZE = 50 * 1024 * 1024
CHUNK_LINES = 13_000  # ~1 MB per chunk


def large_message(size: int = MESSAGE_SIZE) -> Iterator[bytes]:
    """Deterministic wire bytes of about `size`, in ~1 MB chunks; no line starts with a dot."""
    yield b"From: <sender@client.test>\r\nSubject: large\r\n\r\n"
    sent, n = 0, 0
    while sent < size:
        chunk = b"".join(
            b"%08d " % i + b"abcdefghijklmnopqrstuvwxyz0123456789" * 2 + b"\r\n"
            for i in range(n, n + CHUNK_LINES)
        )
        n += CHUNK_LINES
        sent += len(chunk)
        yield chunk


def peak_memory_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/PID/status")


@pytest.mark.slow
async def test_fifty_megabyte_message_arrives_intact_and_moxy_memory_stays_flat(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder(keep_data=False)
    moxy = moxy_process(
        {"example.org": upstream},
        limits={"message_size": 64 * 1024 * 1024},
        timeouts={"client_data": 30.0, "upstream_data_block": 30.0, "upstream_data_end": 30.0},
    )
    baseline = peak_memory_kib(moxy.process.pid)
    sent_hash = hashlib.sha256()
    sent = 0
    async with await SmtpClient.connect(moxy.host, moxy.port) as client:
        await client.greeting_and_ehlo()
        assert (
            await client.command(f"MAIL FROM:<{SENDER}> SIZE={MESSAGE_SIZE + 4096}")
        ).code == 250
        assert (await client.command("RCPT TO:<user@example.org>")).code == 250
        assert (await client.command("DATA")).code == 354
        for chunk in large_message():
            sent_hash.update(chunk)
            sent += len(chunk)
            await client.stream.send_all(chunk)
        await client.stream.send_all(b".\r\n")
        final = await client.reply(timeout=60)
        assert final.code == 250, client.dump()

    [message] = upstream.messages
    header, start = split_received(message.head)
    check_received(header)
    assert message.size == len(header) + sent
    # Recompute the hash of what should have arrived: Moxy's header, then the client's bytes.
    expected = hashlib.sha256(header)
    for chunk in large_message():
        expected.update(chunk)
    assert message.sha256 == expected.hexdigest()
    assert start.startswith(b"From: <sender@client.test>\r\nSubject: large\r\n")

    growth_mib = (peak_memory_kib(moxy.process.pid) - baseline) / 1024
    print(f"moxy peak memory: {baseline / 1024:.0f} MiB at start, +{growth_mib:.1f} MiB after")
    assert growth_mib < 25, f"moxy's peak memory grew by {growth_mib:.0f} MiB for a 50 MB message"


async def test_a_one_megabyte_message_streams_through_in_process(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    """The same path as the 50 MB test, small enough for every run."""
    upstream = make_recorder()
    server = await moxy({"example.org": upstream})
    body = b"".join(large_message(1024 * 1024))
    async with await SmtpClient.connect(server.host, server.port) as client:
        await client.greeting_and_ehlo()
        _, final = await client.send_message(SENDER, ["user@example.org"], body)
        assert final is not None and final.code == 250, client.dump()
    [message] = upstream.messages
    assert message.data is not None
    assert split_received(message.data)[1] == body
