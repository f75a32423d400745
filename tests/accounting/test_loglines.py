"""The message log's lines in C (moxy.accounting._loglines, in the native build) against their
reference: `encode_lines` against `events.log_lines`, byte for byte the same lines, or None
where it leaves a batch to Python (the file sink writes the same file either way)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy import native
from moxy.accounting.events import DeliveryEvent, expand, log_lines
from moxy.accounting.filesink import FileSink
from moxy.accounting.settings import FileSinkSettings

from .generated import BASE, events, ordinary

if "moxy.accounting._loglines" not in native.compiled():
    # A pure-Python checkout (no .so files at all): `make test` always builds it, and
    # conftest.py fails the run under MOXY_EXPECT_NATIVE=1 when it is missing.
    pytest.skip("pure Python: no C lines to compare", allow_module_level=True)

from moxy.accounting._loglines import encode_lines as encode


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


def test_its_buffer_kept_between_calls_holds_nothing_of_the_last_batch() -> None:
    """The buffer is kept from call to call, and let go of after a batch of over 4 MiB: each
    result is that batch's lines, whatever came before (a longer batch, a huge one, one left
    to Python halfway)."""
    long_reply = BASE._replace(reply="250 " + "x" * 3000)
    huge = [long_reply] * 1600  # about 5 MiB of lines
    odd = BASE._replace(mail_from="s\udce9@c.test")
    for batch in ([BASE] * 50, [BASE], huge, [BASE._replace(kind="message")], [BASE] * 3 + [odd],
                  [BASE._replace(helo="h")], [long_reply] * 2):
        out = encode(batch)
        assert (out is None) == (batch[-1] is odd)
        assert out is None or out == python(batch)
    assert len(python(huge)) > 4 << 20


def test_the_file_sink_writes_the_same_file_either_way(tmp_path: Path) -> None:
    odd = BASE._replace(mail_from="s\udce9@c.test")  # Python's batch
    path = tmp_path / "messages.log"
    sink = FileSink(FileSinkSettings(path))
    sink._write([[BASE, BASE._replace(kind="message")]], 2)
    sink._write([[odd]], 1)
    assert path.read_bytes() == python([BASE, BASE._replace(kind="message")]) + python([odd])
    assert b"s?@c.test" in path.read_bytes()


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
