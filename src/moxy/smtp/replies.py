"""SMTP replies as values: building them, writing them, and reading them back from a peer."""

from __future__ import annotations

import re
from typing import Final

from moxy.smtp.value import Value

_ENHANCED_RE: Final = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its code, separator and CRLF.
TEXT_MAX: Final = 512 - 6
_SURELY_SHORT: Final = TEXT_MAX // 4  # characters: at most 4 octets each in UTF-8


def _octets(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


def _cut(text: str, room: int) -> list[str]:
    """`text` in pieces of at most `room` octets, at spaces where it can be."""
    pieces: list[str] = []
    current = ""
    for word in text.split(" "):
        joined = f"{current} {word}" if current else word
        if _octets(joined) <= room:
            current = joined
            continue
        if current:
            pieces.append(current)
        while _octets(word) > room:  # one word longer than a line: cut inside it
            end = room
            while _octets(word[:end]) > room:
                end -= 1
            pieces.append(word[:end])
            word = word[end:]
        current = word
    pieces.append(current)
    return pieces


class Reply(Value):
    """One SMTP reply: a three-digit code and one or more text lines (without the code).

    When the reply carries an enhanced status code (RFC 3463) it starts every text line,
    e.g. `Reply(250, ("2.1.0 Ok",))`. A `Value` (moxy.smtp.value), not an attrs class:
    replies are read on every command, and a compiled class's attributes cost next to
    nothing to read. Equal by code and lines.
    """

    _fields = ("code", "lines")
    __slots__ = ("_enhanced", "_str", "_wire", "code", "klass", "lines")

    def __init__(self, code: int, lines: tuple[str, ...] = ("",)) -> None:
        self.code: Final = code
        self.lines: Final = lines
        # 2, 3, 4 or 5: positive, intermediate, transient or permanent. A field, not a
        # property: the hot path asks for it several times per reply.
        self.klass: Final = code // 100
        # The wire form, made at the first to_bytes(): constant replies are encoded once.
        self._wire: bytes | None = None
        # The log form (str()), made once too: a reply kept by a cache is logged again and
        # again.
        self._str: str | None = None
        # The enhanced code, looked for once: "" until then (a destination's cached replies
        # are asked on every message, by with_enhanced).
        self._enhanced: str | None = ""

    @classmethod
    def make(cls, code: int, enhanced: str, *text: str) -> Reply:
        """`Reply.make(550, "5.7.1", "Relaying denied")`: each line opens with that code."""
        if len(text) == 1:  # the usual case, without the generator
            t = text[0]
            return cls(code, (f"{enhanced} {t}" if t else enhanced,))
        return cls(code, tuple(f"{enhanced} {t}" if t else enhanced for t in (text or ("",))))

    @property
    def enhanced(self) -> str | None:
        enhanced = self._enhanced
        if enhanced == "":
            m = _ENHANCED_RE.match(self.lines[0]) if self.lines else None
            enhanced = m.group(0) if m else None
            self._enhanced = enhanced
        return enhanced

    @property
    def text(self) -> str:
        """The lines joined by ' / ' without enhanced codes: for logs."""
        out = []
        for line in self.lines:
            m = _ENHANCED_RE.match(line)
            out.append(line[m.end() :].lstrip() if m else line)
        return " / ".join(out)

    def with_enhanced(self, default: str) -> Reply:
        """This reply with an enhanced code on every line that has none of its own: the one a
        later line of it gives (of the reply's class), else `default`."""
        if self.enhanced is not None:
            return self
        lines = self.lines
        if len(lines) == 1:  # the usual case, without the generator
            return Reply(self.code, (f"{default} {lines[0]}" if lines[0] else default,))
        klass = str(self.code // 100)
        for line in lines:
            m = _ENHANCED_RE.match(line)
            if m is not None and m.group(1) == klass:
                default = m.group(0)
                break
        return Reply(self.code, tuple(
            line if _ENHANCED_RE.match(line) else f"{default} {line}" if line else default
            for line in lines
        ))

    def fitted(self) -> Reply:
        """This reply with every line within RFC 5321's 512 octets: a destination may send
        longer ones (Moxy reads up to `[limits] reply_line`), a client need not take them. A
        longer line becomes several, each opened with the line's enhanced code."""
        lines = self.lines
        if len(lines) == 1 and len(lines[0]) <= _SURELY_SHORT:  # the usual case
            return self
        if all(_octets(line) <= TEXT_MAX for line in lines):
            return self
        out: list[str] = []
        for line in lines:
            if _octets(line) <= TEXT_MAX:
                out.append(line)
                continue
            m = _ENHANCED_RE.match(line)
            code = m.group(0) if m else ""
            text = line[len(code):].lstrip(" ") if code else line
            room = TEXT_MAX - (_octets(code) + 1 if code else 0)
            out.extend(f"{code} {piece}" if code else piece for piece in _cut(text, room))
        return Reply(self.code, tuple(out))

    def to_bytes(self) -> bytes:
        wire = self._wire
        if wire is not None:
            return wire
        lines = self.lines
        if len(lines) == 1:
            text = f"{self.code} {lines[0]}\r\n"
        else:
            last = len(lines) - 1
            text = "".join(
                f"{self.code}{'-' if i < last else ' '}{line}\r\n" for i, line in enumerate(lines)
            )
        wire = text.encode("utf-8", "replace")
        self._wire = wire
        return wire

    def __str__(self) -> str:
        return self.line()

    def line(self) -> str:
        """The reply on one line, as logs and events show it: "250 2.0.0 Ok", lines joined by
        " / ". Made once. (Compiled code calls this directly; `str()` is a slot call.)"""
        text = self._str
        if text is None:
            lines = self.lines
            text = f"{self.code} {lines[0] if len(lines) == 1 else ' / '.join(lines)}"
            self._str = text
        return text
