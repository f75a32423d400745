"""The DATA body reader: finds the end-of-data sequence, enforces the body rules, hands on chunks.

This is the hot path. It works on whole chunks with C-speed bytes methods and holds back at most
the four trailing bytes that could start a split terminator, so memory never grows with the body.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from moxy.smtp.events import BODY_END, BodyChunk, BodyEnd, BodyRefused
from moxy.smtp.replies import Reply

BareNewlines = Literal["refuse", "normalise"]
BodyEvent = BodyChunk | BodyRefused | BodyEnd

# RFC 5321 §4.1.1.4: only CRLF "." CRLF ends the data. Every other reading ("\n.\n", "\r\n.\n",
# "\n.\r\n", ...) is the SMTP smuggling vector: some upstream might take it for the end.
TERMINATOR: Final = b"\r\n.\r\n"
# The body starts as if preceded by CRLF, so an immediate ".\r\n" is the end of an empty body.
_VIRTUAL_CRLF: Final = b"\r\n"

BARE_NEWLINE: Final = Reply.make(550, "5.5.2", "Message refused: bare CR or LF line ending")
TOO_BIG: Final = Reply.make(552, "5.3.4", "Message size exceeds fixed limit")
LINE_TOO_LONG: Final = Reply.make(550, "5.5.6", "Message refused: text line too long")

# Normalisation. The rule: every bare CR / bare LF becomes CRLF; a dot opening a line that this
# creates is stuffed; and a dot line that only a bare ending terminates ("\r\n.\n") is stuffed
# too, or it would become CRLF.CRLF. The regexes state the rule and serve when no marker byte is
# free; the replace() chain below does the same several times faster.
_DOT_BEFORE_BARE: Final = re.compile(rb"(?<=\r\n)\.(?=\n|\r(?!\n))")
_BARE_ENDING: Final = re.compile(rb"(?:\r(?!\n)|(?<!\r)\n)(\.?)")  # \1\1: ".." or ""
_MARKERS: Final = [bytes([b]) for b in range(32) if b not in b"\r\n"]


def normalise(region: bytes) -> bytes:
    """Bare CR and bare LF → CRLF, dot-stuffing every dot line this would otherwise expose.

    A CR at the end of `region` counts as bare and a LF at its start as bare; the CRLF before
    a dot must be in `region`. The reader guarantees all three by what it holds back.
    """
    for crlf in _MARKERS:
        if crlf not in region:  # a byte that can stand for the real CRLFs meanwhile
            out = region.replace(b"\r\n", crlf).replace(b"\r", b"\n")  # only bare ones left
            out = out.replace(b"\n.", b"\n..").replace(crlf + b".\n", crlf + b"..\n")
            return out.replace(b"\n", b"\r\n").replace(crlf, b"\r\n")
    return normalise_slowly(region)


def normalise_slowly(region: bytes) -> bytes:
    """What `normalise` does, by regex: for regions that use every marker byte."""
    return _BARE_ENDING.sub(rb"\r\n\1\1", _DOT_BEFORE_BARE.sub(b"..", region))


def has_bare_newline(region: bytes) -> bool:
    """Whether `region` holds a CR or an LF outside every CRLF (a bare one).

    The native build runs `moxy.smtp._speedups.has_bare_newline` instead: the same answer
    without the copy `replace` makes. Not `b"\r" in rest`: bytes.__contains__ first tries its
    argument as an int, and formats a TypeError's message to find that it is not one (about
    1,800 instructions each); find() looks at the type first, and runs on memchr."""
    rest = region.replace(b"\r\n", b"")
    return rest.find(b"\r") >= 0 or rest.find(b"\n") >= 0


try:  # the native build's scan (C)
    from moxy.smtp._speedups import has_bare_newline as _has_bare_newline
except ImportError:  # pure Python
    _has_bare_newline = has_bare_newline


def _terminator_prefix_len(buf: bytes) -> int:
    """Length of the longest tail of `buf` that could be the start of a split CRLF.CRLF."""
    for k in (4, 3, 2, 1):
        if buf.endswith(TERMINATOR[:k]):
            return k
    return 0


class BodyReader:
    """Reads one message body, from the byte after the 354 reply to the end-of-data sequence.

    `feed()` returns events: `BodyChunk`s in wire form (dot-stuffed, CRLF only), at most one
    `BodyRefused` after which no chunk follows, and finally `BodyEnd`. Once `done`, `leftover`
    holds the bytes after the terminator: the next commands. Limits of 0 mean no limit.
    """

    def __init__(
        self,
        *,
        max_message_size: int = 0,
        max_text_line: int = 0,
        bare_newlines: BareNewlines = "refuse",
    ) -> None:
        if bare_newlines not in ("refuse", "normalise"):
            raise ValueError(f"bare_newlines must be 'refuse' or 'normalise': {bare_newlines!r}")
        self._max_size = max_message_size
        self._max_line = max_text_line
        self._normalise = bare_newlines == "normalise"
        self._held = _VIRTUAL_CRLF  # bytes not yet examined, carried to the next feed
        self._skip = len(_VIRTUAL_CRLF)  # leading bytes of _held that are not body
        self._run = 0  # non-LF bytes since the last LF: the line length carried across feeds
        # The body's size so far as RFC 1870 counts it (SIZE, limits.message_size): the bytes
        # handed on less the dots of dot-stuffing, one for each line that begins with a dot.
        self.size = 0
        self.refused: Reply | None = None
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes | bytearray) -> list[BodyEvent]:
        if self.done:
            self.leftover += data
            return []
        held = self._held  # at most a few bytes; none when the last read ended mid-line
        buf = held + data if held else bytes(data)  # bytes(bytes) is no copy
        end = buf.find(TERMINATOR)
        if end >= 0:
            cut = end + 2  # the body keeps the CRLF that opens the terminator
            self.leftover = buf[end + len(TERMINATOR) :]
            self._held = b""
        else:
            keep = _terminator_prefix_len(buf)
            if self._normalise and not keep and buf.endswith(b"\n"):
                # A bare LF waits for the next byte, which may be a dot opening the line that
                # normalisation creates; a dot line it ends ("\r\n.\n") waits with it.
                keep = 4 if buf.endswith(b"\r\n.\n") else 1
            cut = len(buf) - keep
            if cut <= self._skip:
                self._held = buf
                return []
            self._held = buf[cut:]
        skip, self._skip = self._skip, 0
        events: list[BodyEvent] = []
        if self.refused is None:
            event = self._check(buf[:cut], skip)
            if event is not None:
                events.append(event)
        if end >= 0:
            self.done = True
            events.append(BODY_END)
        return events

    def _check(self, region: bytes, skip: int) -> BodyEvent | None:
        """Apply the body rules to `region`; the chunk to hand on, a refusal, or nothing."""
        if _has_bare_newline(region):
            if not self._normalise:
                return self._refuse(BARE_NEWLINE)
            region = normalise(region)
        if self._max_line and not self._lines_fit(region):
            return self._refuse(LINE_TOO_LONG)
        chunk = region[skip:]
        # A region starts at the body's start (a virtual CRLF) or where the last one ended,
        # and a CRLF that may precede a dot is held back: each stuffed dot's LF is in its
        # region, and counted once.
        self.size += len(chunk) - region.count(b"\n.")
        if self._max_size and self.size > self._max_size:
            return self._refuse(TOO_BIG)
        return BodyChunk(chunk) if chunk else None

    def _refuse(self, reply: Reply) -> BodyRefused:
        self.refused = reply
        return BodyRefused(reply)

    def _lines_fit(self, region: bytes) -> bool:
        """False when some line exceeds the limit; jumps from LF to LF a window at a time.

        A line of n bytes plus CRLF is a run of n + 1 non-LF bytes, so a run of `limit` bytes
        is too long. rfind over a window of that size lands on the window's last LF, so the loop
        turns about once per `limit` bytes, not once per line.
        """
        limit = self._max_line + 2
        n = len(region)
        last = region.rfind(b"\n")
        if last < 0:  # no line ends here: the carried one goes on
            self._run += n
            return self._run < limit
        # The run carried in plus the first line, then each window of `limit` bytes must
        # hold an LF; the tail after the last LF is carried on.
        rfind = region.rfind
        start, window_end = 0, limit - self._run
        while window_end <= last:
            found = rfind(b"\n", start, window_end)
            if found < 0:
                return False
            start = found + 1
            window_end = start + limit
        self._run = n - last - 1
        return self._run < limit
