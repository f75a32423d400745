"""Cutting the first line out of a receive buffer: the command reader's (moxy.smtp.server) and
the reply reader's (moxy.smtp.client) first step, once per command and per reply.

`cut_line` and `cut_known` below are the reference and the pure-Python fallback. The native
build runs `moxy.smtp._speedups`'s instead (`CUT_LINE` and `CUT_KNOWN` name the ones in use):
the same answers, without the `find` call, the slice, the `bytes` copy of the slice and the
deletion's slice object, about 2,000 instructions a line in Python.
tests/smtp/test_lines.py holds both side by side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def cut_line(buf: bytearray, limit: int) -> bytes | None:
    """The first line of `buf` without its LF or CRLF, removed from `buf` with its line end;
    None (and `buf` untouched) when `buf` holds no LF, or its first LF is at index `limit` or
    beyond (the caller's over-long line)."""
    lf = buf.find(b"\n")
    if lf < 0 or lf >= limit:
        return None
    line = bytes(buf[: lf - 1 if lf and buf[lf - 1] == 13 else lf])
    del buf[: lf + 1]
    return line


def cut_known(buf: bytearray, known: dict[bytes, Any], limit: int) -> Any:
    """`known[line]` for the first line of `buf` with its line end (up to and with the first
    LF), that line then removed from `buf`; None (and `buf` untouched) when `buf` holds no LF,
    its first LF is at index `limit` or beyond, or the line is not in `known`. The values of
    `known` must not be None."""
    lf = buf.find(b"\n")
    if lf < 0 or lf >= limit:
        return None
    value = known.get(bytes(buf[: lf + 1]))
    if value is not None:
        del buf[: lf + 1]
    return value


CUT_LINE: Callable[[bytearray, int], bytes | None]
CUT_KNOWN: Callable[[bytearray, dict[bytes, Any], int], Any]
try:  # the native build's (C)
    from moxy.smtp import _speedups
except ImportError:  # pure Python
    CUT_LINE, CUT_KNOWN = cut_line, cut_known
else:
    CUT_LINE, CUT_KNOWN = _speedups.cut_line, _speedups.cut_known
