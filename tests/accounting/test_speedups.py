"""The accounting process's C loops (moxy.accounting._speedups, in the native build) against
their references: `encode_lines` against `events.log_lines` (byte for byte the same lines, or
None where it leaves a batch to Python; the file sink writes the same file either way),
`expand` against `events.expand_in_python`, and `sum_known` against `counters.sum_known` (the
same sums, through the Redis sink's loop)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy import native
from moxy.accounting import counters
from moxy.accounting import events as acct
from moxy.accounting.events import LEG_AND_MESSAGE, DeliveryEvent, expand, log_lines
from moxy.accounting.filesink import FileSink
from moxy.accounting.settings import FileSinkSettings

if "moxy.accounting._speedups" not in native.compiled():
    # A pure-Python checkout (no .so files at all): `make test` always builds it, and
    # conftest.py fails the run under MOXY_EXPECT_NATIVE=1 when it is missing.
    pytest.skip("pure Python: no C loops to compare", allow_module_level=True)

from moxy.accounting._speedups import encode_lines as encode

BASE = DeliveryEvent(
    kind="leg", session_id="S1", message_id="S1.1", client_ip="192.0.2.7", helo="c.test",
    mail_from="s@c.test", recipients=("a@x.test",), destination="127.0.0.1:2525",
    route="127.0.0.1:2525", size=120, code=250, reply="2.0.0 Ok: queued as 4F", stage="end-of-data",
    duration=0.0123, node="n1", reason="", tls="", time=1_764_000_000.25,
)

# Any text, UTF-8 or not (lone surrogates: what surrogateescape makes of bad bytes), quotes
# and line breaks included.
text = st.text(st.characters(), max_size=12)
plain = st.text(st.characters(codec="utf-8"), max_size=12)
anything = text | st.just("")
times = (st.floats(0, 253_402_300_799.0, allow_nan=False)
         | st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 5))
durations = st.floats(allow_nan=True, allow_infinity=True) | st.integers(0, 3)
ints = st.integers(-2**70, 2**70) | st.booleans()

events = st.builds(
    DeliveryEvent,
    kind=st.sampled_from(["leg", "message", "refused", "connection"]),
    session_id=text, message_id=anything, client_ip=text, helo=anything, mail_from=anything,
    recipients=st.lists(text, max_size=3).map(tuple), destination=text, route=anything,
    size=ints, code=ints, reply=text, stage=text, duration=durations, node=anything,
    reason=anything,
    tls=anything | st.just("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits)"),
    time=times,
)
# What sessions hand over: valid UTF-8, the time and durations of a running server, ints.
ordinary = st.builds(
    DeliveryEvent,
    kind=st.sampled_from(["leg", "message", "refused", "connection"]),
    session_id=plain, message_id=plain, client_ip=plain, helo=plain, mail_from=plain,
    recipients=st.lists(plain, max_size=3).map(tuple), destination=plain, route=plain,
    size=st.integers(-2**63, 2**63 - 1), code=st.integers(0, 999), reply=plain, stage=plain,
    duration=st.floats(0, 1e6), node=plain, reason=plain,
    tls=st.just("") | st.from_regex(r"TLSv1\.[23]:[A-Z0-9_]{1,30}", fullmatch=True),
    time=st.floats(0, 4_000_000_000),
)


def python(batch: list[DeliveryEvent]) -> bytes:
    return log_lines(batch).encode("utf-8", "replace")


@given(st.lists(events, max_size=6))
def test_it_writes_what_log_lines_writes_or_leaves_the_batch_to_python(
    batch: list[DeliveryEvent],
) -> None:
    out = encode(batch)
    assert out is None or out == python(batch)


@given(st.lists(ordinary, min_size=1, max_size=6))
def test_what_sessions_emit_it_formats_itself(batch: list[DeliveryEvent]) -> None:
    assert encode(batch) == python(batch)


@given(ordinary, st.lists(st.tuples(ordinary, st.sets(st.sampled_from(DeliveryEvent._fields))),
                          max_size=8))
def test_events_sharing_field_objects_each_get_their_own_line(
    first: DeliveryEvent, changes: list[tuple[DeliveryEvent, set[str]]]
) -> None:
    """It formats a time or a duration once for the events that share that object (a
    message's two lines); events that share some fields and not others stay themselves."""
    batch = [first]
    for other, fields in changes:
        batch.append(batch[-1]._replace(**{name: getattr(other, name) for name in fields}))
    assert encode(batch) == python(batch)


def test_a_message_of_one_leg_gives_the_same_two_lines() -> None:
    fields = ("leg+message", *BASE[1:], 100, 250, "2.0.0 Ok", "TLSv1.3:TLS_AES_128_GCM_SHA256")
    batch = expand([fields, fields])
    assert encode(batch) == python(batch)
    assert encode(batch).count(b"\n") == 4  # type: ignore[union-attr]


@pytest.mark.parametrize("change", [
    {"mail_from": "s\udce9@c.test"},  # not UTF-8: Python writes "?" for it
    {"time": -1.5},
    {"time": math.inf},
    {"time": 1},  # an int
    {"time": 253_402_300_800.0},  # year 10000
    {"size": True},
    {"size": 2**64},
    {"code": 250.0},
    {"duration": 1},
    {"duration": 1e40},
    {"recipients": ["a@x.test"]},  # a list
    {"node": None},
    {"tls": "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits)"},
])
def test_the_unexpected_is_left_to_python(change: dict[str, object]) -> None:
    event = BASE._replace(**change)
    assert encode([BASE, event]) is None
    assert encode([BASE]) == python([BASE])


def test_texts_that_need_care() -> None:
    batch = [
        BASE._replace(reply='550 "no"\nsecond line', recipients=()),
        BASE._replace(reply="250 déjà vu ✓", mail_from="josé@exämple.test", helo=""),
        BASE._replace(recipients=("a@x", "b@y", "c@z"), message_id="", route="", node=""),
        BASE._replace(size=-3, code=0, duration=-0.0, reason="relay-denied"),
        BASE._replace(duration=0.0005, time=0.0),  # rounds up: .3f of 0.000500000000000000010
        BASE._replace(duration=0.0625, time=59.9999),  # an exact tie: rounds to even
        BASE._replace(time=1_764_000_000.9995),
        BASE._replace(time=253_402_300_799.999),
    ]
    assert encode(batch) == python(batch)


def test_objects_are_not_mistaken_for_the_last_calls() -> None:
    """Within a call it reuses a time's or a duration's text for the same object; a later call
    may get other objects at those addresses, so it starts afresh."""
    for n in range(200):
        event = BASE._replace(time=1_764_000_000.0 + n / 7, duration=n / 3)
        assert encode([event]) == python([event])


def test_the_file_sink_writes_the_same_file_either_way(tmp_path: Path) -> None:
    odd = BASE._replace(mail_from="s\udce9@c.test")  # Python's batch
    path = tmp_path / "messages.log"
    sink = FileSink(FileSinkSettings(path))
    sink._write([BASE, BASE._replace(kind="message")])
    sink._write([odd])
    assert path.read_bytes() == python([BASE, BASE._replace(kind="message")]) + python([odd])
    assert b"s?@c.test" in path.read_bytes()


# --- expand -----------------------------------------------------------------------------------

def both(event: DeliveryEvent, size: object, code: object, reply: object,
         leg_tls: object) -> tuple[object, ...]:
    """A LEG_AND_MESSAGE entry made of an event's fields (as session_events makes them)."""
    return (LEG_AND_MESSAGE, *event[1:], size, code, reply, leg_tls)


entries = st.one_of(
    events.map(tuple),
    st.builds(both, events, ints, ints, text, anything),
    st.lists(st.integers(), min_size=1, max_size=30).map(tuple),  # any length: copied as is
)


def same_events(got: list[DeliveryEvent], want: list[DeliveryEvent]) -> None:
    assert [type(e) for e in got] == [type(e) for e in want]
    assert [tuple(e) for e in got] == [tuple(e) for e in want]


@given(st.lists(entries, max_size=8))
def test_expand_makes_what_python_makes(emitted: list[tuple[object, ...]]) -> None:
    made = expand(emitted)
    same_events(made, acct.expand_in_python(emitted))
    assert all(type(e) is DeliveryEvent for e in made)


def test_expand_keeps_the_objects_it_is_given() -> None:
    """The leg and the message share the entry's objects (the log formats a time once)."""
    entry = both(BASE, 100, 251, "251 forwarded", "TLSv1.3:X")
    leg, message = expand([entry, ("message", *BASE[1:])])[:2]
    assert leg.time is message.time is entry[17]
    assert leg.duration is message.duration is entry[13]
    assert leg.tls == "TLSv1.3:X" and message.tls == ""
    assert (message.size, message.code, message.reply) == (100, 251, "251 forwarded")
    assert (message.destination, message.stage, message.reason) == ("-", "end-of-data", "")


@pytest.mark.parametrize("emitted", [
    [both(BASE, 1, 2, "r", "")[:-1]],  # a LEG_AND_MESSAGE entry one field short: ValueError
    [()],  # IndexError
    [("leg",), ["a", "list"]],  # a list: Python copies it into an event
])
def test_expand_leaves_the_unexpected_to_python(emitted: list[object]) -> None:
    from moxy.accounting import _speedups

    assert _speedups.expand(emitted, DeliveryEvent, LEG_AND_MESSAGE) is None
    try:
        want = acct.expand_in_python(emitted)  # type: ignore[arg-type]
    except (ValueError, IndexError) as exc:
        with pytest.raises(type(exc)):
            expand(emitted)  # type: ignore[arg-type]
    else:
        same_events(expand(emitted), want)  # type: ignore[arg-type]


# --- sum_known: the Redis sink's loop --------------------------------------------------------


def key_of(event: DeliveryEvent) -> tuple[object, ...] | None:
    what = counters.tally(event)
    return None if what is None else (int(event.time // 60), *what)


def sink_loop(known: object, batch: list[DeliveryEvent], sums: dict[object, list[object]]) -> None:
    """What RedisSink.write does with `known` (C or Python): the events it stops at get a new
    sum (or are counted) in Python."""
    i = 0
    while i < len(batch):
        i = known(batch, sums, i)  # type: ignore[operator]
        if i >= len(batch):
            break
        event = batch[i]
        i += 1
        key = key_of(event)
        if key is None:
            continue
        entry = sums.setdefault(key, [0, 0, "counted"])
        entry[0] += 1  # type: ignore[operator]
        entry[1] += event.size  # type: ignore[operator]


def outcome_of(known: object, batch: list[DeliveryEvent],
               sums: dict[object, list[object]]) -> tuple[object, ...]:
    sums = {key: list(entry) for key, entry in sums.items()}
    try:
        sink_loop(known, batch, sums)
    except Exception as exc:  # the same error, raised at the same point
        return (type(exc), sums)
    return (None, sums)


@given(st.lists(events, max_size=8), st.data())
def test_sum_known_sums_what_python_sums(batch: list[DeliveryEvent], data: st.DataObject) -> None:
    """Any fields (bools, huge ints, NaN and infinite times): the sink's loop ends with the same
    sums, or fails with the same error, whether it runs C or Python."""
    from moxy.accounting import _speedups

    keys = []
    for event in batch:
        try:
            key = key_of(event)
        except (ValueError, OverflowError, TypeError):
            continue
        if key is not None:
            keys.append(key)
    known = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
    sums: dict[object, list[object]] = {key: [3, 7, "counted"] for key in known}
    assert outcome_of(_speedups.sum_known, batch, sums) == \
        outcome_of(counters.sum_known, batch, sums)


@given(st.lists(ordinary, min_size=1, max_size=8))
def test_sum_known_counts_what_sessions_emit_in_one_call(batch: list[DeliveryEvent]) -> None:
    """Ordinary events whose sums exist: one call adds them all, as Python does."""
    from moxy.accounting import _speedups

    sums = {key: [0, 0, "counted"] for key in map(key_of, batch) if key is not None}
    theirs = {key: list(entry) for key, entry in sums.items()}
    assert _speedups.sum_known(batch, sums, 0) == len(batch)
    assert counters.sum_known(batch, theirs, 0) == len(batch)
    assert sums == theirs


@given(st.floats(-1e18, 1e18, allow_nan=False) | st.sampled_from(
    [-0.0, -1e-300, 59.99999999999999, 60.0, -60.0, -59.99999999999999, 1e17 + 60.0]))
def test_sum_known_finds_the_minute_python_computes(when: float) -> None:
    """The minute is Python's `int(time // 60)`, to the last rounding."""
    from moxy.accounting import _speedups

    event = DeliveryEvent(**{**BASE._asdict(), "time": when})
    sums = {key_of(event): [0, 0, "counted"]}
    assert _speedups.sum_known([event], sums, 0) == 1
    assert sums[key_of(event)][:2] == [1, BASE.size]


@pytest.mark.parametrize(("change", "why"), [
    ({"recipients": ["a@x.test"]}, "unhashable: Python raises TypeError"),
    ({"code": True}, "a bool code"),
    ({"code": 2**70}, "a code beyond a C long"),
    ({"size": 1.5}, "a float size"),
    ({"time": math.nan}, "int(nan // 60) raises ValueError"),
    ({"time": "1764000000"}, "a str time: TypeError"),
])
def test_sum_known_stops_at_what_it_leaves_to_python(change: dict[str, object], why: str) -> None:
    from moxy.accounting import _speedups

    ordinary_one = BASE._replace(recipients=("b@y.test",))
    odd = BASE._replace(**change)
    batch = [ordinary_one, odd, ordinary_one]
    sums: dict[object, list[object]] = {key_of(ordinary_one): [0, 0, "counted"]}
    assert _speedups.sum_known(batch, sums, 0) == 1, why
    assert _speedups.sum_known(batch, sums, 2) == 3
    assert sums[key_of(ordinary_one)][:2] == [2, 2 * BASE.size]
    assert outcome_of(_speedups.sum_known, batch, {}) == outcome_of(counters.sum_known, batch, {})


def test_sum_known_passes_over_what_counts_nothing() -> None:
    from moxy.accounting import _speedups

    batch = [BASE._replace(kind=kind) for kind in ("message", "connection", "message")]
    assert _speedups.sum_known(batch, {}, 0) == 3
    assert _speedups.sum_known(batch, {}, 5) == 5  # past the end: nothing to do


@pytest.mark.parametrize("code", [0, 199, 200, 250, 299, 300, 550, -250])
def test_sum_known_tells_delivered_from_refused_as_python_does(code: int) -> None:
    """A leg's outcome (in the key): delivered for 2xx, a refused copy otherwise."""
    from moxy.accounting import _speedups

    event = BASE._replace(code=code)
    other = counters.LEG_REFUSED if 200 <= code < 300 else counters.DELIVERED
    sums = {key_of(event): [0, 0, "counted"],
            (*key_of(event)[:1], other, *key_of(event)[2:]): [0, 0, "other"]}  # type: ignore[index]
    assert _speedups.sum_known([event], sums, 0) == 1
    assert sums[key_of(event)][:2] == [1, BASE.size]


def test_sum_known_leaves_a_sum_that_is_not_ints_to_python() -> None:
    """Adding to anything but ints could run Python code while C borrows the entry."""
    from moxy.accounting import _speedups

    sums: dict[object, list[object]] = {key_of(BASE): [1.5, 0, "counted"]}
    assert _speedups.sum_known([BASE], sums, 0) == 0
    want = (None, {key_of(BASE): [2.5, BASE.size, "counted"]})
    assert outcome_of(_speedups.sum_known, [BASE], sums) == want
    assert outcome_of(counters.sum_known, [BASE], sums) == want


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1), st.sampled_from(
    ["leg", "message", "refused"]), st.sampled_from([250, 550]), st.floats(0, 59.9)),
    max_size=12), st.data())
def test_sum_known_adds_runs_of_events_sharing_their_objects(
    shapes: list[tuple[int, int, str, int, float]], data: st.DataObject
) -> None:
    """Consecutive events whose tally fields are the very same objects (as the accounting
    process unpacks them) add to the sum of the event before without a lookup of their own:
    still exactly where Python adds them, a new minute, outcome or tally taking its own sum,
    and an event without a sum stopping the loop there."""
    from moxy.accounting import _speedups

    tallies = [  # destination, recipients, sender, client, node: one set of objects each
        ("127.0.0.1:2525", ("a@x.test",), "s@c.test", "192.0.2.7", "n1"),
        ("127.0.0.1:2526", ("a@x.test", "b@x.test"), "t@c.test", "192.0.2.8", "n1"),
    ]
    batch = [
        BASE._replace(kind=kind, code=code, time=1_764_000_000.0 + 60 * minute + second,
                      destination=tally[0], recipients=tally[1], mail_from=tally[2],
                      client_ip=tally[3], node=tally[4])
        for minute, which, kind, code, second in shapes for tally in [tallies[which]]
    ]
    keys = sorted({key for key in map(key_of, batch) if key is not None}, key=repr)
    known = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
    sums: dict[object, list[object]] = {key: [3, 7, "counted"] for key in known}
    assert outcome_of(_speedups.sum_known, batch, sums) == \
        outcome_of(counters.sum_known, batch, sums)
    stop = _speedups.sum_known(batch, {key: [0, 0] for key in known}, 0)
    assert stop == counters.sum_known(batch, {key: [0, 0] for key in known}, 0)


@pytest.mark.parametrize("duration", [
    0.0, 0.0005, 0.0015, 0.0025, 0.0035, 0.1235, 0.9995, 1.0005, 2.675, 123.4565, 999.9995,
    999_999.9995, 999_999.999, 1e6 - 1e-10, 1e6, 5e-324, 1e-7, 0.00049999999999999, -0.0,
    -0.0005, 1e30,
])
def test_a_duration_is_rounded_as_python_rounds_it(duration: float) -> None:
    """The line's duration is `format(duration, ".3f")`, ties and their neighbours included
    (beyond 10^36 seconds C leaves the batch to Python)."""
    event = BASE._replace(duration=duration)
    assert encode([event]) == python([event])


@given(st.integers(0, 10**9 - 1), st.sampled_from([0.0, 0.0004, 0.0005, 0.0006]),
       st.sampled_from([-1e-12, 0.0, 1e-12]))
def test_thousandths_near_a_tie_are_rounded_as_python_rounds_them(
    thousandths: int, offset: float, nudge: float
) -> None:
    duration = thousandths / 1000 + offset + nudge
    if duration >= 0:
        event = BASE._replace(duration=duration)
        assert encode([event]) == python([event])
