"""The client side, sans I/O, for Moxy's upstream legs: read a server's replies, write commands.

Upstream servers are trusted less than their reply codes suggest, so the reader has hard limits
and turns anything malformed into `UpstreamProtocolError`; the leg treats that as a broken peer.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from moxy.smtp.lines import CUT_KNOWN
from moxy.smtp.replies import Reply

# What follows the last body chunk: the chunks already end with the CRLF that opens CRLF.CRLF.
END_OF_DATA: Final = b".\r\n"

_REPLY_LINE: Final = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
# The usual case, a whole single-line reply at the start of the buffer ("250 2.0.0 Ok\r\n"):
# the same line rule as _REPLY_LINE with a space after the code, up to and with its LF.
_SINGLE_LINE: Final = re.compile(rb"([2-5][0-9][0-9]) ([^\n]*)\n")
# Replies are values, and a destination says the same few lines again and again ("250 2.1.0
# Ok", "354 End data with ..."): single-line replies already read, by their wire form. Bounded:
# emptied when full (a destination naming its queue id in every reply fills it).
_SEEN: Final[dict[bytes, Reply]] = {}
_SEEN_MAX: Final = 256
_SEEN_LINE: Final = 200  # bytes: longer lines are not kept
# A whole multi-line reply first in the buffer (a greeting or EHLO reply, which a destination
# sends the same on every connection). Which of them are valid is the general reader's call:
# _SEEN_MULTI keeps those it accepted, with their longest line, for parsers whose limits allow
# them.
_MULTI_LINE: Final = re.compile(rb"(?:[2-5][0-9][0-9]-[^\n]*\n)+[2-5][0-9][0-9] [^\n]*\n")
_SEEN_MULTI: Final[dict[bytes, tuple[Reply, int]]] = {}
_SEEN_MULTI_MAX: Final = 64
_SEEN_MULTI_SIZE: Final = 2048  # bytes: longer replies are not kept
_ENHANCED: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# Control characters in a peer's text would travel on to our client inside our own replies.
_CONTROLS: Final = {c: "?" for c in (*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F)}


class UpstreamProtocolError(Exception):
    """The upstream server sent something that is not an SMTP reply, or closed mid-reply."""


class ReplyParser:
    """Turns a server's bytes into `Reply`s, multi-line replies included.

    Lenient where real servers are sloppy (bare LF line ends, "250" without text), strict where
    it matters (code syntax, one code per reply, line and line-count limits).
    """

    def __init__(self, max_line: int = 2048, max_lines: int = 100) -> None:
        if max_lines < 1:
            raise ValueError("a reply has at least one line")
        self.max_line = max_line  # bytes per line, including CRLF
        self._seen_limit = min(_SEEN_LINE, max_line)  # an LF's index in a line of _SEEN
        self.max_lines = max_lines
        self._buf = bytearray()
        self.unread = self._buf  # the same buffer, for callers: empty, no reply can be ready
        self._code: int | None = None  # of the multi-line reply being read
        self._lines: list[str] = []
        self._eof = False
        self._error: UpstreamProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a returned reply (0 between replies)."""
        if self._lines:
            return len(self._buf) + sum(len(line) for line in self._lines)
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" means it closed the connection."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None when more bytes are needed.

        Raises `UpstreamProtocolError` on malformed input or a close before a complete reply;
        once raised, it raises again on every call: the connection is beyond repair.
        """
        if self._lines or self._error is not None:  # a multi-line reply under way, or broken
            return self._next_reply_checked()
        if not self._buf:
            return self._next_reply_checked() if self._eof else None
        # Fastest path: a line this process has read before, first in the buffer (whatever
        # is in _SEEN matched _SINGLE_LINE, up to its first LF, as it would match here).
        buf = self._buf
        reply: Reply | None = CUT_KNOWN(buf, _SEEN, self._seen_limit)
        if reply is not None:
            return reply
        # Fast path: a complete single-line reply first in the buffer, read as the general
        # reader would; new to this process (a line in _SEEN was taken above), kept if short.
        m = _SINGLE_LINE.match(buf)
        if m is None:
            return self._next_multi_line()
        end = m.end()
        if end > self.max_line:
            return self._next_reply_checked()
        wire = m[0]  # before the buffer changes: a match reads it lazily
        del buf[:end]
        text = wire[4:-2] if wire.endswith(b"\r\n") else wire[4:-1]
        reply = Reply(int(wire[:3]), (text.decode("utf-8", "replace").translate(_CONTROLS),))
        if end <= _SEEN_LINE:
            if len(_SEEN) >= _SEEN_MAX:
                _SEEN.clear()
            _SEEN[wire] = reply
        return reply

    def _next_multi_line(self) -> Reply | None:
        m = _MULTI_LINE.match(self._buf)
        if m is None:
            return self._next_reply_checked()
        wire = m[0]
        seen = _SEEN_MULTI.get(wire)
        if seen is not None:
            reply, longest = seen
            if longest <= self.max_line and len(reply.lines) <= self.max_lines:
                del self._buf[: len(wire)]
                return reply
        read = self._next_reply_checked()  # raises if any line of it is not acceptable
        if read is not None and len(wire) <= _SEEN_MULTI_SIZE:
            if len(_SEEN_MULTI) >= _SEEN_MULTI_MAX:
                _SEEN_MULTI.clear()
            _SEEN_MULTI[wire] = (read, max(len(line) + 1 for line in wire.split(b"\n")[:-1]))
        return read

    def feed(self, data: bytes) -> Reply | None:
        """`receive_data(data)` (not empty), then `next_reply()`: one call instead of two."""
        if not self._buf and not self._lines and self._error is None:
            # The commonest read of all: one whole reply line this process has read before
            # (each key of _SEEN holds one LF, at its end), with nothing before it.
            reply = _SEEN.get(data)
            if reply is not None and len(data) <= self.max_line:
                return reply
        self._buf += data
        return self.next_reply()

    def _next_reply_checked(self) -> Reply | None:
        if self._error is not None:
            raise self._error
        try:
            return self._next_reply()
        except UpstreamProtocolError as error:
            self._error = error
            raise

    def _next_reply(self) -> Reply | None:
        while True:
            lf = self._buf.find(b"\n")
            if lf < 0:
                if len(self._buf) >= self.max_line:
                    raise UpstreamProtocolError("reply line too long")
                if self._eof:
                    partial = self._buf or self._lines
                    raise UpstreamProtocolError(
                        "connection closed in the middle of a reply" if partial
                        else "connection closed"
                    )
                return None
            if lf + 1 > self.max_line:
                raise UpstreamProtocolError("reply line too long")
            raw = bytes(self._buf[:lf])
            del self._buf[: lf + 1]
            # One line of the reply (in this loop rather than a method of its own: an EHLO
            # reply has a dozen lines).
            line = raw[:-1] if raw.endswith(b"\r") else raw
            m = _REPLY_LINE.fullmatch(line)
            if m is None:
                raise UpstreamProtocolError(f"malformed reply line: {line[:80]!r}")
            code = int(m[1])
            if self._code is not None and code != self._code:
                raise UpstreamProtocolError(f"reply code changed from {self._code} to {code}")
            if len(self._lines) >= self.max_lines:
                raise UpstreamProtocolError(f"reply longer than {self.max_lines} lines")
            self._code = code
            self._lines.append((m[3] or b"").decode("utf-8", "replace").translate(_CONTROLS))
            if m[2] != b"-":
                reply = Reply(code, tuple(self._lines))
                self._code, self._lines = None, []
                return reply


def format_command(verb: str, arg: str = "") -> bytes:
    """`format_command("MAIL", "FROM:<a@b> SIZE=10")` → b"MAIL FROM:<a@b> SIZE=10\\r\\n".

    Raises ValueError for non-ASCII or line-breaking characters: those would let one command
    smuggle another, and nothing Moxy forwards may contain them.
    """
    line = f"{verb} {arg}" if arg else verb
    if any(c in line for c in "\r\n\0"):
        raise ValueError(f"line break or NUL in SMTP command: {line!r}")
    return line.encode("ascii") + b"\r\n"


def parse_ehlo(reply: Reply) -> dict[str, str]:
    """Extensions of a 250 EHLO reply: {"SIZE": "10240000", "PIPELINING": "", ...}.

    Keywords are upper-cased; their parameters keep the server's text. The first line is the
    server's name, not an extension. A reply other than 250 has no extensions.
    """
    return dict(_parse_ehlo(reply))  # a copy: the cached one must not change


@functools.lru_cache(maxsize=64)  # a destination sends the same EHLO reply every time
def _parse_ehlo(reply: Reply) -> dict[str, str]:
    extensions: dict[str, str] = {}
    if reply.code != 250:
        return extensions
    for line in reply.lines[1:]:
        if m := _ENHANCED.match(line):  # not allowed in EHLO replies, but some servers do it
            line = line[m.end() :]
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = " ".join(params.split())
    return extensions
