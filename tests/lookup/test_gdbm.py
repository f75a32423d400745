"""GDBM routes: `make_db` (postmap-like build) and `GdbmSource` (read-only, follows replacements).

Real GDBM files in tmp_path; time is trio's MockClock where the reload interval matters.
"""

from __future__ import annotations

import dbm.gnu
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio.testing

from moxy.lookup.base import BadRouteData, LookupFailed, parse_destinations
from moxy.lookup.cache import CachedRouter
from moxy.lookup.file import RoutesFileError
from moxy.lookup.gdbm import COUNT_KEY, DamagedFile, GdbmSource, check_db, make_db
from peers.example_routes import assert_answers_like_the_routes_file


def write_db(path: Path, entries: dict[bytes, bytes]) -> None:
    with dbm.gnu.open(str(path), "n") as db:
        for key, value in entries.items():
            db[key] = value


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_make_db_stores_every_route_in_canonical_form(routes_file: Path, tmp_path: Path) -> None:
    db_path = tmp_path / "routes.db"
    assert make_db(routes_file, db_path) == 5
    with dbm.gnu.open(str(db_path), "r") as db:
        stored = {key.decode(): db[key].decode() for key in db.keys()}  # noqa: SIM118 (gdbm has no __iter__)
    assert stored.pop(COUNT_KEY.decode()) == "5"  # what a reader checks the file against
    assert stored == {
        "example.org": "10.0.0.5:2525 mx2.example.org:25",
        "shop.example": "203.0.113.7:2600|198.51.100.9:25",
        ".example.org": "relay.example.org:587",
        "boss@example.org": "[2001:db8::25]:25",
        "example.com": "mail.example.com:2525",
    }
    assert leftovers(tmp_path) == []


async def test_gdbm_answers_like_the_routes_file(routes_file: Path, tmp_path: Path) -> None:
    make_db(routes_file, tmp_path / "routes.db")
    await assert_answers_like_the_routes_file(GdbmSource(tmp_path / "routes.db"), routes_file)


def test_make_db_refuses_a_bad_routes_file_and_leaves_the_old_db(tmp_path: Path) -> None:
    db_path = tmp_path / "routes.db"
    write_db(db_path, {b"old.example": b"old.example.net:25"})
    before = os.stat(db_path)
    bad = tmp_path / "routes"
    bad.write_text("good.example  mx.example\nbad.example  mx.example:0\nlonely.example\n")
    with pytest.raises(RoutesFileError) as caught:
        make_db(bad, db_path)
    assert len(caught.value.errors) == 2
    assert caught.value.errors[0].startswith(f"{bad}:2: ")
    assert caught.value.errors[1].startswith(f"{bad}:3: ")
    assert os.stat(db_path).st_ino == before.st_ino
    assert leftovers(tmp_path) == []


def test_make_db_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "routes"
    bad.write_bytes(b"example.org  mx.example\nb\xe4d.example  mx.example\n")
    with pytest.raises(RoutesFileError, match=r"routes:2: not UTF-8"):
        make_db(bad, tmp_path / "routes.db")
    assert not (tmp_path / "routes.db").exists()


def test_make_db_refuses_a_missing_routes_file(tmp_path: Path) -> None:
    with pytest.raises(RoutesFileError, match=r"nothere: cannot read"):
        make_db(tmp_path / "nothere", tmp_path / "routes.db")
    assert list(tmp_path.iterdir()) == []


def test_make_db_replaces_the_file_by_rename(routes_file: Path, tmp_path: Path) -> None:
    db_path = tmp_path / "routes.db"
    write_db(db_path, {b"old.example": b"old.example.net:25"})
    old_inode = os.stat(db_path).st_ino
    with dbm.gnu.open(str(db_path), "ru") as reader:  # a reader keeps the old file
        make_db(routes_file, db_path)
        assert reader.get(b"old.example") == b"old.example.net:25"
    assert os.stat(db_path).st_ino != old_inode
    with dbm.gnu.open(str(db_path), "r") as db:
        assert b"old.example" not in db and b"example.org" in db
    assert oct(os.stat(db_path).st_mode & 0o777) == oct(0o644)


async def test_a_replaced_file_is_reopened_after_the_reload_interval(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    routes = tmp_path / "routes"
    routes.write_text("example.org  old.example.net\n")
    db_path = tmp_path / "routes.db"
    make_db(routes, db_path)
    source = GdbmSource(db_path, reload_interval=1.0)
    assert await source.lookup("example.org") == parse_destinations("old.example.net")
    routes.write_text("example.org  new.example.net\nexample.com  new.example.net\n")
    make_db(routes, db_path)
    mock_clock.jump(0.5)
    assert await source.lookup("example.org") == parse_destinations("old.example.net")
    mock_clock.jump(0.5)
    assert await source.lookup("example.org") == parse_destinations("new.example.net")
    assert await source.lookup("example.com") == parse_destinations("new.example.net")
    await source.aclose()


async def test_a_missing_file_fails_lookups_until_it_appears(
    routes_file: Path, tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    db_path = tmp_path / "routes.db"
    source = GdbmSource(db_path)
    with pytest.raises(LookupFailed, match=r"cannot open .*routes\.db"):
        await source.lookup("example.org")
    make_db(routes_file, db_path)
    assert await source.lookup("example.com") == parse_destinations("mail.example.com:2525")


@pytest.mark.parametrize("kind", ["text", "directory"])
async def test_a_file_that_cannot_be_opened_says_why_in_words(tmp_path: Path, kind: str) -> None:
    """One line with the reason only: not `None` (dbm.gnu.error has no strerror), nor
    `[Errno 21] Is a directory: '...'`."""
    db_path = tmp_path / "routes.db"
    if kind == "text":
        db_path.write_text("example.org 127.0.0.1\n")
    else:
        db_path.mkdir()
    source = GdbmSource(db_path)
    with pytest.raises(LookupFailed) as caught:
        await source.lookup("example.org")
    why = "Unexpected end of file" if kind == "text" else "Is a directory"
    assert str(caught.value) == f"cannot open {db_path}: {why}"


async def test_a_broken_replacement_keeps_the_open_file_serving(
    routes_file: Path,
    tmp_path: Path,
    mock_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db_path = tmp_path / "routes.db"
    make_db(routes_file, db_path)
    source = GdbmSource(db_path, reload_interval=1.0)
    assert await source.lookup("example.com") is not None
    broken = tmp_path / "broken"
    broken.write_bytes(b"this is not a gdbm file\n" * 100)
    os.replace(broken, db_path)
    for _ in range(3):
        mock_clock.jump(1)
        assert await source.lookup("example.com") == parse_destinations("mail.example.com:2525")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "still using the previous file" in errors[0].getMessage()


async def test_a_malformed_value_is_bad_route_data_naming_source_and_key(tmp_path: Path) -> None:
    db_path = tmp_path / "routes.db"
    write_db(db_path, {b"bad.example": b"mx.example:0", b"latin1.example": b"m\xe4x.example"})
    chain = CachedRouter([GdbmSource(db_path)])
    with pytest.raises(BadRouteData, match=r"source gdbm for 'bad.example'.*mx.example:0"):
        await chain.route("user@bad.example")
    with pytest.raises(BadRouteData, match=r"source gdbm for 'latin1.example'"):
        await chain.route("user@latin1.example")


async def test_check_opens_a_replaced_file_and_calls_on_change(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("example.org  old.example.net\n")
    db_path = tmp_path / "routes.db"
    make_db(routes, db_path)
    source = GdbmSource(db_path, reload_interval=3600.0)
    changes: list[str] = []
    source.on_change = lambda: changes.append("changed")
    await source.check()
    assert changes == []  # opening the first file is no change
    routes.write_text("example.org  new.example.net\n")
    make_db(routes, db_path)
    await source.check()
    assert changes == ["changed"]
    assert await source.lookup("example.org") == parse_destinations("new.example.net")
    await source.aclose()


async def test_check_of_a_missing_file_leaves_it_to_the_lookups(tmp_path: Path) -> None:
    source = GdbmSource(tmp_path / "routes.db")
    await source.check()  # no exception: a task watching the file carries on
    with pytest.raises(LookupFailed):
        await source.lookup("example.org")


# --- files changed in place, cut short or damaged ---------------------------------------------


def big_db(tmp_path: Path, routes: int = 3000) -> Path:
    """A database of `routes` domains, d0.example … (several hundred KiB: many buckets)."""
    text = "".join(f"d{n}.example  mx{n}.example.net:2525\n" for n in range(routes))
    (tmp_path / "routes").write_text(text)
    db_path = tmp_path / "routes.db"
    make_db(tmp_path / "routes", db_path)
    return db_path


LOOKUPS_WHILE_TRUNCATED = """
import os, sys, trio
from moxy.lookup.gdbm import GdbmSource

async def main(path):
    source = GdbmSource(path, reload_interval=3600.0)  # no look for a change meanwhile
    assert await source.lookup("d1.example") is not None
    with open(path, "r+b") as f:  # rewritten in place: `cp new.db routes.db`, cut short
        f.truncate(4096)
    found = [await source.lookup(f"d{n}.example") for n in range(0, 3000, 7)]
    print(sum(1 for f in found if f is not None))

trio.run(main, sys.argv[1])
"""


def test_a_file_truncated_in_place_does_not_reach_the_copy_in_use(tmp_path: Path) -> None:
    """GDBM maps its file: read through a handle on a file cut short in place, the process
    died of SIGBUS. Moxy reads a private copy (in a child process here: a regression must fail
    this test, not kill the suite)."""
    db_path = big_db(tmp_path)
    run = subprocess.run([sys.executable, "-c", LOOKUPS_WHILE_TRUNCATED, str(db_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    assert run.stdout.split() == [str(len(range(0, 3000, 7)))]  # every route still answered


@pytest.mark.parametrize("damage", ["first half", "buckets overwritten"])
async def test_a_damaged_replacement_is_refused_and_the_open_file_keeps_serving(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """A half-copied file (an interrupted copy renamed into place) or one with damaged
    buckets opened fine, and its unreadable routes read as absent: 550 for routed domains."""
    db_path = big_db(tmp_path)
    source = GdbmSource(db_path, reload_interval=1.0)
    assert await source.lookup("d1.example") == parse_destinations("mx1.example.net:2525")
    data = bytearray(db_path.read_bytes())
    if damage == "first half":
        data = data[: len(data) // 2]
        expected = r"truncated: \d+ of its \d+ bytes"
    else:
        data[len(data) // 3 : len(data) // 3 + 20000] = os.urandom(20000)
        expected = r"damaged: \d+ of its 3000 routes readable"
    with pytest.raises(DamagedFile, match=expected):  # what `moxy check-config` says too
        (tmp_path / "damaged.db").write_bytes(data)
        check_db(tmp_path / "damaged.db")
    os.replace(tmp_path / "damaged.db", db_path)
    for _ in range(3):
        mock_clock.jump(1)
        for n in range(0, 3000, 101):
            assert await source.lookup(f"d{n}.example") == parse_destinations(
                f"mx{n}.example.net:2525"
            )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "still using the previous file" in errors[0], errors
    await source.aclose()


async def test_a_damaged_file_with_nothing_open_fails_lookups(tmp_path: Path) -> None:
    db_path = big_db(tmp_path, routes=500)
    db_path.write_bytes(db_path.read_bytes()[:8192])
    with pytest.raises(LookupFailed, match="truncated"):  # 451, never "no route" (550)
        await GdbmSource(db_path).lookup("d1.example")


def test_make_db_does_not_replace_routes_with_an_empty_routes_file(tmp_path: Path) -> None:
    """An editor or `>` truncates before writing: makedb at that instant must not turn the
    database into one that refuses all mail."""
    db_path = big_db(tmp_path, routes=20)
    (tmp_path / "routes").write_bytes(b"")
    with pytest.raises(RoutesFileError, match=r"empty \(0 bytes\), and .*routes\.db holds 20 "):
        make_db(tmp_path / "routes", db_path)
    check_db(db_path)
    with dbm.gnu.open(str(db_path), "r") as db:
        assert db.get(COUNT_KEY) == b"20"
    db_path.unlink()  # with nothing to lose, an empty database is what was asked for
    assert make_db(tmp_path / "routes", db_path) == 0
