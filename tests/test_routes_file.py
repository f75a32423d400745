"""The flat-file DomainDB: routes file grammar, errors by file and line, and live reloading."""

from __future__ import annotations

import gc
import itertools
import logging
import os
import threading
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

import moxy.lookup.file
from moxy.lookup.base import SourceRouter, parse_destinations
from moxy.lookup.file import FileSource, RoutesFileError, parse_key, parse_routes

ISSUE_EXAMPLE = """\
# key                 destinations
example.org           10.0.0.5:2525  mx2.example.org
dynip.example         203.0.113.7:2600|198.51.100.9:25
.example.org          relay.example.org:587
boss@example.org      [2001:db8::25]:25
*                     fallback.example.net:2525       # optional default
"""


def routes_of(text: str) -> dict[str, str]:
    """The parsed table in destination syntax, for readable comparisons."""
    return {key: " ".join(map(str, groups)) for key, groups in parse_routes(text, "r").items()}


def errors_of(text: str, filename: str = "routes") -> list[str]:
    with pytest.raises(RoutesFileError) as info:
        parse_routes(text, filename)
    return info.value.errors


# --- grammar ------------------------------------------------------------------------------


def test_issue_example_parses() -> None:
    assert routes_of(ISSUE_EXAMPLE) == {
        "example.org": "10.0.0.5:2525 mx2.example.org:25",
        "dynip.example": "203.0.113.7:2600|198.51.100.9:25",
        ".example.org": "relay.example.org:587",
        "boss@example.org": "[2001:db8::25]:25",
        "*": "fallback.example.net:2525",
    }


@pytest.mark.parametrize(
    ("line", "key", "destinations"),
    [
        ("example.org 10.0.0.5", "example.org", "10.0.0.5:25"),
        ("Example.ORG mx", "example.org", "mx:25"),
        ("example.org. mx", "example.org", "mx:25"),
        ("  example.org\t\tmx  ", "example.org", "mx:25"),
        (".Example.org mx", ".example.org", "mx:25"),
        ("Boss@Example.org mx", "boss@example.org", "mx:25"),
        ("postmaster mx", "postmaster", "mx:25"),
        ("* mx", "*", "mx:25"),
        ("[192.0.2.1] mx", "[192.0.2.1]", "mx:25"),
        ("user@[192.0.2.1] mx", "user@[192.0.2.1]", "mx:25"),
        ("first.last+tag@example.org mx", "first.last+tag@example.org", "mx:25"),
        ("example.org a|b c", "example.org", "a:25|b:25 c:25"),
        ("example.org mx#comment", "example.org", "mx:25"),
        ("example.org mx # a|b", "example.org", "mx:25"),
    ],
)
def test_route_line(line: str, key: str, destinations: str) -> None:
    assert routes_of(line) == {key: destinations}


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "# only a comment\n", "   # indented comment", "\t\n  \n", "#a b c\n"],
)
def test_blank_and_comment_lines_are_ignored(text: str) -> None:
    assert routes_of(text) == {}


def test_crlf_line_endings_are_accepted() -> None:
    assert routes_of("a.example mx\r\nb.example c|d\r\n") == {
        "a.example": "mx:25",
        "b.example": "c:25|d:25",
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("example.org", "key 'example.org' has no destinations"),
        ("example.org # mx", "key 'example.org' has no destinations"),
        ("example.org mx:smtp", "bad port 'smtp'"),
        ("example.org mx:70000", "port 70000 out of range"),
        ("example.org mx..example", "bad host name"),
        ("example.org 2001:db8::1", "IPv6 addresses must be written as [addr]:port"),
        ("example.org [2001:db8::1", "missing ']'"),
        ("example.org a||b", "empty destination"),
        ("example.org mx mx:25", "destination 'mx:25' listed twice"),
        ("*.example.org mx", "a parent domain is written '.example.org'"),
        ("exa..mple.org mx", "bad domain 'exa..mple.org'"),
        (".  mx", "bad domain ''"),
        ("@example.org mx", "empty local part"),
        ("user@ mx", "bad domain ''"),
        ("user@exa_mple!.org mx", "bad domain"),
    ],
)
def test_bad_line_is_reported_with_file_and_line(line: str, message: str) -> None:
    [error] = errors_of(f"# header\n\n{line}\n", "/etc/moxy/routes")
    assert error.startswith("/etc/moxy/routes:3: ")
    assert message in error


def test_duplicate_key_names_both_lines() -> None:
    [error] = errors_of("example.org a\n\nEXAMPLE.org b\n")
    assert error == "routes:3: duplicate key 'example.org' (first at line 1)"


def test_a_duplicate_after_a_bad_first_line_names_the_first_good_one() -> None:
    errors = errors_of("example.org mx:0\nexample.org a\nexample.org b\n")
    assert errors == ["routes:1: 'mx:0': port 0 out of range 1-65535",
                      "routes:3: duplicate key 'example.org' (first at line 2)"]


def test_keys_routed_alike_share_one_parsed_route() -> None:
    """An ISP's many domains on a few mail hosts: a million such lines took 840 MB and ten
    seconds when each line's destinations were parsed (and later freed) on their own."""
    table = parse_routes("a.example  mx1 mx2:2525\nb.example mx1   mx2:2525  # same\n"
                         "c.example mx2:2525 mx1\n", "routes")
    assert table["a.example"] is table["b.example"]
    assert table["c.example"] == parse_destinations("mx2:2525 mx1")
    assert table["c.example"] is not table["a.example"]  # the order is the route's own


def test_every_bad_line_is_reported() -> None:
    errors = errors_of("a.example\nok.example mx\nb.example mx:0\nc.example x:y\n")
    assert [e.split(":")[1] for e in errors] == ["1", "3", "4"]


def test_form_feed_does_not_shift_line_numbers() -> None:
    [error] = errors_of("a.example mx \x0c\nb.example\n")
    assert error.startswith("routes:2: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [("*", "*"), ("EXAMPLE.org.", "example.org"), (".ORG", ".org"), ("Root", "root"),
     # UTF-8 domains are stored as A-labels, where lookups of either spelling look.
     ("Bücher.Example", "xn--bcher-kva.example"), (".bücher.example", ".xn--bcher-kva.example"),
     ("Jöran@Bücher.example.", "jöran@xn--bcher-kva.example")],
)
def test_parse_key_normalises(text: str, key: str) -> None:
    assert parse_key(text) == key


def test_a_domain_that_is_no_valid_idn_is_refused() -> None:
    with pytest.raises(ValueError, match="not a valid internationalized domain name"):
        parse_key("☃.example")


# --- the file source ------------------------------------------------------------------------


def write(path: Path, text: str, *, mtime_ns: int | None = None) -> None:
    """Rewrite in place, with an explicit mtime so the change is seen however fast the test."""
    path.write_text(text)
    stamp = mtime_ns if mtime_ns is not None else path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


@pytest.fixture
def routes_path(tmp_path: Path) -> Path:
    path = tmp_path / "routes"
    write(path, "example.org old.example\n", mtime_ns=1_000_000_000_000)
    return path


async def test_source_answers_from_the_file(routes_path: Path) -> None:
    source = FileSource.open(routes_path)
    assert await source.lookup("example.org") == parse_destinations("old.example")


async def test_source_answers_none_for_absent_key(routes_path: Path) -> None:
    source = FileSource.open(routes_path)
    assert await source.lookup("example.net") is None


async def test_source_is_named_file(routes_path: Path) -> None:
    route = await SourceRouter(FileSource.open(routes_path)).route("a@example.org")
    assert route is not None
    assert (route.key, route.source) == ("example.org", "file")


def test_open_missing_file_fails(tmp_path: Path) -> None:
    with pytest.raises(RoutesFileError) as info:
        FileSource.open(tmp_path / "nope")
    assert info.value.errors == [f"{tmp_path / 'nope'}: cannot read: No such file or directory"]


def test_open_broken_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "routes"
    path.write_text("a.example mx\nb.example\n")
    with pytest.raises(RoutesFileError) as info:
        FileSource.open(path)
    assert info.value.errors == [f"{path}:2: key 'b.example' has no destinations"]


def test_open_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "routes"
    path.write_bytes(b"a.example mx\n# caf\xe9\n")
    with pytest.raises(RoutesFileError) as info:
        FileSource.open(path)
    assert info.value.errors == [f"{path}:2: not UTF-8 text"]


@attrs.define
class Watched:
    """A FileSource over `path` that checks the file at every lookup (reload_interval = 0)."""

    source: FileSource
    path: Path

    async def answer(self) -> str | None:
        """Where example.org goes now."""
        groups = await self.source.lookup("example.org")
        return None if groups is None else " ".join(map(str, groups))


@pytest.fixture
def watched(routes_path: Path) -> Watched:
    return Watched(FileSource.open(routes_path, reload_interval=0.0), routes_path)


def routes_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "moxy.routes" and r.levelno == logging.ERROR
    ]


async def test_change_is_picked_up_after_the_interval(
    routes_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    source = FileSource.open(routes_path, reload_interval=5.0)
    await source.lookup("example.org")  # checks at time 0, next at 5
    write(routes_path, "example.org new.example\n")
    mock_clock.jump(5.0)
    assert await source.lookup("example.org") == parse_destinations("new.example")


async def test_change_is_not_checked_before_the_interval(
    routes_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    source = FileSource.open(routes_path, reload_interval=5.0)
    await source.lookup("example.org")
    write(routes_path, "example.org new.example\n")
    mock_clock.jump(4.9)
    assert await source.lookup("example.org") == parse_destinations("old.example")


async def test_file_replaced_by_rename_is_picked_up(watched: Watched) -> None:
    new = watched.path.with_name("routes.new")
    write(new, "example.org new.example\n", mtime_ns=1_000_000_000_000)  # same mtime as before
    new.replace(watched.path)
    assert await watched.answer() == "new.example:25"


async def test_broken_new_file_keeps_old_table(watched: Watched) -> None:
    write(watched.path, "example.org new.example\nbroken.example\n")
    assert await watched.answer() == "old.example:25"


async def test_broken_new_file_is_logged_once_with_its_errors(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    write(watched.path, "example.org new.example\nbroken.example\n")
    for _ in range(3):
        await watched.answer()
    [error] = routes_errors(caplog)
    assert f"{watched.path}:2: key 'broken.example' has no destinations" in error


async def test_fixed_file_is_loaded_after_a_broken_one(watched: Watched) -> None:
    write(watched.path, "broken.example\n")
    await watched.answer()
    write(watched.path, "example.org fixed.example\n")
    assert await watched.answer() == "fixed.example:25"


async def test_missing_file_keeps_old_table(watched: Watched) -> None:
    watched.path.unlink()
    assert await watched.answer() == "old.example:25"


async def test_missing_file_is_logged_once(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    watched.path.unlink()
    for _ in range(3):
        await watched.answer()
    [error] = routes_errors(caplog)
    assert f"routes file {watched.path} is missing" in error


async def test_file_that_reappears_is_loaded(watched: Watched) -> None:
    watched.path.unlink()
    await watched.answer()
    write(watched.path, "example.org back.example\n")
    assert await watched.answer() == "back.example:25"


async def test_truncated_file_keeps_old_table(watched: Watched) -> None:
    write(watched.path, "")
    assert await watched.answer() == "old.example:25"


async def test_file_of_only_comments_empties_the_table(watched: Watched) -> None:
    write(watched.path, "# example.org old.example\n")
    assert await watched.answer() is None


async def test_lookups_do_not_wait_for_a_reload(
    watched: Watched, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_read = moxy.lookup.file._read

    def slow_read(path: Path) -> object:
        release.wait()
        return real_read(path)

    monkeypatch.setattr(moxy.lookup.file, "_read", slow_read)
    write(watched.path, "example.org new.example\n")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watched.answer)  # reloads; blocked in its thread
        await trio.testing.wait_all_tasks_blocked()
        assert await watched.answer() == "old.example:25"
        release.set()
    assert await watched.answer() == "new.example:25"


# The worked example of docs/routing.md.
DOCS_ROUTES = ISSUE_EXAMPLE + "postmaster  127.0.0.1:2526\n"


@pytest.mark.parametrize(
    ("recipient", "key", "destinations"),
    [
        ("boss@example.org", "boss@example.org", "[2001:db8::25]:25"),
        ("anna@example.org", "example.org", "10.0.0.5:2525 mx2.example.org:25"),
        ("anna@lists.example.org", ".example.org", "relay.example.org:587"),
        ("x@a.b.example.org", ".example.org", "relay.example.org:587"),
        ("x@other.net", "*", "fallback.example.net:2525"),
        ("postmaster", "postmaster", "127.0.0.1:2526"),
        ("Anna@Example.ORG.", "example.org", "10.0.0.5:2525 mx2.example.org:25"),
    ],
)
async def test_docs_worked_example(
    tmp_path: Path, recipient: str, key: str, destinations: str
) -> None:
    path = tmp_path / "routes"
    path.write_text(DOCS_ROUTES)
    route = await SourceRouter(FileSource.open(path)).route(recipient)
    assert route is not None
    assert (route.key, str(route)) == (key, destinations)


# --- telling the route cache ----------------------------------------------------------------


async def test_check_reloads_now_and_calls_on_change(routes_path: Path) -> None:
    source = FileSource.open(routes_path, reload_interval=3600.0)
    changes: list[str] = []
    source.on_change = lambda: changes.append("changed")
    await source.check()
    assert changes == []  # the same file
    write(routes_path, "example.org new.example\n")
    await source.check()
    assert changes == ["changed"]
    assert source.routes["example.org"] == parse_destinations("new.example")


async def test_a_version_that_is_not_loaded_calls_no_on_change(watched: Watched) -> None:
    changes: list[str] = []
    watched.source.on_change = lambda: changes.append("changed")
    write(watched.path, "example.org new.example\nbroken.example\n")
    await watched.source.check()
    write(watched.path, "")  # truncated by an editor
    await watched.source.check()
    assert changes == []


async def test_the_table_is_kept_as_text_and_parsed_when_looked_up(
    routes_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A million customers each on a server of their own: held parsed, the table took 725 MB,
    and while a reload parsed the next one in a thread the collector walked it for up to 2 s
    at a time, holding the event loop. As text the collector never looks at it, and only
    PARSED_KEPT parsed routes are remembered."""
    monkeypatch.setattr(moxy.lookup.file, "PARSED_KEPT", 10)
    write(routes_path, "".join(f"d{i}.example  mx{i}:{2500 + i}|backup{i}\n" for i in range(50)))
    source = FileSource.open(routes_path, reload_interval=3600.0)
    assert not gc.is_tracked(source._snapshot.routes)
    for i in range(50):
        route = await source.lookup(f"D{i}.example")
        assert route == parse_destinations(f"mx{i}:{2500 + i}|backup{i}")
    assert len(source._parsed._known) <= 10
    assert source.routes["d7.example"] == parse_destinations("mx7:2507|backup7")
    assert len(source.routes) == 50 and "d49.example" in source.routes


def test_a_line_that_is_not_utf8_is_named_among_good_ones(routes_path: Path) -> None:
    routes_path.write_bytes(b"a.example mx\n\nb.example mx\xff\nc.example mx\n")
    with pytest.raises(RoutesFileError) as caught:
        FileSource.open(routes_path)
    assert caught.value.errors == [f"{routes_path}:3: not UTF-8 text"]


async def test_a_reload_frees_the_table_it_replaced_a_slice_at_a_time(
    routes_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freed at once, the table of a million routes held the event loop for over a second."""
    monkeypatch.setattr(moxy.lookup.file, "RELEASE_SLICE", 10)
    write(routes_path, "".join(f"d{i}.example mx\n" for i in range(35)))
    source = FileSource.open(routes_path, reload_interval=3600.0)
    replaced = source._snapshot.routes
    write(routes_path, "example.org new.example\n")
    await source.check()
    assert source.routes["example.org"] == parse_destinations("new.example")
    left = [len(replaced)]
    while replaced:
        await trio.sleep(0)
        left.append(len(replaced))
    # Nothing freed before the reload returned; then a slice per round of the scheduler (at
    # most two between two of this task's checkpoints: one after it in a round, one before
    # it in the next), so this task ran between the slices.
    assert left[0] == 35 and left[-1] == 0
    assert all(a - b <= 20 for a, b in itertools.pairwise(left)), left
    assert len(left) >= 3, left
