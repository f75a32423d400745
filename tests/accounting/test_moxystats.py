"""`moxystats` run as a command over counters that the sinks wrote: a real redis-server, real
GDBM files; JSON rows, the plain table, the terminal table, and every way it can refuse."""

from __future__ import annotations

import dbm.gnu
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import attrs
import pytest
import redis
import trio

from moxy.accounting.counters import TOTAL, counter_key
from moxy.accounting.gdbm import GdbmSink
from moxy.accounting.redis import RedisSink
from moxy.accounting.settings import GdbmSinkSettings, RedisSinkSettings
from moxy.tools.stats import _TOML_TYPES, Usage, main, settings_from_toml
from peers.redis_server import RedisServer

from .events import leg, refused

# The console script pyproject.toml installs beside the interpreter.
MOXYSTATS = [str(Path(sys.executable).parent / "moxystats")]


def moxystats(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MOXYSTATS, *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess[str], status: int, text: str) -> None:
    assert result.returncode == status, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moxystats: "), result.stderr
    assert text in lines[0]


@pytest.fixture
def counters(redis_server: RedisServer) -> RedisServer:
    """Counters as a cluster of two nodes wrote them: three destinations, a mirror, refusals,
    and traffic an hour ago (in the totals, not in the rates)."""
    trio.run(fill_counters, redis_server)
    return redis_server


async def fill_counters(redis_server: RedisServer) -> None:
    now = time.time()
    one = RedisSink(RedisSinkSettings(url=redis_server.url, flush_interval=0.0))
    two = RedisSink(RedisSinkSettings(url=redis_server.url, flush_interval=0.0))
    await one.write([
        *(leg("big.example:25", ("a@one.example",), 3 * 1024 * 1024, when=now)
          for _ in range(4)),
        leg("small.example:25", ("a@one.example", "b@two.example"), 1536, when=now),
        leg("small.example:25", ("c@two.example",), 500, when=now - 3600),
        refused("x@one.example", destination="small.example:25"),
    ])
    await two.write([
        leg("big.example:25", ("d@two.example",), 1024 * 1024, node="n2", when=now),
        leg("mirror.example:25", ("d@two.example",), 1024 * 1024, node="n2", when=now),
        leg("failing.example:25", ("e@one.example",), 100, code=554, node="n2", when=now),
    ])
    await one.aclose()
    await two.aclose()


def json_rows(*args: str) -> list[dict[str, object]]:
    result = moxystats(*args, "--json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_json_rows_by_destination(counters: RedisServer) -> None:
    rows = json_rows("--redis", counters.url)
    assert [(r["key"], r["messages"], r["bytes"], r["refused"]) for r in rows] == [
        ("big.example:25", 5, 13 * 1024 * 1024, 0),
        ("mirror.example:25", 1, 1024 * 1024, 0),
        ("small.example:25", 2, 2036, 1),
        ("failing.example:25", 0, 0, 1),
    ]
    big = rows[0]
    # Everything but the hour-old leg happened within the last 5 minutes: exact 5-minute rates.
    assert big["messages_per_min_5m"] == 1.0
    assert big["bytes_per_sec_5m"] == round(13 * 1024 * 1024 / 300, 3)
    assert 0 < big["messages_per_min_1m"] <= 5  # type: ignore[operator]
    small = rows[2]
    assert small["messages_per_min_5m"] == 0.2  # one of its two copies is an hour old
    assert set(big) == {
        "key", "messages", "bytes", "refused", "messages_per_min_1m", "bytes_per_sec_1m",
        "messages_per_min_5m", "bytes_per_sec_5m",
    }


def test_json_rows_by_domain_node_and_top(counters: RedisServer) -> None:
    domains = json_rows("--redis", counters.url, "--by", "domain")
    assert [(r["key"], r["messages"], r["bytes"], r["refused"]) for r in domains] == [
        ("one.example", 5, 12 * 1024 * 1024 + 1536, 2),
        ("two.example", 4, 2 * 1024 * 1024 + 1536 + 500, 0),
    ]
    nodes = json_rows("--redis", counters.url, "--by", "node", "--top", "1")
    assert [(r["key"], r["messages"], r["refused"]) for r in nodes] == [("n1", 6, 1)]
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert json_rows("--redis", counters.url, "--by", "node", "--day", today)[1]["key"] == "n2"
    assert json_rows("--redis", counters.url, "--day", "2001-01-01") == []


def test_plain_table_when_piped(counters: RedisServer) -> None:
    result = moxystats("--redis", counters.url, "--once", "--by", "dest")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"moxystats: Redis {counters.url}, by dest, totals, ")
    assert lines[1].split() == [
        "dest", "messages", "bytes", "refused", "msg/min", "1m", "rate", "1m", "msg/min", "5m",
        "rate", "5m",
    ]
    assert lines[2].split()[:5] == ["big.example:25", "5", "13.0", "MiB", "0"]
    assert lines[2].split()[-2:] == ["44.4", "KiB/s"]  # 13 MiB over 5 minutes
    assert lines[4].split()[:5] == ["small.example:25", "2", "2.0", "KiB", "1"]
    assert len(lines) == 6
    assert "\x1b" not in result.stdout and "─" not in result.stdout


def run_on_terminal(args: list[str], term: str) -> str:
    """Run with standard output on a pseudo-terminal; what it printed there."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [*MOXYSTATS, *args], stdout=follower, stderr=subprocess.PIPE,
        env={**os.environ, "TERM": term, "COLUMNS": "140"},
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(60) == 0
    return output.decode("utf-8", "replace")


def test_a_terminal_gets_a_drawn_table_and_a_dumb_one_plain_text(counters: RedisServer) -> None:
    drawn = run_on_terminal(["--redis", counters.url, "--once"], "xterm-256color")
    assert "┃" in drawn or "│" in drawn
    assert "big.example:25" in drawn and "13.0 MiB" in drawn
    plain = run_on_terminal(["--redis", counters.url, "--once"], "dumb")
    assert "│" not in plain and "\x1b" not in plain
    assert "big.example:25" in plain and "13.0 MiB" in plain


def test_config_file_names_the_redis(counters: RedisServer, tmp_path: Path) -> None:
    config = tmp_path / "moxy.toml"
    (tmp_path / "routes").write_text("example.org 127.0.0.1:2526\n")
    base = '[server]\nlisten = ["127.0.0.1:2525"]\n[routes]\nfile = "routes"\n'
    config.write_text(
        base + '[accounting]\nsinks = ["file", "redis"]\n'
        f'[accounting.redis]\nurl = "{counters.url}"\nflush_interval = 2.0\n'
    )
    rows = json_rows("--config", str(config), "--by", "sender")
    assert [(r["key"], r["messages"]) for r in rows] == [("alice@example.net", 8)]
    config.write_text(base)
    one_line_error(moxystats("-c", str(config), "--once"), 2, "no [accounting.redis] section")
    sinks = '[accounting]\nsinks = ["redis"]\n'
    config.write_text(
        base + sinks + f'[accounting.redis]\nurl = "{counters.url}"\nflush_intervall = 2\n'
    )
    one_line_error(moxystats("-c", str(config), "--once"), 2, "flush_intervall")
    config.write_text(base + sinks + '[accounting.redis]\nurl = "http://x"\n')
    one_line_error(moxystats("-c", str(config), "--once"), 2, "must start with redis://")


@pytest.mark.parametrize(
    ("table", "text"),
    [
        ("url = 5", "url: 5 is not a valid value"),
        ("timeout = true", "timeout: True is not a valid value"),
        ('sentinels = [1]\nsentinel_master = "m"', "sentinels: [1] is not a valid value"),
        ('sentinel_master = "m"', "go together"),
        ("backlog = 0", "backlog: must be at least 1"),
    ],
)
def test_bad_accounting_redis_tables(table: str, text: str, tmp_path: Path) -> None:
    """The direct reading of [accounting.redis] (used while moxy.config has no [accounting])
    rejects what RedisSinkSettings would take for a wrong type."""
    config = tmp_path / "moxy.toml"
    config.write_text(f"[accounting.redis]\n{table}\n")
    with pytest.raises(Usage, match=re.escape(text)):
        settings_from_toml(config)


def test_every_redis_setting_is_known_to_the_config_fallback() -> None:
    assert set(_TOML_TYPES) == set(attrs.fields_dict(RedisSinkSettings))


def test_gdbm_log(tmp_path: Path) -> None:
    path = tmp_path / "acct.db"

    async def fill() -> None:
        sink = GdbmSink(GdbmSinkSettings(path=path))
        await sink.write([
            leg("a.example:25", ("bob@example.org",), 2048, when=1_764_547_200),
            leg("b.example:25", ("bob@example.org",), 100, when=1_764_547_260),
        ])
        await sink.aclose()

    trio.run(fill)
    rows = json_rows("--gdbm", str(path), "--by", "rcpt")
    assert rows == [{
        "key": "bob@example.org", "messages": 2, "bytes": 2148,
        "first_seen": "2025-12-01T00:00:00Z", "last_seen": "2025-12-01T00:01:00Z",
    }]
    table = moxystats("--gdbm", str(path), "--once")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split() == ["dest", "messages", "bytes", "first", "seen", "last", "seen"]
    assert lines[2].split() == [
        "a.example:25", "1", "2.0", "KiB", "2025-12-01T00:00:00Z", "2025-12-01T00:00:00Z"
    ]
    assert lines[3].split()[:4] == ["b.example:25", "1", "100", "B"]


def test_unreachable_redis_is_one_line(tmp_path: Path) -> None:
    from peers.sink import free_port

    result = moxystats("--redis", f"redis://127.0.0.1:{free_port()}/0", "--once")
    one_line_error(result, 3, "unreachable")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--by", "subject"], "invalid choice: 'subject'"),
        (["--top", "0"], "--top: '0' is not positive"),
        # A Redis range this long is an error of Redis's, not an unreachable Redis.
        (["--top", "99999999999999999999999"], "is not from 1 to 100000"),
        (["--interval", "fast"], "--interval: 'fast' is not a number"),
        (["--interval", "nan"], "--interval: 'nan' is not a finite number"),
        (["--interval", "inf"], "--interval: 'inf' is not a finite number"),
        (["--interval", "1e308"], "--interval: '1e308' is not from 0.1 to 86400"),
        (["--interval", "0.001"], "--interval: '0.001' is not from 0.1 to 86400"),
        (["--day", "yesterday"], "not a date YYYY-MM-DD"),
        (["--day", "2026-1-1"], "'2026-1-1' is not a date YYYY-MM-DD"),
        (["--redis", "localhost:6379"], "must start with redis://"),
        (["--redis", "redis://x", "--gdbm", "f.db"], "not allowed with argument"),
        (["--gdbm", "f.db", "--by", "domain"], "a GDBM log has only 'dest' and 'rcpt'"),
        (["--gdbm", "f.db", "--day", "2026-01-01"], "a GDBM log has only running totals"),
        (["--prefix", "x:"], "--prefix goes with --redis"),
        (["--config", "/nonexistent/moxy.toml"], "cannot read"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_options_are_one_line(
    args: list[str], text: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process (main() is what the console script calls), to spare a start per case."""
    status = main([*args, "--once"])
    out, err = capsys.readouterr()
    one_line_error(subprocess.CompletedProcess(args, status, out, err), 2, text)


def test_counters_that_are_no_counts_are_left_out_and_named(counters: RedisServer) -> None:
    """A score that no sink writes (inf, negative, beyond 2**53: set by hand or by another
    program) leaves out its member with a note, not a traceback; the other rows stay."""
    client = redis.Redis.from_url(counters.url)
    client.zadd(counter_key("moxy:acct:", TOTAL, "dest", "bytes"), {"inf.example:25": "inf"})
    client.zadd(counter_key("moxy:acct:", TOTAL, "dest", "msgs"), {"small.example:25": -1})
    client.zadd(counter_key("moxy:acct:", TOTAL, "dest", "refused"), {"big.example:25": 2**60})
    client.close()
    result = moxystats("--redis", counters.url, "--json")
    assert result.returncode == 0, result
    keys = [row["key"] for row in json.loads(result.stdout)]
    assert keys == ["mirror.example:25", "failing.example:25"]
    assert result.stderr == (
        "moxystats: 3 members left out, malformed counters: 'inf.example:25',"
        " 'big.example:25', 'small.example:25'\n"
    )
    table = moxystats("--redis", counters.url, "--once")
    assert table.returncode == 0 and "mirror.example:25" in table.stdout, table
    assert table.stderr.startswith("moxystats: 3 members left out"), table.stderr


def test_a_gdbm_record_with_a_time_past_year_9999_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "acct.db"
    with dbm.gnu.open(str(path), "c") as db:
        db[b"dest:good.example:25"] = b"1 2 1764547200 1764547260"
        db[b"dest:bad.example:25"] = b"1 2 1 99999999999999999999"
    for output in ("--json", "--once"):
        result = moxystats("--gdbm", str(path), output)
        assert result.returncode == 0, result
        assert "good.example:25" in result.stdout and "bad.example:25" not in result.stdout
        assert result.stderr == (
            "moxystats: 1 member left out, malformed counters: 'bad.example:25'\n"
        )


def test_unreadable_gdbm_is_one_line(tmp_path: Path) -> None:
    one_line_error(moxystats("--gdbm", str(tmp_path / "none.db")), 3, "no such file")
    (tmp_path / "text.db").write_text("hello\n")
    one_line_error(moxystats("--gdbm", str(tmp_path / "text.db")), 3, "cannot read GDBM log")
