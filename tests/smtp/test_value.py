"""The per-message value objects (moxy.smtp.value): equal by fields, hashable when their
fields are, a repr naming them, and read-only once compiled."""

from __future__ import annotations

import pytest

from moxy import native
from moxy.connection import Envelope
from moxy.smtp.events import BodyChunk, MailFrom, RcptTo


def test_values_are_equal_by_type_and_fields() -> None:
    assert MailFrom("a@b.example", size=10) == MailFrom("a@b.example", {}, 10)
    assert MailFrom("a@b.example") != MailFrom("a@b.example", smtputf8=True)
    assert RcptTo("a@b.example") != MailFrom("a@b.example")  # same fields, other type
    assert BodyChunk(b"x") != b"x"
    assert Envelope("a@b.example", 10) == Envelope("a@b.example", size=10)


def test_values_hash_by_fields_and_say_them_in_their_repr() -> None:
    assert len({BodyChunk(b"x"), BodyChunk(b"x"), BodyChunk(b"y")}) == 2
    assert hash(Envelope("a@b.example")) == hash(Envelope("a@b.example"))
    assert repr(RcptTo("a@b.example")) == "RcptTo(address='a@b.example', params={})"


def test_values_are_read_only_where_compiled() -> None:
    chunk = BodyChunk(b"x")
    if "moxy.smtp.events" in native.compiled():
        with pytest.raises(AttributeError):
            chunk.data = b"y"  # type: ignore[misc]
    else:  # pure Python: mypy refuses the assignment (Final), nothing does at run time
        chunk.data = b"y"  # type: ignore[misc]
        assert chunk.data == b"y"
