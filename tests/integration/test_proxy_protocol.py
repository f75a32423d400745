"""PROXY protocol v1 and v2 on `[server] listen_proxy`, from a raw client playing the load
balancer: the address it carries is the client's in the Received header and the log; a
connection from outside `proxy_protocol_from`, or without a valid header, is refused."""

from __future__ import annotations

import ipaddress
import ssl
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from moxy.proxy_protocol import ProxyHeader, ProxyProtocolError, parse_header
from peers.client import SmtpClient
from peers.moxy import MoxyProcess, RunningMoxy, StartMoxy
from peers.recorder import Recorder
from peers.sink import free_port, wait_for_greeting
from peers.tls import TlsFiles

from .helpers import BODY, SENDER, send_one, split_received

MakeRecorder = Callable[..., Recorder]
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(source: str, port: int = 40000, command: int = 1) -> bytes:
    src = ipaddress.ip_address(source)
    dst = ipaddress.ip_address("192.0.2.25" if src.version == 4 else "2001:db8::25")
    family = 0x11 if src.version == 4 else 0x21
    payload = src.packed + dst.packed + struct.pack("!HH", port, 25)
    payload += b"\x03\x00\x04abcd"  # a TLV (CRC32C type, unchecked) as load balancers add
    return SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(payload)) + payload


async def proxied_server(moxy: StartMoxy, upstream: Recorder, allowed: str) -> RunningMoxy:
    return await moxy(
        {"example.org": upstream},
        server={"listen_proxy": ["127.0.0.1:0"], "proxy_protocol_from": [allowed]},
    )


async def deliver_through(server: RunningMoxy, header: bytes) -> None:
    host, port = server.bound[-1]  # listen_proxy comes after listen
    async with await SmtpClient.connect(host, port) as client:
        await client.send(header)
        await client.greeting_and_ehlo()
        _, final = await client.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()


async def test_v1_address_is_the_clients_in_received_and_log(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await proxied_server(moxy, upstream, "127.0.0.0/8")
    await deliver_through(server, b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 25\r\n")
    assert upstream.delivered[0].data is not None
    header, _ = split_received(upstream.delivered[0].data)
    assert header.startswith(b"Received: from client.test ([203.0.113.9])\r\n")
    with trio.fail_after(5):
        while not any(" client=203.0.113.9 " in line for line in server.log_lines()):
            await trio.sleep(0.02)


async def test_v2_ipv6_address_and_v2_local_health_check(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    server = await proxied_server(moxy, upstream, "127.0.0.1/32")
    await deliver_through(server, v2_header("2001:db8::7"))
    await deliver_through(server, v2_header("203.0.113.1", command=0))  # LOCAL: own address
    headers = [split_received(m.data or b"")[0] for m in upstream.delivered]
    assert b"([IPv6:2001:db8::7])" in headers[0]
    assert b"([127.0.0.1])" in headers[1]


async def test_proxy_listener_refuses_other_networks_and_missing_headers(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder()
    closed = await proxied_server(moxy, upstream, "10.0.0.0/8")
    host, port = closed.bound[-1]
    async with await SmtpClient.connect(host, port) as client:
        await client.send(b"PROXY TCP4 203.0.113.9 192.0.2.25 40000 25\r\n")
        assert await client.expect_closed() == b""  # not even a greeting
    allowed = await proxied_server(moxy, upstream, "127.0.0.0/8")
    host, port = allowed.bound[-1]
    for junk in (b"EHLO not-a-balancer.test\r\n", b"PROXY TCP4 1.2.3.4 nonsense\r\n"):
        async with await SmtpClient.connect(host, port) as client:
            await client.send(junk)
            assert await client.expect_closed() == b""
    # The ordinary listener of the same server takes no PROXY header and works as before.
    async with await SmtpClient.connect(*allowed.bound[0]) as client:
        await client.greeting_and_ehlo()
    assert upstream.connections == []


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n", ProxyHeader(1, "192.0.2.1", 1)),
        (b"PROXY TCP6 2001:db8::1 ::1 65535 25\r\n", ProxyHeader(1, "2001:db8::1", 65535)),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1)),
        (b"PROXY TCP4 192.0.2.1", None),
        (SIGNATURE[:7], None),
        (v2_header("192.0.2.9", 7), ProxyHeader(2, "192.0.2.9", 7)),
        # A dual-stack load balancer's IPv4 client: its IPv4 address, as for any other.
        (b"PROXY TCP6 ::ffff:192.0.2.7 ::1 5 25\r\n", ProxyHeader(1, "192.0.2.7", 5)),
        (v2_header("::ffff:192.0.2.8", 9), ProxyHeader(2, "192.0.2.8", 9)),
    ],
)
def test_parse_header(data: bytes, expected: ProxyHeader | None) -> None:
    assert parse_header(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
        b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY " + b"x" * 200,
        b"GET / HTTP/1.1\r\n",
        SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12,
        SIGNATURE + b"\x21\x11\x00\x02\x00\x00",
        # An IPv6 zone id: any byte but space and CRLF, bare LF and "\n.\n" included, which
        # went into the Received header sent upstream (and the log, and XCLIENT).
        b"PROXY TCP6 fe80::1%a\n.\nX-Injected:yes\r.\r ::1 5555 25\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 5555 25\r\n",
    ],
)
def test_bad_headers_are_errors(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse_header(data)


async def test_moxy_serve_with_workers_binds_listen_proxy_and_offers_starttls(
    moxy_process: Callable[..., MoxyProcess], make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    upstream = make_recorder()
    proxy_port = free_port()
    moxy = moxy_process(
        {"example.org": upstream},
        server={"workers": 2, "listen_proxy": [f"127.0.0.1:{proxy_port}"],
                "proxy_protocol_from": ["127.0.0.0/8"]},
        tls={"cert": str(tls_files.cert), "key": str(tls_files.key)},
    )
    async with await SmtpClient.connect("127.0.0.1", proxy_port) as client:
        await client.send(b"PROXY TCP4 198.51.100.4 192.0.2.25 40000 25\r\n")
        await client.greeting_and_ehlo()
        _, final = await client.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    async with await SmtpClient.connect(moxy.host, moxy.port) as client:
        assert "STARTTLS" in (await client.greeting_and_ehlo()).lines
        assert (await client.command("STARTTLS")).code == 220
        await client.start_tls(ssl.create_default_context(cafile=str(tls_files.ca)))
        await client.command("EHLO client.test")
        _, final = await client.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    first, second = (split_received(m.data or b"")[0] for m in upstream.delivered)
    assert b"([198.51.100.4])" in first and b" with ESMTP id " in first
    assert b"([127.0.0.1])\r\n\t(using TLSv1.3 " in second and b" with ESMTPS id " in second


async def test_with_workers_a_plain_listener_beside_a_proxy_wildcard_of_the_other_family(
    write_config: Callable[..., Path], make_recorder: MakeRecorder
) -> None:
    """`listen` on 127.0.0.1 and `listen_proxy` on `[::]`, one port: the plain listener was
    taken for a PROXY one (a wildcard matched both families), and its clients were closed
    without a greeting, with workers only."""
    upstream = make_recorder()
    port = free_port()
    path = write_config({"example.org": upstream}, listen=[f"127.0.0.1:{port}"],
                        server={"workers": 2, "listen_proxy": [f"[::]:{port}"],
                                "proxy_protocol_from": ["::1/128"]})
    with open(path.parent / "moxy.stderr", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "moxy", "serve", "-c", str(path)],
                                   stdin=subprocess.DEVNULL, stdout=stderr,
                                   stderr=subprocess.STDOUT, cwd=path.parent)
    try:
        await trio.to_thread.run_sync(wait_for_greeting, "127.0.0.1", port, 15, process)
        for _ in range(4):  # whichever worker takes it
            outcome = await send_one(("127.0.0.1", port), ["u@example.org"])
            assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    finally:
        process.terminate()
        assert process.wait(15) == 0
    assert len(upstream.messages) == 4


async def test_per_client_limits_count_the_address_the_header_carries(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    server = await moxy(
        {"example.org": make_recorder()},
        server={"listen_proxy": ["127.0.0.1:0"], "proxy_protocol_from": ["127.0.0.1/32"]},
        limits={"connections_per_ip": 1},
    )
    host, port = server.bound[-1]
    # Every connection comes from the load balancer's 127.0.0.1; only the header tells clients
    # apart, so one session each for two clients, and a second one for the first is refused.
    first = await SmtpClient.connect(host, port)
    await first.send(b"PROXY TCP4 203.0.113.1 192.0.2.25 40000 25\r\n")
    assert (await first.reply()).code == 220
    other = await SmtpClient.connect(host, port)
    await other.send(b"PROXY TCP4 203.0.113.2 192.0.2.25 40001 25\r\n")
    assert (await other.reply()).code == 220
    again = await SmtpClient.connect(host, port)
    await again.send(b"PROXY TCP4 203.0.113.1 192.0.2.25 40002 25\r\n")
    refused = await again.reply()
    assert (refused.code, refused.enhanced) == (421, "4.7.0")
    for client in (first, other, again):
        await client.aclose()
