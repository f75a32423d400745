"""The accounting process's other C loops (moxy.accounting._speedups, in the native build)
against their references: `expand` against `events.expand_in_python`, and `sum_known` against
`counters.sum_known` (the same sums, through the Redis sink's loop)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy import native
from moxy.accounting import counters
from moxy.accounting import events as acct
from moxy.accounting.events import LEG_AND_MESSAGE, DeliveryEvent, expand

from .generated import BASE, anything, events, ints, ordinary, text

if "moxy.accounting._speedups" not in native.compiled():
    # A pure-Python checkout (no .so files at all): `make test` always builds it, and
    # conftest.py fails the run under MOXY_EXPECT_NATIVE=1 when it is missing.
    pytest.skip("pure Python: no C loops to compare", allow_module_level=True)


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


def test_sum_known_finds_the_minute_at_its_edges_after_the_minute_before() -> None:
    """C remembers the last minute it computed: times just inside and just outside its edges,
    one after another (in one call and in calls one after another), get Python's minute."""
    from moxy.accounting import _speedups

    start = 29_000_000 * 60.0  # 2025
    times = [start + 30.0, math.nextafter(start, 0.0), start, math.nextafter(start + 60.0, 0.0),
             start + 60.0, start + 30.0, start - 60.0, 1e12 + 30.0, 1e12 + 90.0, 59.5, 60.0]
    batch = [DeliveryEvent(**{**BASE._asdict(), "time": when}) for when in times]
    assert len({key_of(event) for event in batch}) == 7
    for calls in (batch, *([event] for event in batch)):
        sums: dict[object, list[object]] = {key_of(e): [0, 0, "counted"] for e in batch}
        theirs = {key: list(entry) for key, entry in sums.items()}
        assert _speedups.sum_known(calls, sums, 0) == len(calls)
        assert counters.sum_known(calls, theirs, 0) == len(calls)
        assert sums == theirs


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
