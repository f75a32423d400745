"""LDAP routes against a real slapd serving the shipped schema and deploy/ldap/example.ldif."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import trio

import moxy.lookup.ldap
from moxy.lookup.base import (
    MAX_VALUE,
    BadRouteData,
    LookupFailed,
    SourceRouter,
    parse_destinations,
)
from moxy.lookup.cache import CachedRouter
from moxy.lookup.ldap import LdapSettings, LdapSource, _render_filter
from peers.dark import black_hole
from peers.example_routes import assert_answers_like_the_routes_file
from peers.sink import free_port, require_binary
from peers.slapd import DEPLOY, ROOT_DN, ROOT_PASSWORD, ROUTES_BASE, Slapd
from peers.tls import TlsFiles


def source(slapd: Slapd, **settings: object) -> LdapSource:
    options: dict[str, object] = {"uri": (slapd.uri,), "base": ROUTES_BASE, "timeout": 2.0}
    options.update(settings)
    return LdapSource(LdapSettings(**options))  # type: ignore[arg-type]


async def test_ldap_answers_like_the_routes_file(slapd: Slapd, routes_file: Path) -> None:
    await assert_answers_like_the_routes_file(source(slapd), routes_file)


async def test_each_attribute_value_is_one_destination_group(slapd: Slapd) -> None:
    groups = await source(slapd).lookup("example.org")
    assert groups == parse_destinations("10.0.0.5:2525 mx2.example.org")
    assert await source(slapd).lookup("shop.example") == parse_destinations(
        "203.0.113.7:2600|198.51.100.9"
    )


async def test_a_value_is_read_like_a_routes_file_value(slapd: Slapd) -> None:
    # docs/ldap.md: white space inside one value separates groups, as in the routes file.
    slapd.add_route("spaced.example", " a.example:2525|b.example  c.example ", "d.example")
    assert await source(slapd).lookup("spaced.example") == parse_destinations(
        "a.example:2525|b.example c.example d.example"
    )


# --- the size of an answer ---------------------------------------------------------------------


def _alternatives(count: int, first: int = 0) -> str:
    """`count` distinct failover alternatives in one value (about 14 octets each)."""
    addresses = (f"10.0.{i // 256 % 256}.{i % 256}:25" for i in range(first, first + count))
    return "|".join(addresses)


async def test_values_larger_than_a_redis_value_may_be_are_bad_data(slapd: Slapd) -> None:
    # Each value alone is under the cap, together they are over it: 64 KiB in all, as in Redis.
    halves = _alternatives(2400), _alternatives(2400, first=2400)
    assert all(len(v) < MAX_VALUE < len(halves[0]) + len(halves[1]) for v in halves)
    slapd.add_route("huge.example", *halves)
    with pytest.raises(BadRouteData, match=rf"moxyDestination holds \d+ octets in 2 values, more "
                       rf"than a route may \({MAX_VALUE}\)"):
        await source(slapd).lookup("huge.example")
    slapd.add_route("large.example", halves[0])  # under the cap: parsed
    groups = await source(slapd).lookup("large.example")
    assert groups is not None and len(groups[0].alternatives) == 2400


async def test_values_are_parsed_in_the_worker_thread(
    slapd: Slapd, parse_threads: Callable[[ModuleType], list[int]]
) -> None:
    threads = parse_threads(moxy.lookup.ldap)
    assert await source(slapd).lookup("example.org") == parse_destinations(
        "10.0.0.5:2525 mx2.example.org"
    )
    assert threads and threading.get_ident() not in threads


# --- filter escaping ---------------------------------------------------------------------------


def test_filter_placeholders_are_escaped() -> None:
    template = "(&(k={key})(d={domain})(l={local}))"
    assert _render_filter(template, "a*(b)\\c\x00@x*.example") == (
        r"(&(k=a\2a\28b\29\5cc\00@x\2a.example)(d=x\2a.example)(l=a\2a\28b\29\5cc\00))"
    )
    assert _render_filter(template, ".example.org") == "(&(k=.example.org)(d=.example.org)(l=))"
    assert _render_filter(template, "*") == r"(&(k=\2a)(d=\2a)(l=))"


@pytest.mark.parametrize(
    "local",
    ["*", "bo*", "*)(moxyRouteKey=*", "boss)", "(boss", "\\2a", "b\\", "boss\x00", "\x00"],
)
async def test_filter_metacharacters_in_an_address_match_only_literally(
    slapd: Slapd, local: str
) -> None:
    # Unescaped, `*@example.org` would be a substring filter matching boss@example.org, and the
    # others would be broken or widened filters. Escaped, none matches an entry: the domain does.
    route = await SourceRouter(source(slapd)).route(f"{local}@example.org")
    assert route is not None
    assert (route.key, route.groups) == (
        "example.org",
        parse_destinations("10.0.0.5:2525 mx2.example.org"),
    )


async def test_an_address_holding_metacharacters_matches_its_own_entry(slapd: Slapd) -> None:
    weird = "we(ir)d*\\x@example.org"
    slapd.add_route(weird, "weird.example.net")
    route = await SourceRouter(source(slapd)).route(weird)
    assert route is not None and route.key == weird
    assert route.groups == parse_destinations("weird.example.net")


async def test_a_catch_all_entry_is_found_by_the_star_key(slapd: Slapd) -> None:
    slapd.add_route("*", "fallback.example.net:2525")
    route = await SourceRouter(source(slapd)).route("x@unknown.example")
    assert route is not None and (route.key, str(route)) == ("*", "fallback.example.net:2525")


# --- search settings ---------------------------------------------------------------------------


async def test_domain_and_local_placeholders(slapd: Slapd) -> None:
    # A directory that keys routes by domain only: every key of a domain finds its entry.
    by_domain = source(slapd, filter="(&(objectClass=moxyRoute)(moxyRouteKey={domain}))")
    assert await by_domain.lookup("anyone@shop.example") == parse_destinations(
        "203.0.113.7:2600|198.51.100.9"
    )
    by_local = source(slapd, filter="(moxyRouteKey={local}@example.org)")
    assert await by_local.lookup("boss@elsewhere.example") == parse_destinations("[2001:db8::25]")


@pytest.mark.parametrize(
    ("scope", "base", "found"),
    [
        ("sub", "dc=example,dc=net", True),
        ("one", ROUTES_BASE, True),
        ("one", "dc=example,dc=net", False),
        ("base", f"moxyRouteKey=example.com,{ROUTES_BASE}", True),
        ("base", f"moxyRouteKey=example.org,{ROUTES_BASE}", False),
    ],
)
async def test_scope_and_base(slapd: Slapd, scope: str, base: str, found: bool) -> None:
    groups = await source(slapd, scope=scope, base=base).lookup("example.com")
    assert (groups is not None) == found


async def test_an_entry_without_the_attribute_is_no_route(slapd: Slapd) -> None:
    # An ISP's tree, say, where only some customer entries carry a route.
    assert await source(slapd, attribute="seeAlso").lookup("example.org") is None


async def test_a_missing_base_fails_the_lookup(slapd: Slapd) -> None:
    with pytest.raises(LookupFailed, match="does not exist"):
        await source(slapd, base="ou=nowhere,dc=example,dc=net").lookup("example.org")


async def test_several_entries_for_one_key_are_bad_data(slapd: Slapd) -> None:
    slapd.add(
        f"moxyRouteKey=alias.example,{ROUTES_BASE}",
        {
            "objectClass": ["moxyRoute"],
            "moxyRouteKey": ["alias.example", "example.com"],
            "moxyDestination": ["other.example.net"],
        },
    )
    with pytest.raises(BadRouteData, match="several entries"):
        await source(slapd).lookup("example.com")


async def test_a_malformed_value_is_bad_data_naming_source_and_key(slapd: Slapd) -> None:
    slapd.add_route("bad.example", "mx.example:0")
    with pytest.raises(BadRouteData, match=r"source ldap for 'bad.example'.*mx.example:0"):
        await CachedRouter([source(slapd)]).route("user@bad.example")


# --- binding and TLS ---------------------------------------------------------------------------


async def test_simple_bind(slapd: Slapd) -> None:
    bound = source(slapd, bind_dn=ROOT_DN, password=ROOT_PASSWORD)
    assert await bound.lookup("example.com") is not None
    wrong = source(slapd, bind_dn=ROOT_DN, password="wrong")
    with pytest.raises(
        LookupFailed, match=r"bind as cn=admin,dc=example,dc=net .*invalidCredentials"
    ):
        await wrong.lookup("example.com")


async def test_starttls_with_a_ca_file(slapd_tls: Slapd) -> None:
    settings = {"uri": (f"ldap://localhost:{slapd_tls.port}",), "starttls": True}
    assert slapd_tls.tls is not None
    good = source(slapd_tls, **settings, ca_file=slapd_tls.tls.ca)
    assert await good.lookup("example.com") == parse_destinations("mail.example.com:2525")
    untrusted = source(slapd_tls, **settings)  # the system CAs do not know the test CA
    with pytest.raises(LookupFailed):
        await untrusted.lookup("example.com")


def test_a_missing_ca_file_is_refused() -> None:
    settings = LdapSettings(
        uri=("ldaps://ldap.example",), base=ROUTES_BASE, ca_file="/nonexistent/ca.pem"
    )
    with pytest.raises(ValueError, match="ca_file"):
        LdapSource(settings)


@pytest.mark.parametrize(
    ("uri", "starttls", "password", "said"),
    [
        ("ldap://ldap.example", False, None, "in clear text"),
        ("ldap://ldap.example", False, "secret", "in clear text, the bind password too"),
        ("ldap://ldap.example", True, "secret", None),
        ("ldaps://ldap.example", False, "secret", None),
    ],
)
def test_a_ca_file_that_no_tls_uses_is_a_warning(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture, uri: str, starttls: bool,
    password: str | None, said: str | None,
) -> None:
    """A CA file says the operator meant TLS; without starttls or ldaps:// the lookups (and the
    bind) go in clear text, which nothing else would tell."""
    caplog.set_level(logging.WARNING, "moxy")
    LdapSource(LdapSettings(uri=(uri,), base=ROUTES_BASE, starttls=starttls,
                            bind_dn="cn=moxy" if password else None, password=password,
                            ca_file=tls_files.ca))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if said is None:
        assert warnings == []
    else:
        assert warnings == ["routes.ldap: ca_file is set, but without starttls or an ldaps:// "
                            f"URI it is not used: the directory is asked {said}"]


@pytest.mark.parametrize("content", ["", "not a certificate\n", "-----BEGIN CERTIFICATE-----\n"])
def test_a_ca_file_without_a_certificate_is_refused_by_check_config(
    tmp_path: Path, content: str
) -> None:
    # ldap3 only checks that the file exists; then every lookup would fail, and check-config
    # would have said OK.
    ca = tmp_path / "ca.pem"
    ca.write_text(content)
    settings = LdapSettings(uri=("ldap://ldap.example",), base=ROUTES_BASE, starttls=True,
                            ca_file=ca)
    with pytest.raises(ValueError, match=rf"^ca_file: {re.escape(str(ca))} holds no usable CA "
                       "certificate: \\[X509"):
        LdapSource(settings)
    config = tmp_path / "moxy.toml"
    config.write_text('[routes]\nchain = ["ldap"]\n[routes.ldap]\nuri = "ldaps://127.0.0.1"\n'
                      'base = "o=x"\nca_file = "ca.pem"\n')
    done = subprocess.run([sys.executable, "-m", "moxy", "check-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert re.fullmatch(rf"moxy: {re.escape(str(config))}: routes\.ldap\.ca_file: "
                        rf"{re.escape(str(ca))} holds no usable CA certificate: [^\n]*\n",
                        done.stderr)


async def test_ldaps_with_a_ca_file(slapd_tls: Slapd) -> None:
    assert slapd_tls.tls is not None
    ldaps = source(
        slapd_tls, uri=(f"ldaps://localhost:{slapd_tls.ldaps_port}",), ca_file=slapd_tls.tls.ca
    )
    assert await ldaps.lookup("example.com") == parse_destinations("mail.example.com:2525")


# --- servers going away ------------------------------------------------------------------------


async def test_a_dead_server_in_the_pool_is_skipped(slapd: Slapd) -> None:
    pool = source(slapd, uri=(f"ldap://127.0.0.1:{free_port()}", slapd.uri))
    for _ in range(4):  # round robin lands on the dead one in turn
        assert await pool.lookup("example.com") is not None


async def test_lookups_fail_while_slapd_is_down_and_recover_after_restart(slapd: Slapd) -> None:
    ldap = source(slapd)
    assert await ldap.lookup("example.com") is not None
    slapd.stop()
    started = time.monotonic()
    with pytest.raises(LookupFailed, match="unreachable"):
        await ldap.lookup("example.com")
    assert time.monotonic() - started < 1.5
    slapd.start()
    assert await ldap.lookup("example.com") is not None


async def test_a_restarted_server_is_reconnected_transparently(slapd: Slapd) -> None:
    ldap = source(slapd)
    assert await ldap.lookup("example.com") is not None  # an idle connection is kept open
    slapd.restart()
    assert await ldap.lookup("example.com") is not None


async def test_a_server_that_drops_syns_is_skipped_within_the_timeout(slapd: Slapd) -> None:
    # A crashed host or a firewall: the connect hangs. It may take only its share of `timeout`,
    # and other threads must not wait for it to end before they connect.
    with black_hole() as dark:
        pool = source(slapd, uri=(f"ldap://{dark}", slapd.uri), timeout=2.0)

        async def burst() -> None:
            found: list[object] = []

            async def one() -> None:
                found.append(await pool.lookup("example.com"))

            async with trio.open_nursery() as nursery:
                for _ in range(8):  # 4 connections at once, 2 of them starting at the dark one
                    nursery.start_soon(one)
            assert len(found) == 8 and None not in found

        started = time.monotonic()
        await burst()
        slapd.restart()  # every connection is reopened, half of them trying the dark one first
        await burst()
        assert await pool.lookup("example.com") is not None
        assert time.monotonic() - started < 4.0


class _SlowToTake(list):  # type: ignore[type-arg]
    """A list that takes a while after giving an item away: a thread switch at the worst
    moment (the other lookup's thread then finds the list empty, or used to find the link
    still there when the code asked for the length first)."""

    def __len__(self) -> int:
        length = super().__len__()
        time.sleep(0.2)
        return length

    def pop(self, *index: int) -> object:
        item = super().pop(*index)
        time.sleep(0.2)
        return item


async def test_two_lookups_never_take_the_same_idle_connection(slapd: Slapd) -> None:
    ldap = source(slapd)
    assert await ldap.lookup("example.com") is not None  # one idle connection
    ldap._idle = _SlowToTake(ldap._idle)  # both lookups run while the first takes it
    found: list[object] = []

    async def one() -> None:
        found.append(await ldap.lookup("example.com"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)
    assert len(found) == 2 and None not in found
    assert len(ldap._all) == 2


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_a_server_that_does_not_answer_times_out(silent_server: int) -> None:
    ldap = LdapSource(
        LdapSettings(uri=(f"ldap://127.0.0.1:{silent_server}",), base=ROUTES_BASE, timeout=0.3)
    )
    started = time.monotonic()
    with pytest.raises(LookupFailed, match=r"no answer within 0.3s"):
        await ldap.lookup("example.com")
    assert time.monotonic() - started < 1.0


# --- settings and shipped files ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"uri": ()}, "at least one"),
        ({"uri": ("http://ldap.example",)}, "not an ldap"),
        ({"uri": ("ldaps://ldap.example",), "starttls": True}, "already TLS"),
        ({"scope": "subtree"}, "not one of base, one, sub"),
        ({"filter": "(moxyRouteKey={address})"}, "bad placeholder"),
        ({"filter": "moxyRouteKey={key}"}, "not an LDAP filter"),
    ],
)
def test_settings_are_checked(settings: dict[str, object], message: str) -> None:
    options: dict[str, object] = {"uri": ("ldap://ldap.example",), "base": "dc=example,dc=net"}
    options.update(settings)
    with pytest.raises(ValueError, match=message):
        LdapSettings(**options)  # type: ignore[arg-type]


def _schema_definitions(text: str) -> list[str]:
    """The `( ... )` of each attributetype/objectclass in slapd.conf schema form, white space
    normalised."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    blocks = "\n".join(lines).split("\n\n")
    return [" ".join(b.split()).split(" ", 1)[1] for b in blocks if b.strip()]


def _ldif_definitions(text: str) -> list[str]:
    unfolded = re.sub(r"\n ", "", text)  # RFC 2849 folding: newline and one space
    values = re.findall(r"^olc(?:AttributeTypes|ObjectClasses): (.*)$", unfolded, re.M)
    return [" ".join(v.split()) for v in values]


def test_the_schema_and_its_cn_config_form_define_the_same_things() -> None:
    from_schema = _schema_definitions((DEPLOY / "moxy.schema").read_text())
    from_ldif = _ldif_definitions((DEPLOY / "moxy.ldif").read_text())
    assert len(from_schema) == 3
    assert from_schema == from_ldif


# --- the commands of docs/ldap.md --------------------------------------------------------------


def ldap_tool(tool: str, slapd: Slapd, *args: str, stdin: str | None = None) -> None:
    """Run ldapadd/ldapmodify as docs/ldap.md does (-w instead of the prompting -W)."""
    binary = require_binary(tool, "ldap-utils")
    argv = [binary, "-x", "-H", slapd.uri, "-D", ROOT_DN, "-w", ROOT_PASSWORD, *args]
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


async def test_the_documented_ldapadd_and_ldapmodify_commands(tmp_path: Path) -> None:
    empty = Slapd(tmp_path / "empty", data=())
    empty.start()
    try:
        ldap_tool("ldapadd", empty, "-c", "-f", str(DEPLOY / "example.ldif"))
        ldap = source(empty)
        assert await ldap.lookup("example.org") == parse_destinations(
            "10.0.0.5:2525 mx2.example.org"
        )
        ldap_tool("ldapadd", empty, stdin=DOCUMENTED_NEW_CUSTOMER)
        assert await ldap.lookup("customer.example") == parse_destinations("192.0.2.44:2525")
        ldap_tool("ldapmodify", empty, stdin=DOCUMENTED_MOVE)
        assert await ldap.lookup("customer.example") == parse_destinations(
            "192.0.2.45:2525|backup.customer.example"
        )
    finally:
        empty.stop()


def _documented(marker: str) -> str:
    """The heredoc that follows `marker` in docs/ldap.md."""
    text = (DEPLOY.parents[1] / "docs" / "ldap.md").read_text()
    after = text[text.index(marker) :]
    body = after[after.index("<<'EOF'\n") + len("<<'EOF'\n") :]
    return body[: body.index("\nEOF\n") + 1]


DOCUMENTED_NEW_CUSTOMER = _documented("A new customer:")
DOCUMENTED_MOVE = _documented("The customer's server moved:")
