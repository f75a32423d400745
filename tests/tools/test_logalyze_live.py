"""moxylogalyze over the log of a real `moxy serve`: messages sent with smtplib to recording
upstreams (one plain route, one mirrored, one whose destination refuses the message, and a
recipient Moxy refuses), then the totals checked against what the upstreams received and the
refused recipient found counted (by reason, per sender and IP)."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path

import pytest

from peers.client import smtplib_send
from peers.moxy import MoxyProcess
from peers.recorder import Recorder

from .helpers import logalyze

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]
ServedLog = tuple[Path, dict[str, Recorder]]  # the log file, and the upstreams by role


def body(subject: str) -> bytes:
    return f"Subject: {subject}\r\n\r\nHello.\r\n.leading dot\r\n".encode()


@pytest.fixture
def served_log(moxy_process: StartProcess, make_recorder: MakeRecorder) -> ServedLog:
    plain, mirror = make_recorder(), make_recorder()
    refusing = make_recorder({"end_of_data": "554 5.7.1 Rejected by policy"})
    moxy = moxy_process(
        {"example.org": plain, "example.net": [plain, mirror], "example.com": refusing}
    )

    def send(sender: str, rcpts: list[str], subject: str) -> dict[str, tuple[int, bytes]]:
        return smtplib_send(moxy.host, moxy.port, sender, rcpts, body(subject))

    assert send("a@client.test", ["one@example.org"], "plain") == {}
    assert send("b@client.test", ["two@example.net"], "mirrored") == {}
    refused = send("a@client.test", ["three@example.org", "x@unrouted.test"], "one refused")
    assert list(refused) == ["x@unrouted.test"]
    with pytest.raises(smtplib.SMTPDataError) as failed:
        send("c@client.test", ["four@example.com"], "refused by the destination")
    assert failed.value.smtp_code == 554
    assert moxy.stop() == 0  # SIGTERM: the log writer flushes before exit
    return moxy.log_file, {"plain": plain, "mirror": mirror, "refusing": refusing}


def test_totals_of_a_real_run_match_what_the_destinations_received(
    served_log: ServedLog,
) -> None:
    log, peers = served_log
    plain, mirror, refusing = peers["plain"], peers["mirror"], peers["refusing"]
    assert len(plain.delivered) == 3 and len(mirror.delivered) == 1
    received = sum(m.size for p in (plain, mirror) for m in p.delivered)

    summary = logalyze(log, "--format", "json").json()
    assert summary["messages_accepted"] == 3 and summary["messages_rejected"] == 1
    assert summary["legs_delivered"] == 4 and summary["legs_failed"] == 1
    assert summary["bytes_delivered"] == received
    assert summary["recipients_accepted"] == 3
    # The recipient Moxy refused (no route) is a "refused" event of its own.
    assert summary["refused"] == {"relay-denied": 1}
    assert summary["connections"] == {}
    assert summary["senders"] == 3 and summary["client_ips"] == 1
    assert summary["destinations"] == 3

    by_dest = {
        r["dest"]: r for r in logalyze(log, "-l", "dest", "--format", "json").json()
    }
    assert by_dest[plain.address]["messages"] == 3
    assert by_dest[plain.address]["bytes"] == sum(m.size for m in plain.delivered)
    assert by_dest[mirror.address]["bytes"] == mirror.delivered[0].size
    assert (by_dest[refusing.address]["failed"], by_dest[refusing.address]["bytes"]) == (1, 0)

    # A refusal that names no destination is listed under "-".
    assert (by_dest["-"]["refused"], by_dest["-"]["messages"]) == (1, 0)
    assert all(r["refused"] == 0 for dest, r in by_dest.items() if dest != "-")

    by_from = {r["from"]: r for r in logalyze(log, "-l", "from", "--format", "json").json()}
    assert {k: (r["messages"], r["refused"], r["failed"]) for k, r in by_from.items()} == {
        "a@client.test": (2, 1, 0), "b@client.test": (1, 0, 0), "c@client.test": (0, 0, 1),
    }  # fmt: skip
    for sender, totals in by_from.items():
        assert totals["bytes"] == sum(
            m.size for p in (plain, mirror) for m in p.delivered if m.mail_from == sender
        )
    [ip] = logalyze(log, "-l", "ip", "--format", "json").json()
    assert (ip["ip"], ip["messages"], ip["bytes"], ip["refused"]) == ("127.0.0.1", 3, received, 1)


def test_verbose_over_a_real_run_shows_each_message_with_its_legs(
    served_log: ServedLog,
) -> None:
    log, peers = served_log
    messages = logalyze(log, "-v", "--format", "json").json()
    assert [(m["from"], m["code"], len(m["legs"])) for m in messages] == [
        ("a@client.test", 250, 1), ("b@client.test", 250, 2), ("a@client.test", 250, 1),
        ("c@client.test", 554, 1),
    ]  # fmt: skip
    mirrored = messages[1]
    assert sorted(leg["dest"] for leg in mirrored["legs"]) == sorted(
        [peers["plain"].address, peers["mirror"].address]
    )
    assert messages[2]["to"] == ["three@example.org"]  # the refused recipient is not on it
    assert messages[3]["legs"][0]["reply"].startswith("554 5.7.1 Rejected by policy")

    only = logalyze(log, "-v", "-d", peers["mirror"].address, "--from", "B@Client.test")
    [line] = only.stdout.splitlines()
    assert " from=<b@client.test> to=<two@example.net> " in line and line.count(" | ") == 2
