"""moxylogalyze over the shipped fixture logs (their story is in logs/generate.py): what the
summary, the listings, the filters and -v report, in every output format."""

from __future__ import annotations

import csv
import io
import shlex
from pathlib import Path
from typing import Any

import pytest

from .helpers import LOGS, logalyze

A, B, C = "127.0.0.1:2525", "127.0.0.1:2626", "127.0.0.1:2727"
ALICE, BOB = "alice@sender.example", "bob@other.example"

FULL_SUMMARY = {
    "first": "2026-11-25T10:05:00.000Z",
    "last": "2026-11-25T12:51:00.000Z",
    "messages_accepted": 3,
    "messages_deferred": 2,
    "messages_rejected": 1,
    "bytes_received": 900 + 1900 + 2900,
    "bytes_delivered": 1000 + 2000 + 2000 + 3000,  # the mirrored message counts twice
    "legs_delivered": 4,
    "legs_failed": 3,
    "recipients_accepted": 4,
    "refused": {"destination-refused": 1, "lookup-failed": 1, "relay-denied": 1},
    "connections": {"connection-limit": 1, "protocol-errors": 1},
    "senders": 3,
    "client_ips": 4,
    "destinations": 3,
}


def row(key: str, messages: int, size: int, rcpts: int, refused: int, failed: int) -> list[Any]:
    return [key, messages, size, rcpts, refused, failed]


BY_DEST = [
    row(B, 2, 5000, 3, 0, 0),
    row(A, 2, 3000, 2, 1, 2),  # the 451 and the 554 legs failed; one recipient refused by it
    row("-", 0, 0, 0, 2, 0),  # refusals that name no destination
    row(C, 0, 0, 0, 0, 1),
]
BY_FROM = [
    row(ALICE, 2, 5000, 2, 1, 1),
    row(BOB, 1, 3000, 2, 1, 1),  # "Bob@Other.example" in the log: senders group case-folded
    row("<>", 0, 0, 0, 1, 1),
]
BY_IP = [
    row("192.0.2.7", 2, 5000, 2, 1, 1),
    row("198.51.100.9", 1, 3000, 2, 1, 1),
    row("192.0.2.8", 0, 0, 0, 1, 1),
]
COLUMNS = ["messages", "bytes", "recipients", "refused", "failed"]


def rows_of(document: list[dict[str, Any]], by: str) -> list[list[Any]]:
    assert all(list(r) == [by, *COLUMNS] for r in document), document
    return [list(r.values()) for r in document]


# --- the summary -----------------------------------------------------------------------------


def test_summary_counts_by_the_documented_rules() -> None:
    assert logalyze("messages.log", "--format", "json").json() == FULL_SUMMARY


@pytest.mark.parametrize("name", ["messages.jsonl", "mixed.log", "malformed.log"])
def test_json_lines_mixed_and_damaged_logs_give_the_same_summary(name: str) -> None:
    assert logalyze(name, "--format", "json").json() == FULL_SUMMARY


def test_summary_table() -> None:
    result = logalyze("messages.log")
    assert result.status == 0 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["first", "event:", "2026-11-25T10:05:00.000Z"]
    for label, value in [
        ("messages accepted:", "3"), ("bytes delivered:", "8000"), ("legs failed:", "3"),
        ("recipients refused:", "3"), ("  relay-denied:", "1"),
        ("connections refused/dropped:", "2"), ("distinct destinations:", "3"),
    ]:  # fmt: skip
        [line] = [x for x in lines if x.startswith(label)]
        assert line.split()[-1] == value, line
    # Values start in one column.
    assert len({len(x) - len(x.split()[-1]) for x in lines}) == 1, result.stdout


def test_summary_csv() -> None:
    result = logalyze("messages.log", "--format", "csv")
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert table[0] == ["field", "value"]
    values = dict(table[1:])
    assert values["bytes_delivered"] == "8000"
    assert values["refused"] == "3" and values["refused.lookup-failed"] == "1"
    assert values["connections.protocol-errors"] == "1"


def test_logs_from_before_node_and_reason_are_read() -> None:
    summary = logalyze("old-format.log", "--format", "json").json()
    assert summary["messages_accepted"] == 1 and summary["bytes_delivered"] == 700


def test_several_files_add_up() -> None:
    summary = logalyze("messages.log", "old-format.log", "--format", "json").json()
    assert summary["bytes_delivered"] == 8000 + 700
    assert summary["first"] == "2026-11-24T09:00:00.250Z"
    assert summary["senders"] == 4


# --- totals per group ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("by", "expected"), [("dest", BY_DEST), ("from", BY_FROM), ("ip", BY_IP)]
)
def test_listby_sorted_by_bytes(by: str, expected: list[list[Any]]) -> None:
    document = logalyze("messages.log", "-l", by, "--format", "json").json()
    assert rows_of(document, by) == expected


def test_listby_long_option_and_csv() -> None:
    result = logalyze("mixed.log", "--listby", "dest", "--format", "csv")
    table = list(csv.reader(io.StringIO(result.stdout)))
    assert table == [["dest", *COLUMNS]] + [[str(v) for v in r] for r in BY_DEST]


def test_listby_table_is_aligned() -> None:
    result = logalyze("messages.log", "-l", "from")
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["from", *COLUMNS]
    assert [line.split() for line in lines[1:]] == [[str(v) for v in r] for r in BY_FROM]
    assert len({len(line) for line in lines}) == 1, result.stdout  # numbers right-aligned


def test_top_keeps_the_first_rows() -> None:
    document = logalyze("messages.log", "-l", "dest", "-n", "2", "--format", "json").json()
    assert rows_of(document, "dest") == BY_DEST[:2]


# --- filters ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", [ALICE, "<Alice@Sender.Example>"])
def test_from_selects_one_sender(sender: str) -> None:
    summary = logalyze("messages.log", "--from", sender, "--format", "json").json()
    assert summary["messages_accepted"] == 2 and summary["messages_rejected"] == 1
    assert summary["bytes_delivered"] == 5000
    assert summary["refused"] == {"relay-denied": 1}
    assert summary["connections"] == {}  # a connection has no sender


def test_from_null_sender() -> None:
    summary = logalyze("messages.log", "--from", "<>", "--format", "json").json()
    assert summary["messages_deferred"] == 1 and summary["refused"] == {"lookup-failed": 1}


@pytest.mark.parametrize("ip", ["198.51.100.9", "198.51.100.0/24"])
def test_ip_selects_a_client_or_a_network(ip: str) -> None:
    document = logalyze("messages.log", "-i", ip, "-l", "ip", "--format", "json").json()
    assert rows_of(document, "ip") == [BY_IP[1]]


def test_ip_counts_connections_of_that_client() -> None:
    summary = logalyze("messages.log", "--ip", "203.0.113.5", "--format", "json").json()
    assert summary["connections"] == {"connection-limit": 1, "protocol-errors": 1}
    assert summary["messages_accepted"] == 0


def test_dest_selects_legs_to_it_and_messages_routed_to_it() -> None:
    summary = logalyze("messages.log", "-d", B, "--format", "json").json()
    # Legs that went to :2626 (the mirror copy and the failover), and the two messages whose
    # routes name it.
    assert summary["bytes_delivered"] == 5000 and summary["legs_delivered"] == 2
    assert summary["messages_accepted"] == 2 and summary["legs_failed"] == 0
    by_dest = logalyze("messages.log", "--dest", A, "-l", "dest", "--format", "json").json()
    assert rows_of(by_dest, "dest") == [BY_DEST[1]]


def test_since_and_until_take_utc_times() -> None:
    args = ["--since", "2026-11-25T11:00", "--until", "2026-11-25T12:00:00Z"]
    summary = logalyze("messages.log", *args, "--format", "json").json()
    assert summary["messages_accepted"] == 1 and summary["messages_deferred"] == 1
    assert summary["bytes_delivered"] == 3000 and summary["refused"] == {"destination-refused": 1}
    # The same hour written with a zone.
    zoned = ["--since", "2026-11-25T12:00+01:00", "--until", "2026-11-25T13:00+01:00"]
    assert logalyze("messages.log", *zoned, "--format", "json").json() == summary


def test_until_a_date_includes_that_day() -> None:
    summary = logalyze(
        "messages.log", "--since", "2026-11-25", "--until", "2026-11-25", "--format", "json"
    ).json()
    assert summary == FULL_SUMMARY
    empty = logalyze("messages.log", "--since", "2026-11-26", "--format", "json").json()
    assert empty["first"] is None and empty["messages_accepted"] == 0


def test_filters_combine() -> None:
    document = logalyze(
        "messages.log", "--from", ALICE, "-d", A, "--until", "2026-11-25T12:00",
        "-l", "dest", "--format", "json",
    ).json()  # fmt: skip
    assert rows_of(document, "dest") == [[A, 2, 3000, 2, 0, 0]]


# --- -v: messages with their legs ------------------------------------------------------------


def test_verbose_lists_each_message_with_its_legs() -> None:
    result = logalyze("messages.log", "-v")
    assert result.status == 0 and result.stderr == "", result
    lines = result.stdout.splitlines()
    assert len(lines) == 6
    mirrored = lines[1]
    assert mirrored.startswith("2026-11-25T10:20:00.001Z node=mx1 id=676D42000002.1 ")
    head, *legs = mirrored.split(" | ")
    assert "from=<alice@sender.example> to=<carol@example.net> size=1900 code=250" in head
    assert legs == [
        f"{A} code=250 size=2000 to=<carol@example.net>",
        f"{B} code=250 size=2000 to=<carol@example.net>",
    ]
    assert lines[4].endswith(f"| {C} code=0 size=0 to=<gina@example.net> stage=connect")


def test_verbose_json_and_csv() -> None:
    messages = logalyze("mixed.log", "-v", "--format", "json").json()
    assert [m["code"] for m in messages] == [250, 250, 250, 451, 451, 554]
    assert [len(m["legs"]) for m in messages] == [1, 2, 1, 1, 1, 1]
    assert messages[2]["legs"][0] == {
        "dest": B, "route": f"{A}|{B}", "to": ["dave@example.org", "erin@example.org"],
        "size": 3000, "code": 250, "stage": "end-of-data", "reply": "250 2.0.0 Ok: queued as X",
    }  # fmt: skip
    table = list(csv.reader(io.StringIO(logalyze("messages.log", "-v", "--format", "csv").stdout)))
    assert table[0][:3] == ["time", "node", "session"] and table[0][-1] == "legs"
    assert len(table) == 7
    assert table[2][-1] == f"{A} 250 2000;{B} 250 2000"


def test_verbose_with_filters() -> None:
    messages = logalyze("messages.log", "-v", "-d", B, "--format", "json").json()
    assert [m["id"] for m in messages] == ["676D42000002.1", "676D42000003.1"]
    assert logalyze("messages.log", "-v", "--from", "nobody@x", "--format", "json").json() == []


def test_verbose_shows_legs_whose_message_line_is_missing(tmp_path: Path) -> None:
    cut = tmp_path / "cut.log"
    [first_leg, *_] = (LOGS / "messages.log").read_text().splitlines()
    cut.write_text(first_leg + "\n")  # M1's leg, without its message line
    result = logalyze(cut, "-v")
    assert result.stdout.splitlines() == [
        "2026-11-25T10:05:00.000Z node=mx1 id=676D42000001.1 client=192.0.2.7"
        f" from=<alice@sender.example> (no message line) | {A} code=250 size=1000"
        " to=<bob@example.org>"
    ]


# --- the documentation -----------------------------------------------------------------------


def doc_samples() -> list[tuple[list[str], str]]:
    """Every ```-block of docs/tools.md that starts with `$ moxylogalyze`: (args, output)."""
    text = (LOGS.parents[2] / "docs" / "tools.md").read_text()
    samples = []
    for block in text.split("```\n")[1::2]:
        command, _, output = block.partition("\n")
        if command.startswith("$ moxylogalyze "):
            samples.append((shlex.split(command)[2:], output))
    return samples


def test_the_sample_output_in_docs_is_what_the_tool_prints() -> None:
    samples = doc_samples()
    assert len(samples) >= 5
    for args, output in samples:
        result = logalyze(*args)
        assert (result.status, result.stdout) == (0, output), args
