"""The keys of the daemon side: [relay], [server] user/group, the per-client limits."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from moxy.config import Config, ConfigError, load_config
from moxy.lookup.base import parse_group

ROUTES = '[routes]\nfile = "routes"\n'


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "moxy.toml"
    path.write_text(text)
    return load_config(path)


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.errors


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, ROUTES)
    assert (config.server.user, config.server.group) == ("", "")
    assert config.limits.connections_per_ip == 50
    assert config.limits.connections_per_ip_rate == 0
    assert config.limits.messages_per_ip_rate == 0
    assert config.relay.trusted_networks == ()
    assert config.relay.smarthost is None
    assert config.relay.accounting_only is None


def test_trusted_networks_and_smarthost(tmp_path: Path) -> None:
    config = load(tmp_path, ROUTES + '[relay]\ntrusted_networks = ["192.0.2.0/24", "2001:db8::/48"]'
                  '\nsmarthost = "smtp1.example.net:587|[2001:db8::1]"\n')
    assert config.relay.trusted_networks == (
        ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/48"),
    )
    assert config.relay.smarthost == parse_group("smtp1.example.net:587|[2001:db8::1]:25")


@pytest.mark.parametrize(
    ("relay", "expected"),
    [
        ('trusted_networks = ["192.0.2.1/24"]\nsmarthost = "a"',
         "relay.trusted_networks: '192.0.2.1/24': 192.0.2.1/24 has host bits set"),
        ('trusted_networks = ["nonsense"]\nsmarthost = "a"',
         "relay.trusted_networks: 'nonsense': 'nonsense' does not appear to be an IPv4 or IPv6 "
         "network"),
        ('trusted_networks = "192.0.2.0/24"\nsmarthost = "a"',
         'relay.trusted_networks: expected an array such as ["192.0.2.0/24", "2001:db8::/32"], '
         "got '192.0.2.0/24'"),
        ('trusted_networks = ["192.0.2.0/24"]',
         "relay.smarthost: required with relay.trusted_networks: where mail from them to "
         "domains without a route goes"),
        ('smarthost = "a:25"',
         "relay.trusted_networks: required with relay.smarthost: the clients that may use it"),
        ('trusted_networks = ["192.0.2.0/24"]\nsmarthost = "a:25 b:25"',
         "relay.smarthost: 'a:25 b:25': one destination group (alternatives joined by '|'), "
         "without spaces"),
        ('trusted_networks = ["192.0.2.0/24"]\nsmarthost = "a:99999"',
         "relay.smarthost: 'a:99999': port 99999 out of range 1-65535"),
        ('accounting_only = "a"\nsmarthost = "b"',
         "relay.smarthost: not used with relay.accounting_only, where every recipient goes to "
         "that destination"),
    ],
)
def test_relay_errors_name_the_key(tmp_path: Path, relay: str, expected: str) -> None:
    assert errors(tmp_path, f"{ROUTES}[relay]\n{relay}\n") == [expected]


def test_accounting_only_needs_no_route_source(tmp_path: Path) -> None:
    config = load(tmp_path, '[relay]\naccounting_only = "127.0.0.1:10025"\n')
    assert config.relay.accounting_only == parse_group("127.0.0.1:10025")
    assert config.routes.sources == ()
    # Without it, a route source stays required.
    assert errors(tmp_path, "[relay]\n") == [
        "routes.file: required: without a route source Moxy would refuse all mail"
    ]


def test_user_and_group_must_exist(tmp_path: Path) -> None:
    config = load(tmp_path, ROUTES + '[server]\nuser = "nobody"\ngroup = "nogroup"\n')
    assert (config.server.user, config.server.group) == ("nobody", "nogroup")
    assert errors(tmp_path, ROUTES + '[server]\nuser = "no-such-user-here"\n') == [
        "server.user: no such user 'no-such-user-here'"
    ]
    assert errors(tmp_path, ROUTES + '[server]\nuser = "nobody"\ngroup = "no-such-grp"\n') == [
        "server.group: no such group 'no-such-grp'"
    ]
    assert errors(tmp_path, ROUTES + '[server]\ngroup = "nogroup"\n') == [
        "server.group: needs server.user: the user Moxy serves as"
    ]


@pytest.mark.parametrize("key", ["connections_per_ip", "connections_per_ip_rate",
                                 "messages_per_ip_rate"])
def test_per_client_limits_are_counts_with_0_off(tmp_path: Path, key: str) -> None:
    assert getattr(load(tmp_path, f"{ROUTES}[limits]\n{key} = 0\n").limits, key) == 0
    assert errors(tmp_path, f"{ROUTES}[limits]\n{key} = -1\n") == [
        f"limits.{key}: expected 0 (no limit) or a positive integer, got -1"
    ]
