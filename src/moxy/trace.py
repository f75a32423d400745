"""What identifies a session and a message to the destinations: session ids and the
Received: trace header (RFC 5321 §4.4).
"""

from __future__ import annotations

import email.utils
import functools
import itertools
import time
from datetime import UTC, datetime
from random import getrandbits

_ids = itertools.count(1)


def new_session_id() -> str:
    """Short, unique enough across restarts and nodes: random prefix + counter. The prefix
    comes from `random` (reseeded in a forked worker), not os.urandom: an id is no secret, and
    this saves a getrandom() system call per connection."""
    number = next(_ids)
    if number < 0x1000000:
        # The same twelve digits, from one number and without format specs: compiled, each
        # `:06X` was a format() call that parsed its spec (about 2,500 instructions).
        return (getrandbits(24) << 24 | number).to_bytes(6, "big").hex().upper()
    return f"{getrandbits(24):06X}{number:06X}"


def with_protocol(protocol: str, smtputf8: bool, tls: bool) -> str:
    """The `with` keyword of the Received header for a session greeted with `protocol`
    ("ESMTP" or "SMTP"): ESMTP, ESMTPS (RFC 3848), UTF8SMTP, UTF8SMTPS (RFC 6531 §3.7.3), or
    SMTP after HELO."""
    if protocol == "SMTP":
        return protocol
    if smtputf8:
        protocol = "UTF8SMTP"
    return protocol + "S" if tls else protocol


def received_header(
    helo: str, client_ip: str, hostname: str, protocol: str, message_id: str,
    recipients: list[str], when: float | None = None, tls: str = "",
) -> bytes:
    """The RFC 5321 §4.4 trace header that destinations see (folded onto three lines, four
    with TLS: Postfix's "(using TLSv1.3 with cipher ...)" comment)."""
    ip = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    date = _date(int(time.time() if when is None else when))
    for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    using = f"\t(using {tls})\r\n" if tls else ""
    text = (
        f"Received: from {helo or 'unknown'} ([{ip}])\r\n{using}"
        f"\tby {hostname} (Moxy) with {protocol} id {message_id}{for_clause};\r\n"
        f"\t{date}\r\n"
    )
    return text.encode("utf-8", "replace")


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """RFC 5322 date of a second; cached, since a busy server stamps many messages a second."""
    moment = datetime.fromtimestamp(second, UTC)
    return email.utils.format_datetime(moment)  # "+0000": UTC, not the "-0000" of unknown zone
