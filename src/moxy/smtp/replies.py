"""SMTP replies as values: building them, writing them, and reading them back from a peer."""

from __future__ import annotations

import re

import attrs

_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


@attrs.frozen
class Reply:
    """One SMTP reply: a three-digit code and one or more text lines (without the code).

    When the reply carries an enhanced status code (RFC 3463) it starts every text line,
    e.g. `Reply(250, ("2.1.0 Ok",))`.
    """

    code: int
    lines: tuple[str, ...] = ("",)

    @classmethod
    def make(cls, code: int, enhanced: str, *text: str) -> Reply:
        """`Reply.make(550, "5.7.1", "Relaying denied")`: each line opens with that code."""
        return cls(code, tuple(f"{enhanced} {t}" if t else enhanced for t in (text or ("",))))

    @property
    def klass(self) -> int:
        """2, 3, 4 or 5: positive, intermediate, transient or permanent."""
        return self.code // 100

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED_RE.match(self.lines[0]) if self.lines else None
        return m.group(0) if m else None

    @property
    def text(self) -> str:
        """The lines joined by ' / ' without enhanced codes: for logs."""
        out = []
        for line in self.lines:
            m = _ENHANCED_RE.match(line)
            out.append(line[m.end() :].lstrip() if m else line)
        return " / ".join(out)

    def with_enhanced(self, default: str) -> Reply:
        """This reply with `default` put on every line that has no enhanced code of its own."""
        if self.enhanced is not None:
            return self
        return Reply(self.code, tuple(f"{default} {ln}" if ln else default for ln in self.lines))

    def to_bytes(self) -> bytes:
        last = len(self.lines) - 1
        parts = [
            f"{self.code}{'-' if i < last else ' '}{line}\r\n" for i, line in enumerate(self.lines)
        ]
        return "".join(parts).encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}"
