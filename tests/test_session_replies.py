"""What a session keeps between sessions: its fixed replies and the per-client settings.

Kept values must be exactly what would be made afresh; the end-to-end replies are in
tests/integration/test_session.py and test_starttls.py.
"""

from __future__ import annotations

import attrs

from moxy.config.proxying import Timeouts
from moxy.leg_setup import ClientIdentity
from moxy.session_kept import _ClientSettings, greeting, hello_reply
from moxy.smtp.replies import Reply
from moxy.smtp.server import ServerConnection
from moxy.upstream import UpstreamSettings


def test_greeting_is_the_banner_after_the_hostname() -> None:
    assert greeting("mx.example", "ESMTP Moxy") == Reply(220, ("mx.example ESMTP Moxy",))
    assert greeting("mx.example", "") == Reply(220, ("mx.example",))
    assert greeting("mx.example", "ESMTP Moxy") is greeting("mx.example", "ESMTP Moxy")


def test_hello_replies_follow_the_verb_the_domain_and_the_offer() -> None:
    plain = ServerConnection(max_message_size=1000)
    tls = ServerConnection(max_message_size=1000, starttls=True)
    ehlo = hello_reply("mx.example", "EHLO", "client.example", plain.extensions)
    assert ehlo.lines == (
        "mx.example greets client.example", "PIPELINING", "SIZE 1000", "8BITMIME",
        "ENHANCEDSTATUSCODES", "SMTPUTF8",
    )
    offered = hello_reply("mx.example", "EHLO", "client.example", tls.extensions)
    assert offered.lines == (*ehlo.lines, "STARTTLS")
    other = hello_reply("mx.example", "EHLO", "other.example", plain.extensions)
    assert other.lines[0] == "mx.example greets other.example"
    helo = hello_reply("mx.example", "HELO", "client.example", tls.extensions)
    assert helo == Reply(250, ("mx.example greets client.example",))


def settings() -> UpstreamSettings:
    return UpstreamSettings(helo_name="mx.example", timeouts=Timeouts())


def test_client_settings_are_the_servers_with_the_identity() -> None:
    cache = _ClientSettings()
    base = settings()
    alice = ClientIdentity("192.0.2.1", "a.example", "ESMTP")
    made = cache.get(base, "192.0.2.1", "a.example", "ESMTP")
    assert made == attrs.evolve(base, client=alice) and made.pool is base.pool
    assert made.client == alice
    assert cache.get(base, "192.0.2.1", "a.example", "ESMTP") is made
    assert cache.get(base, "192.0.2.1", "b.example", "ESMTP").client != alice
    assert cache.get(base, "192.0.2.1", "a.example", "SMTP").client == ClientIdentity(
        "192.0.2.1", "a.example", "SMTP"
    )


def test_client_settings_follow_a_new_server_settings_object() -> None:
    cache = _ClientSettings()
    old, new = settings(), settings()  # equal (the pool is no part of equality), not the same
    from_old = cache.get(old, "192.0.2.1", "a.example", "ESMTP")
    from_new = cache.get(new, "192.0.2.1", "a.example", "ESMTP")
    assert from_new is not from_old and from_new.destinations is new.destinations


def test_client_settings_stay_bounded() -> None:
    cache = _ClientSettings()
    base = settings()
    for i in range(cache.LIMIT + 10):
        cache.get(base, f"192.0.2.{i % 250}", f"h{i}.example", "SMTP")
    assert len(cache.made) <= cache.LIMIT
