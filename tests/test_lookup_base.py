"""The routing vocabulary: destination syntax, lookup key order, and the router over a source."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy.lookup.base import (
    Destination,
    DestinationGroup,
    LookupFailed,
    Route,
    SourceRouter,
    lookup_keys,
    parse_destination,
    parse_destinations,
    parse_group,
)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("mx.example.org", "mx.example.org", 25),
        ("mx.example.org:2525", "mx.example.org", 2525),
        ("MX.Example.ORG", "mx.example.org", 25),
        ("mx.example.org.:587", "mx.example.org", 587),
        ("10.0.0.5:2525", "10.0.0.5", 2525),
        ("localhost", "localhost", 25),
        ("[2001:db8::25]:25", "2001:db8::25", 25),
        ("[2001:db8::25]", "2001:db8::25", 25),
        ("[2001:DB8:0::25]:2600", "2001:db8::25", 2600),
        ("[::1]:2526", "::1", 2526),
        ("[192.0.2.1]:2525", "192.0.2.1", 2525),
        ("mx.example.org:65535", "mx.example.org", 65535),
    ],
)
def test_parse_destination_accepts(text: str, host: str, port: int) -> None:
    assert parse_destination(text) == Destination(host, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mx.example.org:",
        "mx.example.org:0",
        "mx.example.org:65536",
        "mx.example.org:smtp",
        "mx.example.org:２５",
        "mx..example.org",
        "-mx.example.org",
        "mx.example.org:25:25",
        "2001:db8::25",
        "[2001:db8::25",
        "[2001:db8::25]25",
        "[]:25",
        "[abc]:25",
        "[mx.example.org]:25",
        "[1.2.3]:25",
        "mx.example.org\n",
        "mx/example",
    ],
)
def test_parse_destination_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_destination(text)


# Arbitrary text, and text shaped like destinations so that many examples parse.
DESTINATION_LIKE = st.text(max_size=60) | st.from_regex(
    r"(\[[0-9a-fA-F:.]{1,24}\]|[A-Za-z0-9._-]{1,24})(:[0-9]{1,5})?", fullmatch=True
)


@given(DESTINATION_LIKE)
def test_any_text_parses_to_a_destination_that_round_trips_or_raises_value_error(
    text: str,
) -> None:
    try:
        destination = parse_destination(text)
    except ValueError:
        return
    assert parse_destination(str(destination)) == destination


@pytest.mark.parametrize(
    ("destination", "text"),
    [
        (Destination("mx.example.org"), "mx.example.org:25"),
        (Destination("2001:db8::25", 2525), "[2001:db8::25]:2525"),
        (Destination("192.0.2.1", 2600), "192.0.2.1:2600"),
    ],
)
def test_destination_str(destination: Destination, text: str) -> None:
    assert str(destination) == text


def test_destination_rejects_port_out_of_range() -> None:
    with pytest.raises(ValueError):
        Destination("mx.example.org", 0)


def test_pipe_separates_failover_alternatives_in_order() -> None:
    group = parse_group("a.example:2600|b.example|[2001:db8::1]:26")
    assert group.alternatives == (
        Destination("a.example", 2600),
        Destination("b.example", 25),
        Destination("2001:db8::1", 26),
    )


@pytest.mark.parametrize("text", ["a.example|", "|a.example", "a.example||b.example"])
def test_empty_failover_alternative_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_group(text)


def test_whitespace_separates_groups() -> None:
    groups = parse_destinations("10.0.0.5:2525  mx2.example.org\ta|b")
    assert [str(g) for g in groups] == ["10.0.0.5:2525", "mx2.example.org:25", "a:25|b:25"]


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_no_destinations_is_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_destinations(text)


def test_group_needs_an_alternative() -> None:
    with pytest.raises(ValueError):
        DestinationGroup(())


def test_route_str_lists_groups_in_destination_syntax() -> None:
    route = Route(parse_destinations("a:2525|b c"), key="example.org", source="file")
    assert str(route) == "a:2525|b:25 c:25"


@pytest.mark.parametrize(
    ("recipient", "keys"),
    [
        (
            "user@sub.example.org",
            ["user@sub.example.org", "sub.example.org", ".example.org", ".org", "*"],
        ),
        (
            "User@Sub.Example.ORG.",
            ["user@sub.example.org", "sub.example.org", ".example.org", ".org", "*"],
        ),
        ("boss@example.org", ["boss@example.org", "example.org", ".org", "*"]),
        ("root@localhost", ["root@localhost", "localhost", "*"]),
        ("Postmaster", ["postmaster", "*"]),
        ("user@[192.0.2.1]", ["user@[192.0.2.1]", "[192.0.2.1]", "*"]),
        ('"a@b"@example.org', ['"a@b"@example.org', "example.org", ".org", "*"]),
        # A UTF-8 domain (SMTPUTF8) is looked up as A-labels; the local part stays as written.
        (
            "Jöran@Bücher.Example",
            ["jöran@xn--bcher-kva.example", "xn--bcher-kva.example", ".example", "*"],
        ),
        ("用户@例子.测试", ["用户@xn--fsqu00a.xn--0zwm56d", "xn--fsqu00a.xn--0zwm56d",
                           ".xn--0zwm56d", "*"]),
        # Not a valid internationalized name: as written (no routes file holds such a key).
        ("u@☃.example", ["u@☃.example", "☃.example", ".example", "*"]),
    ],
)
def test_lookup_keys_order(recipient: str, keys: list[str]) -> None:
    assert lookup_keys(recipient) == tuple(keys)
    assert lookup_keys(recipient) == tuple(keys)  # the second time from memory


def test_keys_made_before_are_the_same_and_the_memory_of_them_is_bounded() -> None:
    from moxy.lookup import keys as module

    for n in range(module._KNOWN_MAX + 10):
        address = f"u{n}@d{n % 7}.example"
        assert lookup_keys(address) == module.keys_of(address)
    assert len(module._KNOWN) <= module._KNOWN_MAX
    long = "x" * 400 + "@example.org"
    assert lookup_keys(long) == (long, "example.org", ".org", "*")
    assert long not in module._KNOWN
    # Recipients as written: another spelling is another entry, with the same keys.
    assert lookup_keys("U@D1.Example.") == lookup_keys("u@d1.example")


class DictSource:
    """A RouteSource over a dict, recording the keys it was asked."""

    name = "dict"

    def __init__(self, table: dict[str, str]) -> None:
        self.table = {key: parse_destinations(value) for key, value in table.items()}
        self.asked: list[str] = []

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        self.asked.append(key)
        return self.table.get(key)


class DownSource:
    name = "down"

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        raise LookupFailed("backend unreachable")


async def test_router_returns_first_hit_with_its_key_and_source() -> None:
    source = DictSource({".example.org": "relay:587", "*": "fallback"})
    route = await SourceRouter(source).route("anna@lists.example.org")
    assert route == Route(parse_destinations("relay:587"), key=".example.org", source="dict")


async def test_router_stops_at_first_hit() -> None:
    source = DictSource({"example.org": "a", "*": "b"})
    await SourceRouter(source).route("x@example.org")
    assert source.asked == ["x@example.org", "example.org"]


async def test_router_returns_none_when_no_key_matches() -> None:
    source = DictSource({"example.org": "a"})
    assert await SourceRouter(source).route("x@example.net") is None


async def test_router_lets_lookup_failures_through() -> None:
    with pytest.raises(LookupFailed):
        await SourceRouter(DownSource()).route("x@example.org")


def test_destination_options_parse_and_print_back() -> None:
    from moxy.lookup.base import parse_destination

    d = parse_destination("MX.Example.org:2525;tls=required;verify;sni=Mail.Example.org;xclient")
    assert (d.host, d.port, d.tls, d.verify, d.sni, d.xclient) == (
        "mx.example.org", 2525, "required", True, "mail.example.org", True
    )
    assert str(d) == "mx.example.org:2525;tls=required;verify;sni=mail.example.org;xclient"
    assert parse_destination("[::1]:25;verify=no").verify is False
    assert parse_destination("a.example;tls=none") != parse_destination("a.example")


@pytest.mark.parametrize(
    "text", ["a.example;tls=maybe", "a.example;xclient=1", "a.example;sni=", "a.example;",
             "a.example;tls=none;tls=required", "a.example;verify=perhaps"]
)
def test_bad_destination_options_are_errors(text: str) -> None:
    from moxy.lookup.base import parse_destination

    with pytest.raises(ValueError):
        parse_destination(text)
