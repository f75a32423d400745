"""The PROXY protocol (HAProxy's, v1 text and v2 binary): the client's real address, sent by a
load balancer in front of Moxy as the first bytes of a connection.

`parse_header` is the grammar alone; `read_header` reads exactly the header from a stream (never
a byte more, so the SMTP session starts on a clean stream) within a deadline.
"""

from __future__ import annotations

import ipaddress
import re

import attrs
import trio

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's figure)
V2_MAX_PAYLOAD = 4096  # addresses plus TLVs; real load balancers send far less


class ProxyProtocolError(Exception):
    """Not a valid PROXY header (or the connection ended or stalled before one)."""


@attrs.frozen
class ProxyHeader:
    """`source` is the original client's address; None for v1 UNKNOWN or v2 LOCAL (a health
    check by the balancer itself: the connection's own address stands)."""

    version: int
    source: str | None = None
    source_port: int | None = None


def parse_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, or None when more bytes are needed to tell.
    `data` must be the header exactly once complete (see `header_length`)."""
    if data.startswith(b"PROXY "[: len(data)]):
        end = data.find(b"\r\n")
        if end < 0:
            if len(data) >= V1_MAX:
                raise ProxyProtocolError("PROXY v1 line too long")
            return None
        return _parse_v1(data[:end])
    if V2_SIGNATURE.startswith(data[:12]) and len(data) < 16:
        return None
    if data[:12] == V2_SIGNATURE:
        return _parse_v2(data)
    raise ProxyProtocolError("no PROXY protocol header")


_ADDRESS = re.compile(r"[0-9A-Fa-f:.]{2,45}")


def _parse_v1(line: bytes) -> ProxyHeader:
    words = line.decode("ascii", "replace").split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(1)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad PROXY v1 line {line[:V1_MAX]!r}")
    _, family, source, destination, source_port, destination_port = words
    # Digits, hex, ':' and '.' only: Python's ip_address takes an IPv6 zone id after '%',
    # which may hold any byte (a bare LF, "\n.\n"), and the client address goes into the
    # Received header of the message sent upstream, the log and XCLIENT.
    if not (_ADDRESS.fullmatch(source) and _ADDRESS.fullmatch(destination)):
        raise ProxyProtocolError(f"bad address in PROXY v1 line {line!r}")
    try:
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    except ValueError:
        raise ProxyProtocolError(f"bad address in PROXY v1 line {line!r}") from None
    if src.version != dst.version or (src.version == 4) != (family == "TCP4"):
        raise ProxyProtocolError(f"address family mismatch in PROXY v1 line {line!r}")
    ports = (source_port, destination_port)
    if not all(p.isascii() and p.isdigit() and int(p) <= 65535 and p == str(int(p))
               for p in ports):
        raise ProxyProtocolError(f"bad port in PROXY v1 line {line!r}")
    return ProxyHeader(1, _plain(src), int(source_port))


def _parse_v2(data: bytes) -> ProxyHeader:
    version, command = data[12] >> 4, data[12] & 0x0F
    family = data[13]
    length = int.from_bytes(data[14:16], "big")
    if version != 2 or command not in (0, 1):
        raise ProxyProtocolError(f"bad PROXY v2 version/command byte {data[12]:#04x}")
    if length > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"PROXY v2 payload of {length} bytes is too long")
    payload = data[16 : 16 + length]
    if command == 0:  # LOCAL
        return ProxyHeader(2)
    if family == 0x11:  # TCP over IPv4
        size = 4
    elif family == 0x21:  # TCP over IPv6
        size = 16
    else:  # UNSPEC, UDP, unix sockets: nothing Moxy can use as a client address
        return ProxyHeader(2)
    if len(payload) < 2 * size + 4:
        raise ProxyProtocolError("PROXY v2 address block too short")
    source = ipaddress.ip_address(payload[:size])
    port = int.from_bytes(payload[2 * size : 2 * size + 2], "big")
    return ProxyHeader(2, _plain(source), port)


def _plain(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """An IPv4-mapped IPv6 address as the IPv4 address it is (Python 3.11 writes
    ::ffff:192.0.2.7 as "::ffff:c000:207"), as for clients of a dual-stack listener."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


async def read_header(stream: trio.abc.ReceiveStream, timeout: float) -> ProxyHeader:
    """Read one PROXY header, and nothing after it, within `timeout` seconds."""
    buf = bytearray()

    async def fill(size: int) -> None:
        while len(buf) < size:
            data = await stream.receive_some(size - len(buf))
            if not data:
                raise ProxyProtocolError("connection closed before a complete PROXY header")
            buf.extend(data)

    with trio.move_on_after(timeout):
        try:
            await fill(15)  # the shortest header: "PROXY UNKNOWN\r\n"
            if buf.startswith(b"PROXY "):
                while not buf.endswith(b"\r\n"):  # byte by byte: the SMTP client may follow
                    if len(buf) >= V1_MAX:
                        raise ProxyProtocolError("PROXY v1 line too long")
                    await fill(len(buf) + 1)
            elif buf[:12] == V2_SIGNATURE:
                await fill(16)
                await fill(16 + min(int.from_bytes(buf[14:16], "big"), V2_MAX_PAYLOAD + 1))
            header = parse_header(bytes(buf))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ProxyProtocolError(f"connection lost: {exc}") from None
        if header is None:  # cannot happen: every branch above read a whole header
            raise ProxyProtocolError("incomplete PROXY header")
        return header
    raise ProxyProtocolError(f"no PROXY header within {timeout:g}s")
