"""Writes the fixture logs beside this file from DeliveryEvents, with the server's own writers
(`to_log_line`, `to_json`). Run it again after a change of the log format:

    .venv/bin/python tests/tools/logs/generate.py

The story (2026-11-25, UTC), and what tests/tools/test_logalyze.py expects of it:
- 10:05 M1 alice@sender.example (192.0.2.7) -> bob@example.org: one leg to :2525, 250.
- 10:06 refused, relay-denied (alice, 192.0.2.7).
- 10:20 M2 alice -> carol@example.net, mirrored: legs to :2525 and :2626, both 250.
- 11:10 M3 Bob@Other.example (198.51.100.9) -> dave, erin: failover :2525|:2626, :2626 took it.
- 11:30 M4 bob -> frank: the leg to :2525 answers 451, the client is told 451.
- 11:31 refused, destination-refused by :2525 (bob).
- 12:15 M5 null sender (192.0.2.8) -> gina: the leg to :2727 cannot connect (code 0); 451.
- 12:16 refused, lookup-failed (null sender, 192.0.2.8).
- 12:40 M6 alice -> hank: the leg to :2525 answers 554, the client is told 554.
- 12:50, 12:51 connections from 203.0.113.5 refused (connection-limit) and dropped
  (protocol-errors).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from moxy.accounting.events import DeliveryEvent

HERE = Path(__file__).resolve().parent
A, B, C = "127.0.0.1:2525", "127.0.0.1:2626", "127.0.0.1:2727"
ALICE, BOB = "alice@sender.example", "Bob@Other.example"


def at(hhmm: str, seconds: float = 0.0) -> float:
    hour, minute = map(int, hhmm.split(":"))
    return datetime(2026, 11, 25, hour, minute, tzinfo=UTC).timestamp() + seconds


def event(kind: str, when: float, n: int, **fields: object) -> DeliveryEvent:
    values: dict[str, object] = {
        "session_id": f"676D4200000{n}", "message_id": f"676D4200000{n}.1",
        "client_ip": "192.0.2.7", "helo": "mail.sender.example", "mail_from": ALICE,
        "recipients": (), "destination": "-", "route": "", "size": 0, "code": 250,
        "reply": "250 2.0.0 Ok: queued as X", "stage": "end-of-data", "duration": 0.012,
        "node": "mx1", "reason": "",
    }  # fmt: skip
    values.update(fields)
    return DeliveryEvent(kind=kind, time=when, **values)  # type: ignore[arg-type]


def message(
    when: float, n: int, legs: list[dict[str, object]], **fields: object
) -> list[DeliveryEvent]:
    """The legs (each a dict of fields over the message's own), then the message line."""
    lines = [event("leg", when, n, **{**fields, **leg}) for leg in legs]
    route = " ".join(str(leg["route"]) for leg in legs)
    return [*lines, event("message", when + 0.001, n, route=route, **fields)]


def story() -> list[DeliveryEvent]:
    bob = {"mail_from": BOB, "client_ip": "198.51.100.9", "helo": "mx.other.example"}
    null = {"mail_from": "", "client_ip": "192.0.2.8", "helo": "bounce.example"}
    return [
        *message(at("10:05"), 1, [{"destination": A, "route": A, "size": 1000}],
                 recipients=("bob@example.org",), size=900),
        event("refused", at("10:06"), 1, recipients=("x@elsewhere.example",), code=550,
              reply="550 5.7.1 Relaying denied", stage="rcpt", reason="relay-denied",
              message_id=""),
        *message(at("10:20"), 2, [
            {"destination": A, "route": A, "size": 2000},
            {"destination": B, "route": B, "size": 2000},
        ], recipients=("carol@example.net",), size=1900),
        *message(at("11:10"), 3, [{"destination": B, "route": f"{A}|{B}", "size": 3000}],
                 recipients=("dave@example.org", "erin@example.org"), size=2900, **bob),
        *message(at("11:30"), 4, [
            {"destination": A, "route": A, "size": 500, "code": 451,
             "reply": "451 4.3.0 Try later"},
        ], recipients=("frank@example.org",), size=400, code=451,
           reply="451 4.3.0 Try later", **bob),
        event("refused", at("11:31"), 4, recipients=("nobody@example.org",), code=550,
              destination=A, route=A, reply="550 5.1.1 No such user", stage="rcpt",
              reason="destination-refused", **bob),
        *message(at("12:15"), 5, [
            {"destination": C, "route": C, "size": 0, "code": 0, "stage": "connect",
             "reply": "connection refused"},
        ], recipients=("gina@example.net",), size=100, code=451,
           reply="451 4.4.1 No destination available", **null),
        event("refused", at("12:16"), 5, recipients=("z@example.net",), code=451,
              reply="451 4.3.0 Route lookup failed", stage="rcpt", reason="lookup-failed",
              **null),
        *message(at("12:40"), 6, [
            {"destination": A, "route": A, "size": 600, "code": 554,
             "reply": "554 5.7.1 Spam"},
        ], recipients=("hank@example.org",), size=500, code=554, reply="554 5.7.1 Spam"),
        event("connection", at("12:50"), 7, client_ip="203.0.113.5", helo="", mail_from="",
              message_id="", code=421, reply="421 4.7.0 Too many connections",
              stage="connect", reason="connection-limit"),
        event("connection", at("12:51"), 8, client_ip="203.0.113.5", helo="x", mail_from="",
              message_id="", code=421, reply="421 4.7.0 Too many errors", stage="command",
              reason="protocol-errors"),
    ]  # fmt: skip


MALFORMED_TAIL = [
    "",  # blank lines are not malformed
    "this is not a log line",
    '2026-11-25T13:00:00.000Z leg node=mx1 session=S id=S.1 client=192.0.2.7 helo=h from=<a@b>'
    ' to=<c@d> dest=127.0.0.1:2525 route=127.0.0.1:2525 size=lots code=250 stage=end-of-data'
    ' reason=- duration=0.001 reply="250 ok"',
    '2026-11-25T13:00:00.000Z bounce node=mx1 session=S id=S.1 client=192.0.2.7 helo=h'
    ' from=<a@b> to=<c@d> dest=- route=- size=1 code=250 stage=end-of-data reason=-'
    ' duration=0.001 reply="250 ok"',
    '{"time": "2026-11-25T13:00:00.000Z", "kind": "leg", "size": "12"}',
    '{"time": "2026-11-25T13:00:00.000Z", "kind": "leg", "dest": "127.0.0.1:2525"',
    "2026-11-25T13:00:00.000Z leg node=mx1 session=S id=S.1 client=192.0.2.7 helo=h",
]

# A leg and its message as logs were written before `node` and `reason` existed.
OLD_FORMAT = [
    '2026-11-24T09:00:00.250Z leg session=5E1 id=5E1.1 client=192.0.2.9 helo=old.example'
    ' from=<old@old.example> to=<u@example.org> dest=127.0.0.1:2525 route=127.0.0.1:2525'
    ' size=700 code=250 stage=end-of-data duration=0.010 reply="250 2.0.0 Ok"',
    '2026-11-24T09:00:00.251Z message session=5E1 id=5E1.1 client=192.0.2.9'
    ' helo=old.example from=<old@old.example> to=<u@example.org> dest=-'
    ' route=127.0.0.1:2525 size=650 code=250 stage=end-of-data duration=0.010'
    ' reply="250 2.0.0 Ok"',
]


def main() -> None:
    events = story()
    text = [e.to_log_line() for e in events]
    json_lines = [e.to_json() for e in events]
    mixed = [json_lines[i] if i % 2 else text[i] for i in range(len(events))]
    files = {
        "messages.log": text,
        "messages.jsonl": json_lines,
        "mixed.log": mixed,
        "malformed.log": text[:3] + MALFORMED_TAIL + text[3:],
        "old-format.log": OLD_FORMAT,
    }
    for name, lines in files.items():
        (HERE / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
