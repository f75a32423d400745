"""Per-client limits as counted (with a hand-driven clock), and the relay policy's address rules."""

from __future__ import annotations

import pytest

from moxy.clientlimits import (
    CONNECTION_RATE,
    CONNECTIONS_PER_IP,
    MESSAGE_RATE,
    ClientLimiter,
    RateLimit,
    client_key,
)
from moxy.config import Limits
from moxy.relay import RelayPolicy, sender_routed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ipv4_counts_per_address_and_ipv6_per_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("unknown") == "unknown"


def test_connections_per_ip_are_released() -> None:
    limiter = ClientLimiter(Limits(connections_per_ip=2))
    assert limiter.admit("2001:db8::1") is None
    assert limiter.admit("2001:db8::2") is None  # the same /64
    assert limiter.admit("2001:db8::3") == CONNECTIONS_PER_IP
    assert limiter.admit("192.0.2.1") is None  # another client is not affected
    limiter.release("2001:db8::1")
    assert limiter.admit("2001:db8::3") is None
    assert limiter.refused == {CONNECTIONS_PER_IP: 1}
    for ip in ("2001:db8::2", "2001:db8::3", "192.0.2.1"):
        limiter.release(ip)
    assert limiter.open_connections("2001:db8::2") == 0


def test_connections_per_ip_0_is_no_limit() -> None:
    limiter = ClientLimiter(Limits(connections_per_ip=0))
    assert all(limiter.admit("192.0.2.1") is None for _ in range(5000))


def test_rate_allows_a_burst_then_refills_over_the_minute() -> None:
    clock = Clock()
    rate = RateLimit(6, clock)  # one every 10 s on average
    assert [rate.allow("a") for _ in range(7)] == [True] * 6 + [False]
    assert rate.allow("b")  # per key
    clock.now += 10
    assert rate.allow("a")
    assert not rate.allow("a")
    clock.now += 60
    assert [rate.allow("a") for _ in range(7)] == [True] * 6 + [False]


def test_rate_buckets_of_quiet_clients_are_dropped() -> None:
    clock = Clock()
    rate = RateLimit(10, clock)
    for n in range(5000):
        rate.allow(f"10.0.{n // 256}.{n % 256}")
    clock.now += 61
    for n in range(5000):
        rate.allow(f"10.1.{n // 256}.{n % 256}")
    assert len(rate) < 10000


def test_limiter_rates_and_reconfigure() -> None:
    clock = Clock()
    limiter = ClientLimiter(
        Limits(connections_per_ip_rate=2, messages_per_ip_rate=1), clock=clock
    )
    assert limiter.admit("192.0.2.1") is None
    assert limiter.admit("192.0.2.1") is None
    assert limiter.admit("192.0.2.1") == CONNECTION_RATE
    assert limiter.allow_message("192.0.2.1")
    assert not limiter.allow_message("192.0.2.1")
    assert limiter.refused == {CONNECTION_RATE: 1, MESSAGE_RATE: 1}
    limiter.configure(Limits())  # a reload: the rates are off now, open counts stay
    assert limiter.admit("192.0.2.1") is None
    assert limiter.allow_message("192.0.2.1")
    assert limiter.open_connections("192.0.2.1") == 3


def test_messages_over_the_rate_are_logged_once_per_10_s_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """security.md: at most one line every 10 seconds (it was a line per MAIL refused)."""
    clock = Clock()
    limiter = ClientLimiter(Limits(messages_per_ip_rate=1), clock=clock)
    assert limiter.allow_message("192.0.2.1")
    for _ in range(5):
        assert not limiter.allow_message("192.0.2.1")
    clock.now += 10
    limiter.message_rate.per_minute = 1  # no refill to speak of: 10 s at 1 a minute
    for _ in range(3):
        assert not limiter.allow_message("192.0.2.1")
    assert [r.getMessage() for r in caplog.records] == [
        "per-client limit: closed 1 session over limits.messages_per_ip_rate (latest from "
        "192.0.2.1)",
        "per-client limit: closed 5 sessions over limits.messages_per_ip_rate (latest from "
        "192.0.2.1)",
    ]


def test_a_reload_with_the_same_rates_gives_no_client_a_new_burst() -> None:
    """Each SIGHUP made new, full buckets: a client over its rate had a new burst after every
    reload (operations.md: the rates carry over)."""
    clock = Clock()
    limits = Limits(connections_per_ip_rate=2, messages_per_ip_rate=1)
    limiter = ClientLimiter(limits, clock=clock)
    assert [limiter.admit("192.0.2.1") for _ in range(3)] == [None, None, CONNECTION_RATE]
    assert [limiter.allow_message("192.0.2.1") for _ in range(2)] == [True, False]
    limiter.configure(limits)
    assert limiter.admit("192.0.2.1") == CONNECTION_RATE
    assert not limiter.allow_message("192.0.2.1")
    limiter.configure(Limits(connections_per_ip_rate=4, messages_per_ip_rate=1))
    assert limiter.admit("192.0.2.1") == CONNECTION_RATE  # a larger bucket, refilled in time
    clock.now += 30  # half a minute: two connections' worth at 4 a minute
    assert limiter.admit("192.0.2.1") is None


@pytest.mark.parametrize(
    ("address", "routed"),
    [
        ("user@example.org", False),
        ("postmaster", False),
        ("user%other.test@example.org", True),
        ('"user@other.test"@example.org', True),
        ("other.test!user@example.org", True),
        ("first.last+tag@example.org", False),
    ],
)
def test_sender_specified_routing(address: str, routed: bool) -> None:
    assert sender_routed(address) is routed


def test_trusted_networks_match_addresses_and_mapped_ipv4() -> None:
    import ipaddress

    policy = RelayPolicy(
        trusted_networks=(ipaddress.ip_network("127.0.0.2/32"),
                          ipaddress.ip_network("2001:db8::/32")),
    )
    assert policy.trusts("127.0.0.2")
    assert policy.trusts("::ffff:127.0.0.2")
    assert policy.trusts("2001:db8:5::1")
    assert not policy.trusts("127.0.0.3")
    assert not policy.trusts("unknown")
    assert policy.fallback(True) is None  # no smarthost: nowhere to send
