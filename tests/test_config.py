"""TOML configuration: defaults, every key's type check, errors that name the key, and paths."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import attrs
import pytest

from moxy.accounting.settings import (
    FileSinkSettings,
    GdbmSinkSettings,
    RedisSinkSettings,
    SyslogSinkSettings,
)
from moxy.config import (
    AccountingSettings,
    Config,
    ConfigError,
    DestinationSettings,
    Limits,
    ListenAddress,
    LogSettings,
    MetricsSettings,
    ProxySettings,
    RelaySettings,
    RoutesSettings,
    ServerSettings,
    Timeouts,
    TlsSettings,
    load_config,
)
from moxy.lookup.settings import CacheSettings, GdbmSettings, LdapSettings, RedisSettings

REPO = Path(__file__).resolve().parent.parent
ROUTES = '[routes]\nfile = "routes"\n'  # the one required key


def with_routes(toml: str) -> str:
    """`toml` plus the required routes file (merged into its [routes] section, if any)."""
    if "[routes]" in toml:
        return toml.replace("[routes]", ROUTES)
    return f"{toml}\n{ROUTES}"


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "moxy.toml"
    path.write_text(text)
    return load_config(path)


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.errors


# --- defaults -----------------------------------------------------------------------------


def test_minimal_file_gives_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, ROUTES)
    assert config == Config(routes=RoutesSettings(file=tmp_path / "routes"), path=config.path)


@pytest.mark.parametrize(
    ("section", "key", "default"),
    [
        (Limits, "command_line", 512),
        (Limits, "text_line", 1000),
        (Limits, "recipients", 100),
        (Limits, "message_size", 50 * 1024 * 1024),
        (Limits, "reply_line", 2048),
        (Timeouts, "upstream_greeting", 300.0),
        (Timeouts, "upstream_mail", 300.0),
        (Timeouts, "upstream_rcpt", 300.0),
        (Timeouts, "upstream_data_init", 120.0),
        (Timeouts, "upstream_data_block", 180.0),
        (Timeouts, "upstream_data_end", 600.0),
        (Timeouts, "client_command", 300.0),
        (ServerSettings, "banner", "ESMTP Moxy"),
        (ServerSettings, "gil_switch_interval", 1e-4),
        (ProxySettings, "split_destinations", False),
        (ProxySettings, "bare_newlines", "refuse"),
        (ProxySettings, "helo_name", ""),
        (RoutesSettings, "reload_interval", 1.0),
        (LogSettings, "file", None),
        (LogSettings, "level", "info"),
        (MetricsSettings, "listen", None),  # metrics are off by default
        (MetricsSettings, "per_destination", False),
    ],
)
def test_default(section: type, key: str, default: object) -> None:
    assert getattr(section(), key) == default


def test_default_listen_is_loopback_port_2525() -> None:
    assert [str(a) for a in ServerSettings().listen] == ["127.0.0.1:2525", "[::1]:2525"]


def test_default_hostname_is_not_empty() -> None:
    assert ServerSettings().hostname


def test_config_remembers_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("moxy.toml").write_text(ROUTES)
    assert load_config("moxy.toml").path == tmp_path / "moxy.toml"


# --- accepted values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "attribute", "value"),
    [
        ('[server]\nhostname = "mx1.example.org"', "server.hostname", "mx1.example.org"),
        ('[server]\nhostname = "mx1.example.org."', "server.hostname", "mx1.example.org"),
        ('[server]\nbanner = "ESMTP ready"', "server.banner", "ESMTP ready"),
        ('[server]\nbanner = ""', "server.banner", ""),
        ("[proxy]\nsplit_destinations = true", "proxy.split_destinations", True),
        ('[proxy]\nbare_newlines = "normalise"', "proxy.bare_newlines", "normalise"),
        ('[proxy]\nbare_newlines = "normalize"', "proxy.bare_newlines", "normalise"),
        ('[proxy]\nbare_newlines = "Refuse"', "proxy.bare_newlines", "refuse"),
        ('[proxy]\nhelo_name = "relay.example.org"', "proxy.helo_name", "relay.example.org"),
        ("[routes]\nreload_interval = 5", "routes.reload_interval", 5.0),
        ("[server]\ngil_switch_interval = 0.005", "server.gil_switch_interval", 0.005),
        ("[routes]\nreload_interval = 0", "routes.reload_interval", 0.0),
        ('[log]\nlevel = "DEBUG"', "log.level", "debug"),
        ('[log]\nlevel = "warning"', "log.level", "warning"),
        ("[limits]\ncommand_line = 2048", "limits.command_line", 2048),
        ("[limits]\ntext_line = 0", "limits.text_line", 0),
        ("[limits]\ntext_line = 4096", "limits.text_line", 4096),
        ("[limits]\nrecipients = 1000", "limits.recipients", 1000),
        ("[limits]\nmessage_size = 1_000", "limits.message_size", 1000),
        ("[limits]\nerrors = 5", "limits.errors", 5),
        ("[limits]\nreply_line = 512", "limits.reply_line", 512),
        ("[limits]\ndata_chunk = 4096", "limits.data_chunk", 4096),
        ("[limits]\nconnections = 10", "limits.connections", 10),
        ("[limits]\nupstream_connections = 5000", "limits.upstream_connections", 5000),
        ("", "limits.upstream_connections", 0),
        ("[timeouts]\nclient_command = 60", "timeouts.client_command", 60.0),
        ("[timeouts]\nclient_data = 0.5", "timeouts.client_data", 0.5),
        ("[timeouts]\nupstream_connect = 10", "timeouts.upstream_connect", 10.0),
        ("[timeouts]\nupstream_greeting = 10", "timeouts.upstream_greeting", 10.0),
        ("[timeouts]\nupstream_command = 10", "timeouts.upstream_command", 10.0),
        ("[timeouts]\nupstream_mail = 10", "timeouts.upstream_mail", 10.0),
        ("[timeouts]\nupstream_rcpt = 10", "timeouts.upstream_rcpt", 10.0),
        ("[timeouts]\nupstream_data_init = 10", "timeouts.upstream_data_init", 10.0),
        ("[timeouts]\nupstream_data_block = 10", "timeouts.upstream_data_block", 10.0),
        ("[timeouts]\nupstream_data_end = 10", "timeouts.upstream_data_end", 10.0),
        (
            '[metrics]\nlisten = "127.0.0.1:9325"',
            "metrics.listen",
            ListenAddress("127.0.0.1", 9325),
        ),
        ('[metrics]\nlisten = "[::1]:9325"', "metrics.listen", ListenAddress("::1", 9325)),
        ("[metrics]\nper_destination = true", "metrics.per_destination", True),
    ],
)
def test_value_is_accepted(tmp_path: Path, toml: str, attribute: str, value: object) -> None:
    section, key = attribute.split(".")
    config = load(tmp_path, with_routes(toml))
    assert getattr(getattr(config, section), key) == value


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ('["127.0.0.1:25"]', ["127.0.0.1:25"]),
        ('["[::1]:2525"]', ["[::1]:2525"]),
        ('["[2001:DB8::1]:25"]', ["[2001:db8::1]:25"]),
        ('["0.0.0.0:25", "[::]:25"]', ["0.0.0.0:25", "[::]:25"]),
        ('["localhost:2525"]', ["localhost:2525"]),
        ('["127.0.0.1:0", "127.0.0.1:0"]', ["127.0.0.1:0", "127.0.0.1:0"]),
    ],
)
def test_listen_addresses(tmp_path: Path, entries: str, expected: list[str]) -> None:
    config = load(tmp_path, with_routes(f"[server]\nlisten = {entries}\n"))
    assert [str(a) for a in config.server.listen] == expected


def test_listen_address_keeps_host_without_brackets() -> None:
    assert ListenAddress.parse("[::1]:2525") == ListenAddress("::1", 2525)


# --- rejected values ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        (
            '[limits]\nrecipients = "ten"',
            "limits.recipients: expected a positive integer, got 'ten'",
        ),
        ("[limits]\nrecipients = 0", "limits.recipients: expected a positive integer, got 0"),
        (
            "[limits]\nupstream_connections = -1",
            "limits.upstream_connections: expected 0 (from the open-file limit) or a positive "
            "integer, got -1",
        ),
        (
            "[server]\ngil_switch_interval = 0",
            "server.gil_switch_interval: expected a positive number of seconds, got 0",
        ),
        ("[limits]\nrecipients = true", "limits.recipients: expected a positive integer, got true"),
        ("[limits]\nrecipients = 1.5", "limits.recipients: expected a positive integer, got 1.5"),
        (
            "[limits]\ncommand_line = 100",
            "limits.command_line: expected an integer of at least 512 (RFC 5321 §4.5.3.1.4), "
            "got 100",
        ),
        (
            "[limits]\ntext_line = 80",
            "limits.text_line: expected 0 (unlimited) or an integer of at least 1000 "
            "(RFC 5321 §4.5.3.1.6), got 80",
        ),
        ("[limits]\nmessage_size = -1", "limits.message_size: expected a positive integer, got -1"),
        (
            "[timeouts]\nupstream_connect = 0",
            "timeouts.upstream_connect: expected a positive number of seconds, got 0",
        ),
        (
            '[timeouts]\nclient_data = "3m"',
            "timeouts.client_data: expected a positive number of seconds, got '3m'",
        ),
        (
            "[timeouts]\nclient_data = inf",
            "timeouts.client_data: expected a positive number of seconds, got inf",
        ),
        (
            "[timeouts]\nclient_data = nan",
            "timeouts.client_data: expected a positive number of seconds, got nan",
        ),
        (
            "[timeouts]\nupstream_rcpt = false",
            "timeouts.upstream_rcpt: expected a positive number of seconds, got false",
        ),
        ("[routes]\nmax_groups = 0", "routes.max_groups: expected a positive integer, got 0"),
        (
            "[routes]\nmax_alternatives = -2",
            "routes.max_alternatives: expected a positive integer, got -2",
        ),
        (
            "[routes]\nreload_interval = -1",
            "routes.reload_interval: expected a non-negative number of seconds, got -1",
        ),
        (
            "[proxy]\nsplit_destinations = 1",
            "proxy.split_destinations: expected true or false, got 1",
        ),
        (
            '[proxy]\nsplit_destinations = "yes"',
            "proxy.split_destinations: expected true or false, got 'yes'",
        ),
        (
            '[proxy]\nbare_newlines = "strip"',
            "proxy.bare_newlines: expected one of 'refuse', 'normalise', got 'strip'",
        ),
        (
            '[log]\nlevel = "verbose"',
            "log.level: expected one of 'debug', 'info', 'warning', 'error', got 'verbose'",
        ),
        ("[log]\nfile = 3", "log.file: expected a file path, got 3"),
        ('[log]\nfile = ""', "log.file: expected a file path, got ''"),
        (
            '[server]\nhostname = "mx 1"',
            "server.hostname: expected a host name such as 'mx.example.org', got 'mx 1'",
        ),
        (
            '[server]\nhostname = ""',
            "server.hostname: expected a host name such as 'mx.example.org', got ''",
        ),
        (
            '[server]\nbanner = "hi\\r\\n250 forged"',
            "server.banner: must not contain control characters (CR, LF, tab, ...)",
        ),
        ("[server]\nbanner = 42", "server.banner: expected a string, got 42"),
        (
            "[server]\nlisten = []",
            'server.listen: expected a non-empty array such as ["127.0.0.1:25"], got an array',
        ),
        (
            '[server]\nlisten = "127.0.0.1:25"',
            'server.listen: expected a non-empty array such as ["127.0.0.1:25"], '
            "got '127.0.0.1:25'",
        ),
        (
            "[server]\nlisten = [25]",
            "server.listen: expected strings such as '127.0.0.1:25', got 25",
        ),
        ('[server]\nlisten = ["127.0.0.1"]', "server.listen: '127.0.0.1': expected host:port"),
        (
            '[server]\nlisten = ["::1:25"]',
            "server.listen: '::1:25': write IPv6 addresses as [address]:port",
        ),
        ('[server]\nlisten = ["[::1]"]', "server.listen: '[::1]': expected [IPv6]:port"),
        (
            '[server]\nlisten = ["[::g]:25"]',
            "server.listen: '[::g]:25': '::g' is not an IPv6 address",
        ),
        (
            '[server]\nlisten = [":25"]',
            "server.listen: ':25': missing host (all interfaces: 0.0.0.0 or [::])",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:70000"]',
            "server.listen: '127.0.0.1:70000': port must be a number from 0 to 65535",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:smtp"]',
            "server.listen: '127.0.0.1:smtp': port must be a number from 0 to 65535",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:25", "127.0.0.1:25"]',
            "server.listen: '127.0.0.1:25' is listed twice",
        ),
        (
            '[metrics]\nlisten = ["127.0.0.1:9325"]',
            "metrics.listen: expected a string such as '127.0.0.1:9325', got an array",
        ),
        ('[metrics]\nlisten = "9325"', "metrics.listen: '9325': expected host:port"),
        (
            '[metrics]\nlisten = "127.0.0.1:0"',
            "metrics.listen: '127.0.0.1:0': port 0 is not allowed here "
            "(Prometheus must know the port)",
        ),
        (
            '[metrics]\nlisten = "localhost:http"',
            "metrics.listen: 'localhost:http': port must be a number from 0 to 65535",
        ),
        (
            "[metrics]\nper_destination = 1",
            "metrics.per_destination: expected true or false, got 1",
        ),
        ("[limits]\nrecipent = 5", "limits.recipent: unknown key (did you mean 'recipients'?)"),
        ("[limits]\nbogus = 5", "limits.bogus: unknown key"),
        ("[limit]\nrecipients = 5", "limit: unknown section (did you mean 'limits'?)"),
        ("[limits.sub]\nx = 1", "limits.sub: unknown section"),
        ("limits = 5", "limits: expected a table [limits], got 5"),
        ("path = 'x'", "path: unknown key"),
    ],
)
def test_bad_value_is_an_error_naming_the_key(tmp_path: Path, toml: str, error: str) -> None:
    assert errors(tmp_path, with_routes(toml)) == [error]


def test_every_error_is_reported(tmp_path: Path) -> None:
    text = with_routes('[limits]\nrecipients = "ten"\nerrors = 0\n[timeouts]\nbogus = 1\n')
    assert [e.split(":")[0] for e in errors(tmp_path, text)] == [
        "limits.recipients",
        "limits.errors",
        "timeouts.bogus",
    ]


def test_routes_file_is_required(tmp_path: Path) -> None:
    assert errors(tmp_path, "[server]\nbanner = 'x'\n") == [
        "routes.file: required: without a route source Moxy would refuse all mail"
    ]


def test_bad_routes_file_value_is_not_also_reported_missing(tmp_path: Path) -> None:
    assert errors(tmp_path, "[routes]\nfile = 5\n") == ["routes.file: expected a file path, got 5"]


# --- route sources: [routes] chain and its tables ------------------------------------------

LDAP = '[routes.ldap]\nuri = "ldap://ldap1.example.net"\nbase = "ou=routes,dc=example,dc=net"\n'
REDIS = "[routes.redis]\n"
GDBM = '[routes.gdbm]\npath = "routes.db"\n'


def test_without_chain_the_routes_file_is_the_only_source(tmp_path: Path) -> None:
    routes = load(tmp_path, ROUTES).routes
    assert (routes.chain, routes.sources) == (None, ("file",))
    assert (routes.gdbm, routes.ldap, routes.redis) == (None, None, None)
    assert routes.cache == CacheSettings()


def test_a_chain_of_every_source(tmp_path: Path) -> None:
    text = '[routes]\nchain = ["redis", "LDAP", "gdbm", "file"]\nfile = "routes"\n'
    routes = load(tmp_path, text + LDAP + REDIS + GDBM).routes
    assert routes.sources == ("redis", "ldap", "gdbm", "file")
    assert routes.gdbm == GdbmSettings(tmp_path / "routes.db")
    assert routes.ldap == LdapSettings(uri=("ldap://ldap1.example.net",), base=LDAP.split('"')[3])
    assert routes.redis == RedisSettings()


def test_every_key_of_the_source_tables(tmp_path: Path) -> None:
    text = """\
[routes]
chain = ["ldap", "redis", "gdbm"]

[routes.gdbm]
path = "db/routes.db"
reload_interval = 0

[routes.ldap]
uri = ["ldaps://ldap1.example.net", "ldaps://ldap2.example.net"]
base = "ou=routes,dc=example,dc=net"
scope = "one"
filter = "(&(objectClass=moxyRoute)(moxyRouteKey={domain}))"
attribute = "mailRoutingAddress"
bind_dn = "cn=moxy,ou=services,dc=example,dc=net"
password = "secret"
starttls = false
ca_file = "ca.pem"
timeout = 2

[routes.redis]
url = "rediss://:secret@redis1.example.net:6380/1"
key_prefix = "isp1:"
channel = "isp1:routes"
timeout = 0.5
sentinel_master = "moxy"
sentinels = ["sentinel1.example.net:26379", "[2001:db8::1]:26379"]

[routes.cache]
ttl = 0
negative_ttl = 5
stale_grace = 0
max_entries = 0
"""
    routes = load(tmp_path, text).routes
    assert routes.gdbm == GdbmSettings(tmp_path / "db" / "routes.db", reload_interval=0.0)
    assert routes.ldap == LdapSettings(
        uri=("ldaps://ldap1.example.net", "ldaps://ldap2.example.net"),
        base="ou=routes,dc=example,dc=net",
        scope="one",
        filter="(&(objectClass=moxyRoute)(moxyRouteKey={domain}))",
        attribute="mailRoutingAddress",
        bind_dn="cn=moxy,ou=services,dc=example,dc=net",
        password="secret",
        starttls=False,
        ca_file=tmp_path / "ca.pem",
        timeout=2.0,
    )
    assert routes.redis == RedisSettings(
        url="rediss://:secret@redis1.example.net:6380/1",
        key_prefix="isp1:",
        channel="isp1:routes",
        timeout=0.5,
        sentinel_master="moxy",
        sentinels=("sentinel1.example.net:26379", "[2001:db8::1]:26379"),
    )
    assert routes.cache == CacheSettings(ttl=0, negative_ttl=5, stale_grace=0, max_entries=0)


def test_the_cache_table_alone_tunes_the_flat_file_setup(tmp_path: Path) -> None:
    routes = load(tmp_path, ROUTES + "[routes.cache]\nttl = 5\n").routes
    assert routes.sources == ("file",)
    assert routes.cache == CacheSettings(ttl=5.0)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[routes]\nchain = ["ldap"]\n',
            ["routes.chain: 'ldap' needs a [routes.ldap] table"],
        ),
        (
            '[routes]\nchain = ["redis", "gdbm"]\n',
            [
                "routes.chain: 'redis' needs a [routes.redis] table",
                "routes.chain: 'gdbm' needs a [routes.gdbm] table",
            ],
        ),
        (
            '[routes]\nchain = ["file"]\n',
            ["routes.chain: 'file' needs routes.file (the routes file)"],
        ),
        (
            '[routes]\nchain = ["mysql", "redsi"]\n' + REDIS,
            [
                "routes.chain: unknown route source 'mysql' (known: redis, ldap, gdbm, file)",
                "routes.chain: unknown route source 'redsi' (did you mean 'redis'?)",
            ],
        ),
        (
            '[routes]\nchain = ["redis", "redis"]\n' + REDIS,
            ["routes.chain: 'redis' is listed twice"],
        ),
        (
            "[routes]\nchain = []\n",
            [
                "routes.chain: expected a non-empty array such as "
                '["redis", "ldap", "gdbm", "file"], got an array'
            ],
        ),
        (
            '[routes]\nchain = "redis"\n' + REDIS,
            [
                "routes.chain: expected a non-empty array such as "
                """["redis", "ldap", "gdbm", "file"], got 'redis'"""
            ],
        ),
        (
            ROUTES + LDAP,
            [
                "routes.chain: required with a [routes.ldap] table: the sources in the order to "
                'ask them, e.g. ["redis", "ldap", "gdbm", "file"]'
            ],
        ),
        (
            '[routes]\nchain = ["redis"]\nfile = "routes"\n' + REDIS + GDBM,
            [
                "routes.file: set, but 'file' is not in routes.chain",
                "routes.gdbm: configured, but 'gdbm' is not in routes.chain",
            ],
        ),
        (
            '[routes]\nchain = ["ldap"]\n[routes.ldap]\n',
            ["routes.ldap.uri: required", "routes.ldap.base: required"],
        ),
        (
            '[routes]\nchain = ["gdbm"]\n[routes.gdbm]\nreload_interval = 1\n',
            ["routes.gdbm.path: required"],
        ),
        (
            '[routes]\nchain = ["ldap"]\n' + LDAP + 'scope = "subtree"\n',
            ["routes.ldap.scope: 'subtree' is not one of base, one, sub"],
        ),
        (
            '[routes]\nchain = ["ldap"]\n' + LDAP.replace("ldap://", "http://"),
            ["routes.ldap.uri: 'http://ldap1.example.net' is not an ldap:// or ldaps:// URI"],
        ),
        (
            '[routes]\nchain = ["ldap"]\n[routes.ldap]\nuri = 5\nbase = "o=x"\nstarttls = 1\n',
            [
                "routes.ldap.uri: expected a string or an array of strings, got 5",
                "routes.ldap.starttls: expected true or false, got 1",
            ],
        ),
        (
            '[routes]\nchain = ["ldap"]\n' + LDAP + "timeout = 0\nfliter = '(x={key})'\n",
            [
                "routes.ldap.fliter: unknown key (did you mean 'filter'?)",
                "routes.ldap.timeout: expected a positive number of seconds, got 0",
            ],
        ),
        (
            '[routes]\nchain = ["redis"]\n[routes.redis]\nurl = "127.0.0.1:6379"\n',
            ["routes.redis.url: '127.0.0.1:6379' must start with redis://, rediss:// or unix://"],
        ),
        (
            '[routes]\nchain = ["redis"]\n[routes.redis]\nurl = "redis://h/0?socket_timeout=x"\n',
            ["routes.redis.url: 'redis://h/0?socket_timeout=x': Invalid value for "
             "'socket_timeout' in connection URL."],
        ),
        (
            '[routes]\nchain = ["redis"]\n[routes.redis]\nurl = "redis://h:6380/l"\n',
            ["routes.redis.url: 'redis://h:6380/l': the path '/l' is not a database number "
             "(/0, /1, ...)"],
        ),
        (
            '[routes]\nfile = "r"\n[accounting]\nsinks = ["redis"]\n[accounting.redis]\n'
            'url = "rediss://h/db1"\n',
            ["accounting.redis.url: 'rediss://h/db1': the path '/db1' is not a database number "
             "(/0, /1, ...)"],
        ),
        (
            '[routes]\nchain = ["redis"]\n[routes.redis]\nurl = "redis://host:port/0"\n',
            [
                "routes.redis.url: 'redis://host:port/0': Port could not be cast to integer "
                "value as 'port'"
            ],
        ),
        (
            '[routes]\nchain = ["redis"]\n[routes.redis]\nsentinel_master = "moxy"\n',
            ["routes.redis: sentinels and sentinel_master go together: set both or neither"],
        ),
        (
            ROUTES + "[routes.cache]\nttl = -1\nmax_entries = 1.5\n",
            [
                "routes.cache.ttl: expected a non-negative number of seconds, got -1",
                "routes.cache.max_entries: expected a non-negative integer, got 1.5",
            ],
        ),
        (
            '[routes]\nchain = ["ldap"]\nldap = "ldap://ldap1.example.net"\n',
            ["routes.ldap: expected a table [routes.ldap], got 'ldap://ldap1.example.net'"],
        ),
        (
            ROUTES + "[routes.memcache]\nx = 1\n",
            ["routes.memcache: unknown section (did you mean 'cache'?)"],
        ),
    ],
)
def test_route_source_errors_name_the_key(tmp_path: Path, toml: str, expected: list[str]) -> None:
    assert errors(tmp_path, toml) == expected


# --- accounting -----------------------------------------------------------------------------


def test_accounting_defaults_to_the_file_sink_on_the_log_file(tmp_path: Path) -> None:
    config = load(tmp_path, ROUTES + '[log]\nfile = "moxy.log"\n')
    assert config.accounting == AccountingSettings(sinks=("file",), queue=10_000)
    assert config.file_sink == FileSinkSettings(tmp_path / "moxy.log", "text")
    assert load(tmp_path, ROUTES).file_sink == FileSinkSettings(None, "text")  # stderr


def test_accounting_tables_are_read_into_the_sink_settings(tmp_path: Path) -> None:
    config = load(tmp_path, ROUTES + """
[log]
file = "moxy.log"
[accounting]
sinks = ["File", "syslog", "gdbm", "redis"]
queue = 50
[accounting.file]
path = "events.jsonl"
format = "json"
[accounting.syslog]
address = "tcp://[::1]:601"
facility = "local5"
tag = "mx"
[accounting.gdbm]
path = "acct.db"
flush_interval = 2
[accounting.redis]
url = "redis://redis.example.net:6379/1"
sentinels = "s1:26379"
sentinel_master = "acct"
""")
    accounting = config.accounting
    assert (accounting.sinks, accounting.queue) == (("file", "syslog", "gdbm", "redis"), 50)
    assert config.file_sink == FileSinkSettings(tmp_path / "events.jsonl", "json")
    assert accounting.syslog == SyslogSinkSettings("tcp://[::1]:601", "local5", "mx")
    assert accounting.gdbm == GdbmSinkSettings(tmp_path / "acct.db", 2.0)
    assert accounting.redis is not None and accounting.redis.sentinels == ("s1:26379",)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[accounting]\nsinks = ["file", "sylog", "file", 3]\n',
            [
                "accounting.sinks: unknown accounting sink 'sylog' (did you mean 'syslog'?)",
                "accounting.sinks: 'file' is listed twice",
                "accounting.sinks: expected sink names such as 'file', got 3",
            ],
        ),
        ('[accounting]\nsinks = "file"\n',
         ["accounting.sinks: expected an array such as [\"file\", \"syslog\"], got 'file'"]),
        ("[accounting]\nqueue = 0\n", ["accounting.queue: expected a positive integer, got 0"]),
        (
            '[accounting]\nsinks = ["gdbm"]\n',
            ["accounting.sinks: 'gdbm' needs an [accounting.gdbm] table (with its path)"],
        ),
        ('[accounting]\nsinks = ["gdbm"]\n[accounting.gdbm]\n',
         ["accounting.gdbm.path: required"]),
        (
            '[accounting.syslog]\ntag = "mx"\n[accounting.redis]\n',
            [
                "accounting.syslog: configured, but 'syslog' is not in accounting.sinks",
                "accounting.redis: configured, but 'redis' is not in accounting.sinks",
            ],
        ),
        (
            '[accounting]\nsinks = []\n[accounting.file]\nformat = "json"\n',
            ["accounting.file: configured, but 'file' is not in accounting.sinks"],
        ),
        ('[accounting.file]\nformat = "xml"\n',
         ["accounting.file.format: 'xml' is not one of 'text', 'json'"]),
        ('[accounting]\nsinks = ["syslog"]\n[accounting.syslog]\naddress = "udp://loghost"\n',
         ["accounting.syslog.address: 'udp://loghost': expected udp://host:port"]),
        ('[accounting]\nsinks = ["syslog"]\n[accounting.syslog]\naddress = "loghost:514"\n',
         ["accounting.syslog.address: 'loghost:514' is neither a socket path such as "
          "'/dev/log' nor udp://host:port or tcp://host:port"]),
        ('[accounting]\nsinks = ["syslog"]\n[accounting.syslog]\nfacility = "mial"\n',
         ["accounting.syslog.facility: 'mial' is not a syslog facility such as 'mail'"]),
        (
            '[accounting]\nsinks = ["redis"]\n[accounting.redis]\nbatch_size = 0\nfoo = 1\n',
            [
                "accounting.redis.foo: unknown key",
                "accounting.redis.batch_size: must be at least 1, got 0",
            ],
        ),
        ('[accounting]\nsinks = ["redis"]\n[accounting.redis]\nmax_members = -1\n',
         ["accounting.redis.max_members: expected a non-negative integer, got -1"]),
    ],
)
def test_accounting_errors_name_the_key(tmp_path: Path, toml: str, expected: list[str]) -> None:
    assert errors(tmp_path, ROUTES + toml) == expected


# --- the file itself ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.errors == ["cannot read: No such file or directory"]
    assert info.value.path == tmp_path / "nope.toml"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.errors == ["cannot read: Is a directory"]


def test_invalid_toml_gives_line_and_column(tmp_path: Path) -> None:
    [error] = errors(tmp_path, "[server]\nbanner = \n")
    assert re.fullmatch(r"invalid TOML: .*\(at line 2, column \d+\)", error)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "moxy.toml"
    path.write_bytes(b'[server]\nbanner = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == ["not UTF-8 text (byte 22)"]


# --- paths --------------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "moxy.toml").write_text(
        '[routes]\nfile = "routes"\n[log]\nfile = "../log/moxy.log"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/moxy.toml")
    assert config.routes.file == tmp_path / "etc" / "routes"
    assert config.log.file == tmp_path / "etc" / ".." / "log" / "moxy.log"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    config = load(tmp_path, '[routes]\nfile = "/etc/moxy/routes"\n')
    assert config.routes.file == Path("/etc/moxy/routes")


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/mail")
    config = load(tmp_path, '[routes]\nfile = "~/routes"\n')
    assert config.routes.file == Path("/home/mail/routes")


# --- the example and the docs ---------------------------------------------------------------

SECTIONS = {
    "server": ServerSettings,
    "proxy": ProxySettings,
    "routes": RoutesSettings,
    "log": LogSettings,
    "limits": Limits,
    "timeouts": Timeouts,
    "accounting": AccountingSettings,
    "metrics": MetricsSettings,
    "destinations": DestinationSettings,
    "relay": RelaySettings,
    "tls": TlsSettings,
}
ACCOUNTING_TABLES = {
    "accounting.file": FileSinkSettings,
    "accounting.syslog": SyslogSinkSettings,
    "accounting.gdbm": GdbmSinkSettings,
    "accounting.redis": RedisSinkSettings,
}
ROUTE_TABLES = {
    "routes.gdbm": GdbmSettings,
    "routes.ldap": LdapSettings,
    "routes.redis": RedisSettings,
    "routes.cache": CacheSettings,
}
ALL_KEYS = [
    (section, f.name)
    for section, cls in {**SECTIONS, **ROUTE_TABLES, **ACCOUNTING_TABLES}.items()
    for f in attrs.fields(cls)
    if f"{section}.{f.name}" not in {**ROUTE_TABLES, **ACCOUNTING_TABLES}
]


def test_sections_are_the_config_fields() -> None:
    assert [f.name for f in attrs.fields(Config)] == [*SECTIONS, "path"]
    hints = typing.get_type_hints(RoutesSettings)
    tables = {
        f"routes.{name}": cls
        for name, hint in hints.items()
        for cls in typing.get_args(hint) or (hint,)
        if attrs.has(cls)
    }
    assert tables == ROUTE_TABLES
    hints = typing.get_type_hints(AccountingSettings)
    tables = {
        f"accounting.{name}": cls
        for name, hint in hints.items()
        for cls in typing.get_args(hint) or (hint,)
        if attrs.has(cls)
    }
    assert tables == ACCOUNTING_TABLES


def test_example_config_loads() -> None:
    config = load_config(REPO / "examples" / "moxy.toml")
    assert [str(a) for a in config.server.listen] == ["127.0.0.1:2525"]
    assert config.routes.file == REPO / "examples" / "routes"
    assert config.log.file is None


@pytest.mark.parametrize(("section", "key"), ALL_KEYS)
def test_example_config_shows_every_key(section: str, key: str) -> None:
    text = (REPO / "examples" / "moxy.toml").read_text()
    # The route source tables are there commented out, as "# [routes.ldap]".
    body = re.split(r"\n(?:# )?\[", text.split(f"[{section}]\n", 1)[1], maxsplit=1)[0]
    assert re.search(rf"^(# )?{key} = ", body, re.MULTILINE)


@pytest.mark.parametrize(("section", "key"), ALL_KEYS)
def test_configuration_doc_describes_every_key(section: str, key: str) -> None:
    text = (REPO / "docs" / "configuration.md").read_text()
    body = text.split(f"## `[{section}]`\n", 1)[1].split("\n## ", 1)[0]
    assert f"| `{key}` |" in body


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[tls]\ncert = "a.pem"\n', "tls.key: required with tls.cert and tls.key: both or neither"),
        ("[tls]\nrequire = true\n", "tls.require: needs tls.cert and tls.key"),
        ('[tls]\nupstream = "always"\n', "tls.upstream: expected one of 'none', 'opportunistic'"),
        ('[tls]\nmin_version = "SSLv3"\n', "tls.min_version: expected one of 'TLSv1'"),
    ],
)
def test_tls_errors_name_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    assert any(e.startswith(expected) for e in errors(tmp_path, toml)), errors(tmp_path, toml)


def test_tls_keys(tmp_path: Path) -> None:
    text = with_routes('[tls]\ncert = "c.pem"\nkey = "k.pem"\nmin_version = "tlsv1.3"\n')
    tls = load(tmp_path, text).tls
    assert (tls.cert, tls.key, tls.min_version) == (tmp_path / "c.pem", tmp_path / "k.pem",
                                                    "TLSv1.3")
    assert (tls.upstream, tls.upstream_verify, tls.require) == ("opportunistic", False, False)


def test_proxy_listeners(tmp_path: Path) -> None:
    text = with_routes('[server]\nlisten_proxy = ["127.0.0.1:2526"]\n'
                       'proxy_protocol_from = ["10.0.0.0/8", "::1"]\n')
    server = load(tmp_path, text).server
    assert [str(a) for a in server.listen_proxy] == ["127.0.0.1:2526"]
    assert [str(n) for n in server.proxy_protocol_from] == ["10.0.0.0/8", "::1/128"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[server]\nlisten_proxy = ["127.0.0.1:2526"]\n', "server.proxy_protocol_from: required"),
        ('[server]\nlisten = ["127.0.0.1:25"]\nlisten_proxy = ["127.0.0.1:25"]\n'
         'proxy_protocol_from = ["10.0.0.0/8"]\n', "server.listen_proxy: '127.0.0.1:25' is also"),
        ('[server]\nproxy_protocol_from = ["10.0.0.0/33"]\n',
         "server.proxy_protocol_from: '10.0.0.0/33'"),
        ('[server]\nlisten_proxy = ["localhost:2526"]\nproxy_protocol_from = ["::1"]\n',
         "server.listen_proxy: 'localhost:2526': write an IP address"),
    ],
)
def test_proxy_listener_errors(tmp_path: Path, toml: str, expected: str) -> None:
    found = errors(tmp_path, with_routes(toml))
    assert any(e.startswith(expected) for e in found), found
