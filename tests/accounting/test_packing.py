"""The events' encoding on the accounting process's pipe (moxy.accounting.packing) and its C
twins (moxy.accounting._packer and _frames, native build): every event comes back as it went,
a repeated field is one byte, the C Packer writes the same frames and the C unpack reads the
same events as the reference, and anything that is not a payload is refused by both alike
(ValueError, FrameError on the pipe)."""

from __future__ import annotations

import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moxy import native
from moxy.accounting import packing, pipe
from moxy.accounting.events import DeliveryEvent

NATIVE = "moxy.accounting._frames" in native.compiled()
if NATIVE:
    from moxy.accounting import _frames, _packer
PAIR = "leg+message"

# Lone surrogates included (what surrogateescape makes of bad bytes in an address).
text = st.text(st.characters(), max_size=8)
plain_fields = (
    text | st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True)
    | st.lists(text, max_size=3).map(tuple)
)
odd_fields = (
    st.integers(-2**80, 2**80) | st.booleans() | st.none() | st.binary(max_size=5)
    | st.lists(st.integers(0, 3) | text, max_size=3).map(tuple)
)


@st.composite
def event_lists(draw: st.DrawFn, fields: st.SearchStrategy[Any]) -> list[tuple[Any, ...]]:
    """Events drawn from a small pool of values, so that fields repeat (SAME) and do not."""
    pool = draw(st.lists(fields, min_size=1, max_size=6))
    pick = st.sampled_from(pool) | fields
    sizes = st.integers(1, 5)
    return [tuple(draw(st.lists(pick, min_size=n, max_size=n)))
            for n in draw(st.lists(sizes, max_size=6))]


def same(a: Any, b: Any) -> bool:
    """Equal, type for type; NaN equal to NaN, and -0.0 not equal to 0.0."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    if type(a) is tuple:
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b)


def same_events(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    return len(a) == len(b) and all(map(same, a, b))


def unpackers() -> list[Any]:
    return [packing.unpack, *([_frames.unpack] if NATIVE else [])]


def packers() -> list[Any]:
    return [packing.Packer, *([_packer.Packer] if NATIVE else [])]


def _refuse(*args: Any) -> None:
    raise AssertionError(f"woken or refused: {args!r}")


def packed(cls: Any, events: list[tuple[Any, ...]], frame_entries: int = 4096,
           frame_bytes: int = 1 << 20) -> bytes:
    """The frames a Packer of class `cls` makes of `events`, added one by one."""
    packer = cls(b"E", 0, 0, _refuse, _refuse, PAIR, frame_entries, frame_bytes)
    for event in events:
        packer.add(event)
    return bytes(packer.take())


def split(frames: bytes) -> list[bytes]:
    """The payloads of EVENTS frames, which must be all there is."""
    payloads = []
    while frames:
        assert frames[:1] == b"E"
        (size,) = struct.unpack(">I", frames[1:5])
        assert len(frames) >= 5 + size
        payloads.append(frames[5:5 + size])
        frames = frames[5 + size:]
    return payloads


@given(event_lists(plain_fields | odd_fields))
def test_events_come_back_as_they_went(events: list[tuple[Any, ...]]) -> None:
    payload = packing.pack(events)
    for unpack in unpackers():
        assert same_events(unpack(payload), events)


def test_the_encoding_byte_for_byte() -> None:
    """Pinned, so that a change to either implementation that changes the format shows."""
    when = 1.5
    events = [("leg", 250, when, ("a@x",), "é"), ("leg", 251, when, ("a@x",), True)]
    expected = (
        b"\x05" + b"\x01\x03leg" + b"\x02" + (250).to_bytes(8, "little") + b"\x03"
        + struct.pack("<d", 1.5) + b"\x04\x01\x03a@x" + b"\x01\x02\xc3\xa9"
        + b"\x05" + b"\x00" + b"\x02" + (251).to_bytes(8, "little") + b"\x00" + b"\x00"
        + b"\x05\x01T"
    )
    assert packing.pack(events) == expected
    for cls in packers():
        assert packed(cls, events) == pipe.frame(pipe.EVENTS, expected)


def test_a_repeated_field_is_one_byte_and_the_same_object() -> None:
    first = ("leg", "S1", "S1.1", "192.0.2.7", "client.test", "s@c.test", ("r@x.test",), 7)
    second = tuple(  # equal fields, other objects
        field.encode().decode() if type(field) is str
        else tuple(item.encode().decode() for item in field) if type(field) is tuple
        else field
        for field in first
    )
    assert all(a is not b for a, b in zip(first[:-1], second[:-1], strict=True))
    alone = len(packing.pack([first]))
    assert len(packing.pack([first, second])) == alone + 1 + len(first)
    for unpack in unpackers():
        one, two = unpack(packing.pack([first, second]))
        assert one == first and two == second
        assert all(a is b for a, b in zip(one, two, strict=True))


def test_a_float_repeats_only_as_the_same_object() -> None:
    zero = 0.0
    events = [(zero, zero), (-0.0, zero)]
    payload = packing.pack(events)
    assert payload.count(packing.FLOAT) == 3  # -0.0 is written; `zero` repeats
    for unpack in unpackers():
        assert same_events(unpack(payload), events)


@pytest.mark.parametrize("cls", packers())
def test_what_is_not_an_event_is_refused_and_leaves_nothing(cls: Any) -> None:
    packer = cls(b"E", 0, 0, _refuse, _refuse, PAIR, 4096, 1 << 20)
    for bad in [(), tuple(range(256)), (object(),)]:
        with pytest.raises(ValueError):
            packer.add(bad)  # in a frame of its own: the frame is not left open
        assert (packer.entries, packer.events) == (0, 0)
    packer.add(("a", 1))
    with pytest.raises(ValueError):
        packer.add(("a", object()))  # inside a frame: it ends that frame, without it
    packer.add(("a", 2))
    assert packer.take() == (packed(packing.Packer, [("a", 1)])
                             + packed(packing.Packer, [("a", 2)]))
    assert packing.pack([["a", 1]]) == packing.pack([("a", 1)])  # type: ignore[list-item]


@pytest.mark.parametrize("cls", packers())
def test_put_wakes_at_wake_at_and_refuses_beyond_limit(cls: Any) -> None:
    woken: list[int] = []
    refused: list[tuple[Any, ...]] = []
    packer = cls(b"E", 2, 3, lambda: woken.append(packer.entries), refused.append, PAIR,
                 4096, 1 << 20)
    packer.put("leg", 1)
    assert woken == []
    packer.put(PAIR, 2, 3.5)
    assert woken == [2]  # once, at the wake_at-th entry
    packer.put("message", 3)
    assert woken == [2] and refused == []
    packer.put("message", 4)  # the fourth: beyond the limit, refused as a tuple
    assert refused == [("message", 4)]
    assert (packer.entries, packer.events) == (3, 4)  # a PAIR entry is two events
    frames = packer.take()
    assert frames == packed(packing.Packer, [("leg", 1), (PAIR, 2, 3.5), ("message", 3)])
    assert (packer.entries, packer.events) == (0, 0)
    assert packer.take() == b""
    packer.put("leg", 1)  # a new frame after a take: nothing refers to the one before
    packer.put("leg", 1)
    assert woken == [2, 2]  # and a new wake-up
    assert packer.take() == packed(packing.Packer, [("leg", 1), ("leg", 1)])
    packer.limit = 0  # stopped: everything is refused
    packer.put("leg", 5)
    assert refused[-1] == ("leg", 5) and packer.entries == 0


@pytest.mark.parametrize("cls", packers())
def test_frames_end_at_their_entries_or_bytes(cls: Any) -> None:
    events = [("leg", "x" * 30, n % 2) for n in range(7)]
    by_entries = split(packed(cls, events, frame_entries=3))
    assert by_entries == [packing.pack(events[0:3]), packing.pack(events[3:6]),
                          packing.pack(events[6:])]
    by_bytes = split(packed(cls, events, frame_bytes=60))  # an entry is 44 bytes, then 14
    assert by_bytes == [packing.pack(events[0:2]), packing.pack(events[2:4]),
                        packing.pack(events[4:6]), packing.pack(events[6:])]
    for frames in (by_entries, by_bytes):
        assert [event for payload in frames for event in packing.unpack(payload)] == events


@pytest.mark.parametrize("payload", [
    b"\x00",  # an event of no fields
    b"\x01",  # the end inside an event
    b"\x01\x00",  # SAME in the first event
    b"\x01\x01\x01a\x02\x00\x00",  # SAME for a field the event before lacks
    b"\x01\x07",  # an unknown tag
    b"\x01\x01\x05ab",  # a string past the end
    b"\x01\x01" + b"\xff" * 10,  # a length of more than 9 bytes
    b"\x01\x02\x01\x02",  # an int past the end
    b"\x01\x03" + b"\x00" * 7,  # a float past the end
    b"\x01\x04\x03\x01a",  # a tuple whose strings end early
    b"\x01\x01\x01\xff",  # not UTF-8
    b"\x01\x05\x01\x00",  # not marshal
])
def test_a_broken_payload_is_refused(payload: bytes) -> None:
    for unpack in unpackers():
        with pytest.raises(ValueError):
            unpack(payload)
    with pytest.raises(pipe.FrameError, match="does not unpack"):
        pipe.unpack_events(payload)


def test_delivery_events_pack_as_tuples() -> None:
    event = DeliveryEvent(
        kind="leg", session_id="S1", message_id="S1.1", client_ip="192.0.2.7", helo="c.test",
        mail_from="s@c.test", recipients=("a@x.test",), destination="127.0.0.1:2525",
        route="127.0.0.1:2525", size=120, code=250, reply="2.0.0 Ok", stage="end-of-data",
        duration=0.0123, node="n1", time=1_764_000_000.25,
    )
    (payload,) = split(pipe.events_frames([event, event]))
    for unpack in unpackers():
        assert unpack(payload) == [tuple(event)] * 2


@pytest.mark.skipif(not NATIVE, reason="pure Python: no C to compare (conftest.py fails "
                    "the run under MOXY_EXPECT_NATIVE=1)")
class TestCAgainstPython:
    @given(event_lists(plain_fields), st.integers(1, 4), st.sampled_from([1, 20, 1 << 20]),
           st.integers(0, 6))
    def test_the_same_frames(self, events: list[tuple[Any, ...]], entries: int,
                             size: int, take_at: int) -> None:
        made = []
        for cls in (packing.Packer, _packer.Packer):
            packer = cls(b"E", 0, 0, _refuse, _refuse, PAIR, entries, size)
            frames = b""
            for n, event in enumerate(events):
                if n == take_at:
                    frames += packer.take()
                packer.add(event)
            made.append((frames + packer.take(), packer.entries, packer.events))
        assert made[0] == made[1]
        back = [event for payload in split(made[0][0]) for event in packing.unpack(payload)]
        assert same_events(back, events)

    @given(event_lists(plain_fields | odd_fields))
    def test_the_same_events_back(self, events: list[tuple[Any, ...]]) -> None:
        # Marshalled fields may differ in a flag bit (marshal looks at reference counts).
        (payload,) = split(packed(_packer.Packer, events)) or [b""]
        assert same_events(packing.unpack(payload), events)

    @settings(max_examples=300)
    # Random bytes never ask marshal to read them (it is not made for hostile data).
    @given(st.binary(max_size=40).filter(lambda b: packing.OTHER not in b)
           | event_lists(plain_fields).map(packing.pack).flatmap(
               lambda payload: st.integers(0, len(payload)).map(lambda n: payload[:n])))
    def test_the_same_verdict_on_any_bytes(self, payload: bytes) -> None:
        try:
            expected = packing.unpack(payload)
        except ValueError:
            with pytest.raises(ValueError):
                _frames.unpack(payload)
        else:
            assert same_events(_frames.unpack(payload), expected)

    def test_a_large_batch_and_the_buffer_after_it(self) -> None:
        big = [("x" * 5000, n) for n in range(400)]  # 2 MB: past the buffer kept
        assert packed(_packer.Packer, big) == packed(packing.Packer, big)
        packer = _packer.Packer(b"E", 1000, 1000, _refuse, _refuse, PAIR, 4096, 1 << 20)
        for event in big:
            packer.put(*event)
        assert packer.take() == packed(packing.Packer, big)
        packer.put("a")  # into a new buffer
        assert packer.take() == packed(packing.Packer, [("a",)])
