"""Reply values: the class and the wire form are computed once, and nothing else changes."""

from __future__ import annotations

import pytest

from moxy import native
from moxy.smtp.replies import TEXT_MAX, Reply


@pytest.mark.parametrize(("code", "klass"), [(220, 2), (354, 3), (451, 4), (550, 5)])
def test_klass_is_the_first_digit(code: int, klass: int) -> None:
    assert Reply(code, ("x",)).klass == klass


@pytest.mark.parametrize(
    ("reply", "wire"),
    [
        (Reply(250, ("2.0.0 Ok",)), b"250 2.0.0 Ok\r\n"),
        (Reply(250), b"250 \r\n"),
        (Reply(250, ("mx greets you", "PIPELINING", "SIZE 10")),
         b"250-mx greets you\r\n250-PIPELINING\r\n250 SIZE 10\r\n"),
        (Reply(550, ("5.7.1 <\u00e9@x>: denied",)), "550 5.7.1 <\u00e9@x>: denied\r\n".encode()),
    ],
)
def test_wire_form_is_the_same_every_time(reply: Reply, wire: bytes) -> None:
    assert reply.to_bytes() == wire
    assert reply.to_bytes() is reply.to_bytes()  # encoded once


def test_the_kept_wire_form_is_no_part_of_equality_or_repr() -> None:
    used, fresh = Reply(250, ("2.0.0 Ok",)), Reply(250, ("2.0.0 Ok",))
    used.to_bytes()
    assert used == fresh and hash(used) == hash(fresh)
    assert repr(used) == repr(fresh) == "Reply(code=250, lines=('2.0.0 Ok',))"
    if "moxy.smtp.replies" in native.compiled():  # read-only (Final); pure Python: mypy says so
        with pytest.raises(AttributeError):
            used.code = 550  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        ((), ("2.0.0",)),
        (("",), ("2.0.0",)),
        (("Ok",), ("2.0.0 Ok",)),
        (("one", "", "three"), ("2.0.0 one", "2.0.0", "2.0.0 three")),
    ],
)
def test_make_opens_every_line_with_the_enhanced_code(
    args: tuple[str, ...], lines: tuple[str, ...]
) -> None:
    assert Reply.make(250, "2.0.0", *args) == Reply(250, lines)


@pytest.mark.parametrize(
    ("reply", "lines"),
    [
        (Reply(250, ("Ok queued",)), ("2.0.0 Ok queued",)),
        (Reply(250, ("",)), ("2.0.0",)),
        (Reply(250, ("Ok", "", "more")), ("2.0.0 Ok", "2.0.0", "2.0.0 more")),
        (Reply(250, ("2.6.0 queued",)), ("2.6.0 queued",)),  # its own code stays
        # A later line's own code: kept there, and given to the lines without one.
        (Reply(250, ("first", "second", "2.1.5 ok")), ("2.1.5 first", "2.1.5 second", "2.1.5 ok")),
        (Reply(550, ("no", "5.7.1 denied", "4.0.0 odd")),
         ("5.7.1 no", "5.7.1 denied", "4.0.0 odd")),
    ],
)
def test_with_enhanced_adds_the_default_only_where_none_is(
    reply: Reply, lines: tuple[str, ...]
) -> None:
    assert reply.with_enhanced("2.0.0").lines == lines


def test_fitted_leaves_lines_within_512_octets_alone() -> None:
    reply = Reply(250, ("2.0.0 Ok",))
    assert reply.fitted() is reply
    near = Reply(550, ("5.7.1 " + "x" * (TEXT_MAX - 6), "5.7.1 short"))
    assert near.fitted() is near


@pytest.mark.parametrize(
    "text",
    [
        " ".join(f"w{n:04d}" for n in range(300)),  # words: cut at spaces
        "y" * 1300,  # one word: cut inside it
        "é" * 400,  # 800 octets of UTF-8: cut by octets, never inside a character
    ],
)
def test_fitted_cuts_a_long_line_into_lines_of_512_octets_with_the_code(text: str) -> None:
    fitted = Reply(550, (f"5.1.1 {text}",)).fitted()
    assert len(fitted.lines) > 1
    for wire_line in fitted.to_bytes().split(b"\r\n")[:-1]:
        assert len(wire_line) + 2 <= 512
        assert wire_line[4:10] == b"5.1.1 "
    pieces = [line[len("5.1.1 "):] for line in fitted.lines]
    assert ("" if " " not in text else " ").join(pieces) == text
