"""The DATA body reader: the terminator, dot-stuffing, bare newlines, limits, split reads."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from moxy.smtp.data import TERMINATOR, BareNewlines, BodyReader, normalise, normalise_slowly
from moxy.smtp.events import BodyChunk, BodyEnd, BodyRefused

from .splits import split_at


def read(
    *pieces: bytes, mode: BareNewlines = "refuse", max_size: int = 0, max_line: int = 0
) -> tuple[bytes, list[object], BodyReader]:
    """Feed `pieces` one by one: (the body handed on, the other events, the reader)."""
    reader = BodyReader(max_message_size=max_size, max_text_line=max_line, bare_newlines=mode)
    body, others = b"", list[object]()
    for piece in pieces:
        for event in reader.feed(piece):
            if isinstance(event, BodyChunk):
                assert not others, "no chunk after a refusal or the end"
                assert event.data, "no empty chunks"
                body += event.data
            else:
                others.append(event)
    return body, others, reader


def refusal(others: list[object]) -> tuple[int, str | None]:
    assert len(others) == 2 and isinstance(others[1], BodyEnd)
    assert isinstance(others[0], BodyRefused)
    return others[0].reply.code, others[0].reply.enhanced


# -- the end of data -------------------------------------------------------------------------


def test_immediate_dot_line_is_an_empty_body() -> None:
    body, others, _ = read(b".\r\n")
    assert (body, others) == (b"", [BodyEnd()])


def test_body_is_handed_on_up_to_and_including_the_crlf_before_the_dot() -> None:
    body, others, _ = read(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
    assert (body, others) == (b"Subject: hi\r\n\r\nHello\r\n", [BodyEnd()])


def test_dot_stuffing_is_kept_in_wire_form() -> None:
    body, others, _ = read(b"..leading dot\r\n..\r\n...\r\n.\r\n")
    assert (body, others) == (b"..leading dot\r\n..\r\n...\r\n", [BodyEnd()])


@pytest.mark.parametrize(
    "not_an_end", [b"\r\n..\r\n", b"\r\n.x\r\n", b"\r\n. \r\n", b"x.\r\n", b"\r\n.\r\r\n"]
)
def test_only_crlf_dot_crlf_ends_the_body(not_an_end: bytes) -> None:
    mode: BareNewlines = "normalise"  # so that "\r\n.\r\r\n" is not refused either
    _, others, reader = read(b"a" + not_an_end, mode=mode)
    assert others == [] and not reader.done


def test_bytes_after_the_terminator_stay_for_the_commands() -> None:
    _, others, reader = read(b"a\r\n.\r\nQUIT\r\n")
    assert others == [BodyEnd()] and reader.leftover == b"QUIT\r\n"


def test_only_the_first_terminator_counts() -> None:
    body, _, reader = read(b"a\r\n.\r\nb\r\n.\r\n")
    assert body == b"a\r\n" and reader.leftover == b"b\r\n.\r\n"


MESSAGE = b"To: b@example.org\r\n\r\n..dot\r\nend\r\n.\r\nNOOP\r\n"


@pytest.mark.parametrize("point", range(len(MESSAGE) + 1))
def test_a_split_anywhere_changes_nothing(point: int) -> None:
    body, others, reader = read(*split_at(MESSAGE, point))
    assert (body, others) == (b"To: b@example.org\r\n\r\n..dot\r\nend\r\n", [BodyEnd()])
    assert reader.leftover == b"NOOP\r\n"


@pytest.mark.parametrize("first", range(len(TERMINATOR) + 1))
@pytest.mark.parametrize("second", range(len(TERMINATOR) + 1))
@pytest.mark.parametrize("body", [b"", b"x\r\n", b"..\r\n.x\r\n"])
def test_terminator_split_at_any_two_points_is_found(body: bytes, first: int, second: int) -> None:
    data = body + b".\r\n"  # the body's last CRLF opens the terminator
    start = max(len(body) - 2, 0)
    got, others, _ = read(*split_at(data, start + first, start + second))
    assert (got, others) == (body, [BodyEnd()])


def test_byte_at_a_time_empty_body() -> None:
    body, others, _ = read(*(bytes([b]) for b in b".\r\n"))
    assert (body, others) == (b"", [BodyEnd()])


@pytest.mark.parametrize("tail", [b"", b"\r", b"\r\n", b"\r\n.", b"\r\n.\r"])
def test_at_most_a_split_terminator_is_held_back(tail: bytes) -> None:
    body, others, reader = read(b"line" + tail)
    assert body == b"line" and others == [] and not reader.done


# -- bare CR and bare LF ---------------------------------------------------------------------

BARE = [
    b"a\nb\r\n",
    b"a\rb\r\n",
    b"a\n.\nb\r\n",  # the classic smuggling terminator
    b"a\r\n.\nb\r\n",
    b"a\n.\r\nb\r\n",
    b"a\r.\rb\r\n",
    b"a\r\n.\rb\r\n",
    b"\n\r\n",
    b"\r\r\n",
    b"a\n\r\n",
]


@pytest.mark.parametrize("data", BARE)
def test_refuse_mode_refuses_bare_cr_or_lf(data: bytes) -> None:
    body, others, _ = read(data + b".\r\n")
    assert body == b""
    assert refusal(others) == (550, "5.5.2")


@pytest.mark.parametrize("data", BARE)
@pytest.mark.parametrize("point", range(1, 6))
def test_refuse_mode_refuses_bare_newlines_split_anywhere(data: bytes, point: int) -> None:
    _, others, _ = read(*split_at(data + b".\r\n", point))
    assert refusal(others) == (550, "5.5.2")


def test_refused_body_is_discarded_up_to_the_real_terminator() -> None:
    smuggled = b"a\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.org>\r\n"
    body, others, reader = read(smuggled + b".\r\nQUIT\r\n")
    assert body == b"" and refusal(others)[0] == 550 and reader.leftover == b"QUIT\r\n"


@pytest.mark.parametrize(
    ("data", "normalised"),
    [
        (b"a\nb\r\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\r\n.\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\r.\rb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\r\n.\rb\r\n", b"a\r\n..\r\nb\r\n"),
        (b".\nb\r\n", b"..\r\nb\r\n"),
        (b"a\n..\r\n", b"a\r\n...\r\n"),
        (b"a\r\n..\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"\n\r\n", b"\r\n\r\n"),
        (b"\r\r\n", b"\r\n\r\n"),
        (b"a\n\r\n", b"a\r\n\r\n"),
        (b"a\n\n\r\n", b"a\r\n\r\n\r\n"),
    ],
)
def test_normalise_mode_makes_crlf_and_stuffs_dots_it_exposes(
    data: bytes, normalised: bytes
) -> None:
    body, others, _ = read(data + b".\r\n", mode="normalise")
    assert (body, others) == (normalised, [BodyEnd()])


def test_normalised_smuggling_attempt_stays_one_message() -> None:
    smuggled = b"a\r\n\n.\nMAIL FROM:<evil@example.org>\n.\r\n\r\n.\r\nQUIT\r\n"
    body, others, reader = read(smuggled, mode="normalise")
    assert others == [BodyEnd()] and reader.leftover == b"QUIT\r\n"
    assert TERMINATOR not in b"\r\n" + body
    assert b"\r\n..\r\nMAIL FROM:" in body


def test_body_using_every_marker_byte_is_normalised_the_slow_way() -> None:
    controls = bytes(b for b in range(32) if b not in b"\r\n")
    body, others, _ = read(controls + b"\n.\n" + controls + b"\r\n.\r\n", mode="normalise")
    assert (body, others) == (controls + b"\r\n..\r\n" + controls + b"\r\n", [BodyEnd()])


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\x00", b"\x01", b"\r\n"]),
                max_size=30))
def test_fast_normalisation_follows_the_regex_rule(pieces: list[bytes]) -> None:
    region = b"\r\n" + b"".join(pieces)
    assume(TERMINATOR not in region)
    assert normalise(region) == normalise_slowly(region)


# -- limits ----------------------------------------------------------------------------------


def test_body_of_exactly_the_maximum_size_is_accepted() -> None:
    body, others, _ = read(b"x" * 8 + b"\r\n.\r\n", max_size=10)
    assert (len(body), others) == (10, [BodyEnd()])


def test_body_over_the_maximum_size_is_refused() -> None:
    body, others, _ = read(b"x" * 9 + b"\r\n.\r\n", max_size=10)
    assert body == b"" and refusal(others) == (552, "5.3.4")


def test_size_is_counted_across_chunks() -> None:
    body, others, reader = read(*[b"x" * 998 + b"\r\n"] * 10 + [b".\r\n"], max_size=5000)
    assert refusal(others) == (552, "5.3.4") and reader.size > 5000 and len(body) <= 5000


@given(
    lines=st.lists(st.sampled_from([b"", b".", b"..", b".x", b"x.", b"x", b"x\t."]),
                   max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_size_is_that_of_the_message_without_the_dots_of_dot_stuffing(
    lines: list[bytes], cuts: list[int]
) -> None:
    """RFC 1870 counts the message, not its transmission: a line beginning with a dot is sent
    with one more (a 1,800-octet message declared SIZE=1800 was refused under a 2,000 limit
    for its dot lines), however the wire form is cut into reads."""
    message = b"".join(line + b"\r\n" for line in lines)
    wire = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    body, others, reader = read(*split_at(wire + b".\r\n", *cuts))
    assert others == [BodyEnd()] and body == wire
    assert reader.size == len(message)


def test_a_message_of_the_maximum_size_with_dot_lines_is_accepted() -> None:
    message = b".x\r\n" * 4  # 16 octets; 20 on the wire
    wire = message.replace(b".x", b"..x")
    _, others, _ = read(wire + b".\r\n", max_size=16)
    assert others == [BodyEnd()]
    _, others, _ = read(wire + b".\r\n", max_size=15)
    assert refusal(others) == (552, "5.3.4")


@pytest.mark.parametrize(("length", "refused"), [(999, False), (1000, False), (1001, True)])
def test_text_line_limit_counts_bytes_without_crlf(length: int, refused: bool) -> None:
    _, others, _ = read(b"a\r\n" + b"x" * length + b"\r\nb\r\n.\r\n", max_line=1000)
    if refused:
        assert refusal(others) == (550, "5.5.6")
    else:
        assert others == [BodyEnd()]


@pytest.mark.parametrize("length", [1000, 1001])
def test_line_length_is_carried_across_byte_sized_chunks(length: int) -> None:
    data = b"a\r\n" + b"x" * length + b"\r\n.\r\n"
    _, others, _ = read(*(data[i : i + 1] for i in range(len(data))), max_line=1000)
    assert (others == [BodyEnd()]) is (length == 1000)


def test_last_line_before_the_terminator_is_checked() -> None:
    _, others, _ = read(b"x" * 11 + b"\r\n.\r\n", max_line=10)
    assert refusal(others) == (550, "5.5.6")


def test_zero_line_limit_means_none() -> None:
    body, others, _ = read(b"x" * 100_000 + b"\r\n.\r\n", max_line=0)
    assert len(body) == 100_002 and others == [BodyEnd()]


def test_refused_body_is_read_in_bounded_memory() -> None:
    reader = BodyReader(max_message_size=10)
    assert any(isinstance(e, BodyRefused) for e in reader.feed(b"x" * 100))
    for _ in range(100):
        assert reader.feed(b"y" * 65536 + b"\r\n") == []
        assert len(reader._held) <= 4
    assert reader.feed(b".\r\n") == [BodyEnd()]


def test_held_back_bytes_stay_bounded_while_streaming() -> None:
    reader = BodyReader()
    for _ in range(100):
        reader.feed(b"z" * 77 + b"\r\n")
        assert len(reader._held) <= 4


def test_unknown_bare_newline_mode_is_a_local_error() -> None:
    with pytest.raises(ValueError):
        BodyReader(bare_newlines="fix")  # type: ignore[arg-type]


# -- properties ------------------------------------------------------------------------------

TEXT_LINE = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def stuffed(lines: list[bytes]) -> bytes:
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@given(st.lists(TEXT_LINE, max_size=20), st.lists(st.integers(0, 2000), max_size=6))
def test_valid_body_split_anywhere_comes_out_unchanged(
    lines: list[bytes], points: list[int]
) -> None:
    body = stuffed(lines)
    data = body + b".\r\nQUIT\r\n"
    got, others, reader = read(*split_at(data, *points))
    assert (got, others, reader.leftover) == (body, [BodyEnd()], b"QUIT\r\n")


NOISE = st.lists(st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n."]), max_size=30)


@given(NOISE, st.lists(st.integers(0, 200), max_size=4))
def test_normalised_body_never_holds_an_early_end_or_a_bare_newline(
    pieces: list[bytes], points: list[int]
) -> None:
    data = b"".join(pieces) + TERMINATOR
    whole, whole_others, _ = read(data, mode="normalise")
    got, others, _ = read(*split_at(data, *points), mode="normalise")
    assert (got, others) == (whole, whole_others) == (got, [BodyEnd()])
    assert TERMINATOR not in b"\r\n" + got
    assert got.count(b"\r") == got.count(b"\n") == got.count(b"\r\n")
    assert got == b"" or got.endswith(b"\r\n")


@given(NOISE, st.lists(st.integers(0, 200), max_size=4))
def test_refuse_mode_hands_on_only_clean_prefixes(pieces: list[bytes], points: list[int]) -> None:
    data = b"".join(pieces) + TERMINATOR
    got, others, _ = read(*split_at(data, *points))
    assert got.count(b"\r") == got.count(b"\n") == got.count(b"\r\n")
    assert TERMINATOR not in b"\r\n" + got
    assert others[-1] == BodyEnd()
    if not any(isinstance(e, BodyRefused) for e in others):
        assert (b"\r\n" + data).startswith(b"\r\n" + got + b".\r\n")


@given(st.lists(st.integers(0, 30), max_size=10), st.integers(1, 12), st.integers(1, 50))
def test_line_limit_matches_the_longest_line(lengths: list[int], limit: int, chunk: int) -> None:
    data = b"".join(b"x" * n + b"\r\n" for n in lengths) + b".\r\n"
    _, others, _ = read(*(data[i : i + chunk] for i in range(0, len(data), chunk)), max_line=limit)
    too_long = any(n > limit for n in lengths)
    assert any(isinstance(e, BodyRefused) for e in others) is too_long
