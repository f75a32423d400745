"""What sessions keep between them: the replies that never change or change only with the
configuration (made and encoded once), and the upstream settings with a client's identity.
"""

from __future__ import annotations

import functools
from typing import Final

import attrs

from moxy.leg_setup import ClientIdentity
from moxy.smtp.replies import Reply
from moxy.upstream import UpstreamSettings

# Replies that never change, made (and encoded: Reply.to_bytes keeps its bytes) once.
MAIL_OK: Final = Reply.make(250, "2.1.0", "Ok")
OK: Final = Reply.make(250, "2.0.0", "Ok")
TLS_READY: Final = Reply.make(220, "2.0.0", "Ready to start TLS")
VRFY_REPLY: Final = Reply.make(252, "2.5.0", "Cannot VRFY user; try RCPT")
HELP_REPLY: Final = Reply.make(
    214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"
)


@functools.lru_cache(maxsize=64)
def greeting(hostname: str, banner: str) -> Reply:
    """The 220 of a configuration: the same for every session."""
    return Reply(220, (f"{hostname} {banner}".strip(),))


@functools.lru_cache(maxsize=1024)
def hello_reply(hostname: str, verb: str, domain: str, extensions: tuple[str, ...]) -> Reply:
    """The 250 to HELO or EHLO. Most sessions of a server come from a few clients that greet
    alike, so the replies are kept (bounded) and encoded once."""
    greeting = f"{hostname} greets {domain}"
    if verb != "EHLO":
        return Reply(250, (greeting,))
    return Reply(250, (greeting, *extensions))


@functools.lru_cache(maxsize=64)
def bye(hostname: str) -> Reply:
    return Reply.make(221, "2.0.0", f"{hostname} Bye")


class _ClientSettings:
    """The server's UpstreamSettings with a client's identity, kept for the clients seen
    lately: attrs.evolve is slow, and most sessions come from clients seen before. Kept for
    one server settings object at a time, by identity (a reload makes a new one; its
    equality ignores the pool, so it cannot be the key), keyed by the identity's fields (no
    ClientIdentity made, hashed and compared for a client seen before)."""

    LIMIT = 1024

    def __init__(self) -> None:
        self.base: UpstreamSettings | None = None
        self.made: dict[tuple[str, str, str], UpstreamSettings] = {}

    def get(self, base: UpstreamSettings, address: str, helo: str,
            protocol: str) -> UpstreamSettings:
        if base is not self.base:
            self.base, self.made = base, {}
        key = (address, helo, protocol)
        settings = self.made.get(key)
        if settings is None:
            if len(self.made) >= self.LIMIT:
                self.made = {}
            identity = ClientIdentity(address, helo, protocol)
            settings = self.made[key] = attrs.evolve(base, client=identity)
        return settings


client_settings = _ClientSettings()
