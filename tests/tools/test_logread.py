"""The log reader against the server's own writers: every event `to_log_line` or `to_json`
writes reads back as the same event (time to the millisecond, duration to 3 decimals)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy.accounting.events import KINDS, DeliveryEvent, log_line, log_lines
from moxy.tools.logread import _KEYS, BadLine, _careful_fields, _text_fields, parse_line

token = st.text("ABCDEF0123456789.", min_size=1, max_size=16)
host = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?", fullmatch=True)
# Addresses as MAIL/RCPT let them through, quoted local parts with spaces included.
address = st.from_regex(r'([a-z0-9.+_-]{1,12}|"[a-z =,]{1,8}")@[a-z0-9.-]{1,12}', fullmatch=True)
destination = st.builds(lambda h, p: f"{h}:{p}", host, st.integers(1, 65535))
group = st.lists(destination, min_size=1, max_size=3).map("|".join)
reply = st.text(
    st.characters(codec="utf-8", blacklist_characters="\r\n\x85\u2028\u2029"),
    max_size=60,
)

events = st.builds(
    DeliveryEvent,
    kind=st.sampled_from(KINDS),
    session_id=token,
    message_id=token | st.just(""),
    client_ip=st.ip_addresses().map(str),
    helo=host | st.just(""),
    mail_from=address | st.just(""),
    recipients=st.lists(address, max_size=4).map(tuple),
    destination=destination | st.just("-"),
    route=st.lists(group, max_size=3).map(" ".join),  # a message's route lists its groups
    size=st.integers(0, 10**12),
    code=st.integers(0, 599),
    reply=reply,
    stage=st.sampled_from(["end-of-data", "data", "rcpt", "body", "connect"]),
    duration=st.floats(0, 10_000, allow_nan=False),
    node=host | st.just(""),
    reason=st.sampled_from(["", "relay-denied", "lookup-failed", "timeout"]),
    # As sessions record it (tls_field's form), or "" without STARTTLS: never a bare "-",
    # which the log writes for "no TLS".
    tls=st.just("") | st.from_regex(r"TLSv1\.[23]:[A-Z0-9_]{1,30}", fullmatch=True),
    time=st.floats(0, 4_000_000_000, allow_nan=False),
)


def same(parsed: DeliveryEvent, written: DeliveryEvent, reply: str) -> None:
    assert abs(parsed.time - written.time) < 0.0011
    assert abs(parsed.duration - written.duration) < 0.00051
    assert parsed._replace(time=0.0, duration=0.0) == written._replace(
        reply=reply, time=0.0, duration=0.0
    )


@given(events)
def test_a_text_line_reads_back_as_its_event(event: DeliveryEvent) -> None:
    line = event.to_log_line()
    same(parse_line(line), event, event.reply.replace("\n", " ").replace('"', "'"))


@given(events)
def test_a_json_line_reads_back_as_its_event(event: DeliveryEvent) -> None:
    same(parse_line(event.to_json()), event, event.reply)


@given(events, st.lists(st.tuples(events, st.sets(st.sampled_from(DeliveryEvent._fields))),
                        max_size=8))
def test_a_batch_writes_each_event_as_its_own_line(
    first: DeliveryEvent, changes: list[tuple[DeliveryEvent, set[str]]]
) -> None:
    """log_lines formats again only the parts whose fields are other objects than on the line
    before: events that share some field objects (as a message's leg and message events do)
    still each get their own line."""
    batch = [first]
    for other, fields in changes:
        batch.append(batch[-1]._replace(**{name: getattr(other, name) for name in fields}))
    assert log_lines(batch) == "".join(log_line(event) + "\n" for event in batch)


def test_quoted_local_parts_may_look_like_fields() -> None:
    event = DeliveryEvent(
        kind="leg", session_id="S", message_id="S.1", client_ip="192.0.2.7", helo="h",
        mail_from='"a to=b"@x.example', recipients=('"c dest=d"@y.example', "e@f"),
        destination="127.0.0.1:25", route="127.0.0.1:25", size=1, code=250, reply="ok",
        stage="end-of-data", duration=0.0, time=0.0,
    )  # fmt: skip
    same(parse_line(event.to_log_line()), event, "ok")


LINE = (
    '2026-11-25T22:40:18.105Z leg node=mx1 session=S id=S.1 client=192.0.2.7 helo=h from=<a@b>'
    ' to=<c@d> dest=127.0.0.1:25 route=127.0.0.1:25 size=400 code=250 stage=end-of-data'
    ' reason=- duration=0.002 reply="250 ok"'
)


@pytest.mark.parametrize(
    "broken",
    [
        LINE.replace("size=400", "size=-1"),
        LINE.replace(" leg ", " bounce "),
        LINE.replace("from=<a@b>", "from=a@b"),
        LINE.replace("to=<c@d>", "to=c@d"),
        LINE.replace(" session=S", ""),
        LINE.replace("2026-11-25T22:40:18.105Z", "yesterday"),
        LINE.replace("duration=0.002", "duration=soon"),
        LINE[:-1],
        LINE + " extra",
        '{"kind": "leg", "time": "2026-11-25T22:40:18Z", "size": true}',
        '{"kind": "leg", "time": "2026-11-25T22:40:18Z", "code": -250}',
        '{"kind": "leg", "time": "2026-11-25T22:40:18Z", "to": "a@b"}',
        '{"kind": "leg"}',
        "[1, 2]",
        # Digits to str.isdigit() that int() refuses, and more digits than int() converts.
        LINE.replace("size=400", "size=\u00b2"),
        LINE.replace("code=250", "code=\u0663"),
        LINE.replace("size=400", "size=" + "9" * 5000),
        LINE.replace("size=400", "size=" + "9" * 19),
        '{"kind": "leg", "time": "2026-11-25T22:40:18Z", "size": 1' + "0" * 4000 + "}",
        # Nested deeper than the JSON decoder's recursion: RecursionError, not ValueError.
        '{"a": ' * 200_000 + "1" + "}" * 200_000,
    ],
)
def test_broken_lines_are_bad_lines(broken: str) -> None:
    with pytest.raises(BadLine):
        parse_line(broken)


# Field values without spaces, made of what confuses a reader that looks for ` key=`: equals
# signs, brackets, commas and the keys' own names.
bare = st.lists(st.sampled_from([*"ab=<>,-.", "to", "dest", "from", "node", "reply"]),
                max_size=6).map("".join)


def fields_or_error(read: Callable[[str], dict[str, str]], rest: str) -> object:
    try:
        return read(rest)
    except BadLine as exc:
        return str(exc)


# In a field's place: the field as written (`key=value`), its key alone, or other text.
piece = st.tuples(st.sampled_from(["field"] * 6 + ["key", "other"]), bare)


def written(key: str, form: str, value: str) -> str:
    return {"field": f"{key}={value}", "key": key, "other": value}[form]


@given(st.lists(piece, min_size=len(_KEYS), max_size=len(_KEYS)))
def test_the_quick_split_reads_fields_as_the_careful_reader_does(
    pieces: list[tuple[str, str]]
) -> None:
    """A line of as many pieces as there are fields, none with a space: split at its spaces
    when every piece is its field, else read carefully; the same fields (or the same error)
    as `_careful_fields` gives, whatever the values look like."""
    rest = "".join(" " + written(key, form, value)
                   for key, (form, value) in zip(_KEYS, pieces, strict=True))
    assert fields_or_error(_text_fields, rest) == fields_or_error(_careful_fields, rest)


@given(events)
def test_lines_the_server_writes_read_alike_either_way(event: DeliveryEvent) -> None:
    rest = " " + log_line(event).rpartition(' reply="')[0].split(" ", 2)[2]
    assert _text_fields(rest) == _careful_fields(rest)
