"""What a fresh upstream connection does between EHLO and its first transaction: STARTTLS
(RFC 3207) and XCLIENT (Postfix's XCLIENT_README). `upstream.connect` decides whether to call
them; errors are the connection's `LegError`s, so failover treats them like a failed greeting.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from moxy.smtp.client import ReplyParser, parse_ehlo
from moxy.stream import StreamBroken, StreamTimeout
from moxy.tls import describe

if TYPE_CHECKING:
    from moxy.connection import Connection

logger = logging.getLogger("moxy.upstream")


@attrs.frozen
class ClientIdentity:
    """Who the client is, for XCLIENT to trusted destinations (Postfix's XCLIENT_README)."""

    address: str
    helo: str = ""
    protocol: str = "SMTP"  # "SMTP" or "ESMTP"
    name: str = ""  # reverse DNS name; Moxy does no lookups, so unknown

    def xclient_line(self, offered: str) -> bytes:
        """XCLIENT with the attributes the destination lists in its EHLO keyword."""
        address = f"IPV6:{self.address}" if ":" in self.address else self.address
        values = {
            "ADDR": address,
            "NAME": self.name or "[UNAVAILABLE]",
            "HELO": self.helo or "[UNAVAILABLE]",
            "PROTO": self.protocol,
        }
        names = {word.upper() for word in offered.split()}
        words = [f"{key}={_xtext(value)}" for key, value in values.items() if key in names]
        if not words:
            return b""
        return ("XCLIENT " + " ".join(words) + "\r\n").encode("ascii")


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext, which XCLIENT values use: "+", "=", controls and non-ASCII as +HH."""
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
        for c in value
    )


async def start_tls(conn: Connection, helo: bytes) -> None:
    """STARTTLS, the handshake, and EHLO again (RFC 3207 §4.2). Once offered, TLS must work:
    a refused STARTTLS or a failed handshake fails the connection (never clear text after
    that, whatever the mode), as does anything the server sent after its 220 in clear text
    (a response injection, the client side of CVE-2011-0411)."""
    destination, t = conn.destination, conn.settings.timeouts
    await conn.send(b"STARTTLS\r\n", "tls", t.upstream_command)
    # more=True: what follows the 220 is judged below, by a message that says what it may be.
    reply = await conn.read_reply("tls", t.upstream_command, more=True)
    if reply.code != 220:
        logger.warning("upstream %s: STARTTLS refused: %s", destination, reply)
        raise conn.error("tls", f"STARTTLS refused: {reply}", reply)
    if conn.parser.buffered:
        logger.warning("upstream %s: data after the 220 to STARTTLS (response injection?)",
                       destination)
        raise conn.error("tls", "data after the 220 to STARTTLS (response injection?)")
    # An IP address here is checked against the certificate's IP names and, as RFC 6066
    # wants, not sent as SNI (Python's ssl does both).
    name = destination.sni or destination.host
    context = conn.settings.tls.context(destination.verify)
    detail = ""
    try:
        await conn.stream.start_tls(
            context, trio.current_time() + t.upstream_command, server_hostname=name
        )
    except StreamTimeout:
        detail = f"no TLS handshake within {t.upstream_command:g}s"
    except StreamBroken as exc:
        detail = str(exc)
    if detail:
        logger.warning("upstream %s: TLS handshake failed: %s", conn.destination, detail)
        raise conn.error("tls", f"TLS handshake failed: {detail}")
    conn.tls = describe(conn.stream.ssl)
    conn.parser = ReplyParser(max_line=conn.settings.reply_line)
    ehlo = await conn.command(b"EHLO " + helo + b"\r\n", "ehlo", t.upstream_command)
    if ehlo.klass != 2:
        raise conn.error("ehlo", f"refused after STARTTLS: {ehlo}", ehlo)
    conn.extensions = parse_ehlo(ehlo)
    logger.debug("upstream %s: %s", conn.destination, conn.tls)


async def send_xclient(conn: Connection, client: ClientIdentity, helo: bytes) -> None:
    """Tell a trusted destination who the client really is, then EHLO again (the server
    restarts the session with a 220, or 250 in old Postfix). A refusal fails the connection:
    mail must not reach it looking as if Moxy had sent it."""
    t = conn.settings.timeouts
    line = client.xclient_line(conn.extensions["XCLIENT"])
    if not line:
        return  # it takes none of the attributes Moxy knows
    reply = await conn.command(line, "xclient", t.upstream_command)
    if reply.klass != 2:
        raise conn.error("xclient", f"refused: {reply}", reply)
    conn.xclient = True
    ehlo = await conn.command(b"EHLO " + helo + b"\r\n", "ehlo", t.upstream_command)
    if ehlo.klass != 2:
        raise conn.error("ehlo", f"refused after XCLIENT: {ehlo}", ehlo)
    conn.extensions = parse_ehlo(ehlo)
