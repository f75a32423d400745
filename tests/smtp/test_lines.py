"""Cutting a buffer's first line (moxy.smtp.lines): the Python reference on its own, and the
native build's C functions (moxy.smtp._speedups) against it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy import native
from moxy.smtp import lines
from moxy.smtp.lines import cut_known, cut_line

# Mostly the bytes that matter, so that CRLFs, bare CRs and LFs turn up often.
_BUFFERS = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"MAIL", b" ", b"a", b"250 ok\r\n", b"\xff"]),
    max_size=30,
).map(b"".join) | st.binary(max_size=200)
_LIMITS = st.integers(min_value=-2, max_value=80)


@pytest.mark.parametrize(
    ("buf", "limit", "line", "rest"),
    [
        (b"", 10, None, b""),
        (b"NOOP", 10, None, b"NOOP"),  # no line end yet
        (b"NOOP\r\n", 10, b"NOOP", b""),
        (b"NOOP\n", 10, b"NOOP", b""),  # a bare LF ends a line too
        (b"NOOP\r\r\n", 10, b"NOOP\r", b""),  # one CR goes with the LF, no more
        (b"\r\n", 10, b"", b""),
        (b"\n", 10, b"", b""),
        (b"RSET\r\nQUIT\r\n", 10, b"RSET", b"QUIT\r\n"),  # one line at a time
        (b"NOOP\r\n" + b"x" * 100, 6, b"NOOP", b"x" * 100),
    ],
)
def test_cut_line(buf: bytes, limit: int, line: bytes | None, rest: bytes) -> None:
    buffer = bytearray(buf)
    assert cut_line(buffer, limit) == line
    assert buffer == rest


@pytest.mark.parametrize(("limit", "cut"), [(5, False), (6, True), (0, False), (-1, False)])
def test_an_lf_at_the_limit_or_beyond_is_left_to_the_caller(limit: int, cut: bool) -> None:
    buffer = bytearray(b"NOOP\r\nRSET\r\n")  # first LF at index 5
    assert (cut_line(buffer, limit) == b"NOOP") is cut
    assert buffer == (b"RSET\r\n" if cut else b"NOOP\r\nRSET\r\n")
    buffer = bytearray(b"NOOP\r\nRSET\r\n")
    assert (cut_known(buffer, {b"NOOP\r\n": 1}, limit) == 1) is cut
    assert buffer == (b"RSET\r\n" if cut else b"NOOP\r\nRSET\r\n")


def test_cut_known_takes_a_known_line_with_its_line_end() -> None:
    known = {b"250 2.0.0 Ok\r\n": "ok", b"354 go\n": "go"}
    buffer = bytearray(b"250 2.0.0 Ok\r\n354 go\n221 bye\r\n")
    assert cut_known(buffer, known, 200) == "ok"
    assert cut_known(buffer, known, 200) == "go"
    assert buffer == b"221 bye\r\n"
    assert cut_known(buffer, known, 200) is None  # unknown: left where it is
    assert buffer == b"221 bye\r\n"
    assert cut_known(bytearray(b"250 2.0.0 Ok"), known, 200) is None  # no line end yet


if "moxy.smtp._speedups" in native.compiled():
    from moxy.smtp._speedups import cut_known as c_cut_known
    from moxy.smtp._speedups import cut_line as c_cut_line
else:
    c_cut_line = c_cut_known = None  # a pure-Python checkout: see the skips below

_native = pytest.mark.skipif(
    c_cut_line is None,
    # `make test` always builds it, and conftest.py fails the run under MOXY_EXPECT_NATIVE=1
    # when it is missing.
    reason="pure Python: no C line cutters to compare",
)


@_native
def test_the_native_build_cuts_lines_in_c() -> None:
    assert lines.CUT_LINE is c_cut_line
    assert lines.CUT_KNOWN is c_cut_known


@_native
@given(_BUFFERS, _LIMITS)
def test_the_c_cut_line_answers_as_the_reference(buf: bytes, limit: int) -> None:
    ours, theirs = bytearray(buf), bytearray(buf)
    assert c_cut_line(ours, limit) == cut_line(theirs, limit)
    assert ours == theirs


@_native
@given(_BUFFERS, _LIMITS, st.lists(_BUFFERS, max_size=4))
def test_the_c_cut_known_answers_as_the_reference(
    buf: bytes, limit: int, extra: list[bytes]
) -> None:
    # Known lines: some of the buffer's own first lines (with their line ends), some others.
    known: dict[bytes, Any] = {key: ("value", key) for key in extra}
    lf = buf.find(b"\n")
    if lf >= 0 and len(extra) % 2:
        known[buf[: lf + 1]] = ("first", lf)
    ours, theirs = bytearray(buf), bytearray(buf)
    assert c_cut_known(ours, known, limit) == cut_known(theirs, known, limit)
    assert ours == theirs


@_native
def test_the_c_cutters_refuse_what_is_not_theirs() -> None:
    with pytest.raises(TypeError):
        c_cut_line(b"NOOP\r\n", 10)  # bytes cannot lose their first line
    with pytest.raises(TypeError):
        c_cut_line(bytearray(b"NOOP\r\n"))
    with pytest.raises(TypeError):
        c_cut_known(bytearray(b"NOOP\r\n"), [], 10)
    with pytest.raises(TypeError):
        c_cut_known(bytearray(b"NOOP\r\n"), {}, "10")
    buffer = bytearray(b"NOOP\r\n")
    assert c_cut_known(buffer, {b"NOOP\r\n": None}, 10) is None
    assert buffer == b"NOOP\r\n"  # a None value is no answer: the line stays
