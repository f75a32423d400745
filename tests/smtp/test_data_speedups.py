"""The body check's C scan (moxy.smtp._speedups, in the native build) against its Python
reference, `data.has_bare_newline`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy import native
from moxy.smtp import data

if "moxy.smtp._speedups" not in native.compiled():
    # A pure-Python checkout (no .so files at all): `make test` always builds it, and
    # conftest.py fails the run under MOXY_EXPECT_NATIVE=1 when it is missing.
    pytest.skip("pure Python: no C scan to compare", allow_module_level=True)

from moxy.smtp._speedups import has_bare_newline as scan

# Mostly the bytes that matter, so that CRLFs, doubled and split ones turn up often.
_BODIES = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"\r\n.\r\n", b"\x00", b"\xff"]),
    max_size=40,
).map(b"".join) | st.binary(max_size=300)


def test_the_native_build_checks_bodies_with_the_c_scan() -> None:
    assert data._has_bare_newline is scan


@given(_BODIES)
def test_the_c_scan_answers_as_the_python_reference(region: bytes) -> None:
    assert scan(region) is data.has_bare_newline(region)


@pytest.mark.parametrize(
    ("region", "bare"),
    [
        (b"", False),
        (b"plain text", False),
        (b"line\r\nline\r\n", False),
        (b"\r\n", False),
        (b"\r", True),  # a CR at the end of the region is bare (the reader holds back none)
        (b"\n", True),  # an LF at its start too
        (b"a\rb\r\n", True),
        (b"a\nb\r\n", True),
        (b"\r\r\n", True),
        (b"\r\n\n", True),
        (b"\n\r", True),
        (b"x" * 100_000 + b"\r\n", False),
        (b"line\r\n" * 5000 + b"\n", True),
        (b"\n" + b"line\r\n" * 5000, True),
    ],
)
def test_bare_endings_anywhere(region: bytes, bare: bool) -> None:
    assert scan(region) is bare
    assert data.has_bare_newline(region) is bare


def test_the_c_scan_takes_only_bytes() -> None:
    with pytest.raises(TypeError, match="takes bytes"):
        scan(bytearray(b"\r\n"))  # type: ignore[arg-type]
