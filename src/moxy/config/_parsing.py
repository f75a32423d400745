"""The building blocks of config sections: field metadata (`_key`, `_table`, `_backend_table`)
that gives a key its parser, and the value parsers shared by the sections, each raising
`_Invalid` with messages that say what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs


class _Invalid(Exception):
    """A parser rejected a value; each argument is one message saying what was expected."""


@attrs.frozen
class _Context:
    """What parsers may need besides the value: relative paths resolve against `base_dir`."""

    base_dir: Path


_Parser = Callable[[object, _Context], object]
_Check = Callable[[Any], list[tuple[str, str]]]

_PARSER = "moxy.config.parser"
_SECTION = "moxy.config.section"
_CHECK = "moxy.config.check"
_KEYS = "moxy.config.keys"
_OPTIONAL = "moxy.config.optional"


def _key(parser: _Parser) -> dict[str, object]:
    """Field metadata for a key of a section: the parser its TOML value goes through."""
    return {_PARSER: parser}


def _table(cls: type[Any], check: _Check | None = None) -> dict[str, object]:
    """Field metadata for a sub-table of class `cls`; `check` adds problems spanning keys."""
    return {_SECTION: cls, _CHECK: check}


def _backend_table(
    cls: type[Any], *, optional: bool = True, **parsers: _Parser
) -> dict[str, object]:
    """Field metadata for a sub-table read into a backend's own settings class.

    Such a class knows nothing of TOML: its keys are its attrs fields, each parsed by what its
    type calls for (`parsers` overrides that per key), its defaults are its own, and its
    validators' `ValueError`s ("key: message") become errors naming the key. An `optional`
    table that is absent is None; a present one must give every field without a default.
    """
    hints = typing.get_type_hints(cls)
    keys = {f.name: parsers.get(f.name) or _parser_for(hints[f.name]) for f in attrs.fields(cls)}
    return {_SECTION: cls, _CHECK: None, _KEYS: keys, _OPTIONAL: optional}


# --- value parsers ------------------------------------------------------------------------


def _show(value: object) -> str:
    """A TOML-ish rendering of a rejected value for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _integer(minimum: int, *, zero_means: str = "", why: str = "") -> _Parser:
    wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer of at least {minimum}"
    )
    if zero_means:
        wanted = f"0 ({zero_means}) or {wanted}"
    if why:
        wanted = f"{wanted} ({why})"

    def parse(value: object, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        if value < minimum and not (zero_means and value == 0):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        return value

    return parse


def _seconds(*, zero_ok: bool = False) -> _Parser:
    wanted = "a non-negative number of seconds" if zero_ok else "a positive number of seconds"

    def parse(value: object, ctx: _Context) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise _Invalid(f"expected {wanted}, got {_show(value)}")
        return float(value)

    return parse


def _boolean(value: object, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"expected true or false, got {_show(value)}")


def _choice(*options: str, aliases: Mapping[str, str] | None = None) -> _Parser:
    known = {o: o for o in options} | dict(aliases or {})
    wanted = "one of " + ", ".join(repr(o) for o in options)

    def parse(value: object, ctx: _Context) -> str:
        if isinstance(value, str) and value.lower() in known:
            return known[value.lower()]
        raise _Invalid(f"expected {wanted}, got {_show(value)}")

    return parse


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _text(value: object, ctx: _Context) -> str:
    """Free text that ends up in SMTP replies: a CR or LF in it would forge extra reply lines."""
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    if _CONTROL_RE.search(value):
        raise _Invalid("must not contain control characters (CR, LF, tab, ...)")
    return value


_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _domain(*, empty_ok: bool = False) -> _Parser:
    def parse(value: object, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a host name, got {_show(value)}")
        if value == "" and empty_ok:
            return value
        if len(value) > 253 or not _DOMAIN_RE.fullmatch(value):
            raise _Invalid(f"expected a host name such as 'mx.example.org', got {_show(value)}")
        return value.rstrip(".")

    return parse


def _path(value: object, ctx: _Context) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a file path, got {_show(value)}")
    path = Path(value).expanduser()
    return path if path.is_absolute() else ctx.base_dir / path


def _string(value: object, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_show(value)}")
    return value


def _strings(value: object, ctx: _Context) -> tuple[str, ...]:
    """One string, or an array of them."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f"expected a string or an array of strings, got {_show(value)}")
    return tuple(value)


_PARSERS_BY_TYPE: Mapping[object, _Parser] = {
    str: _string,
    bool: _boolean,
    int: _integer(0),
    float: _seconds(),
    Path: _path,
    tuple[str, ...]: _strings,
}


def _parser_for(hint: object) -> _Parser:
    """The parser for a backend settings field of type `hint`; `X | None` reads as X (TOML
    has no null: an absent key keeps the default)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [h for h in typing.get_args(hint) if h is not type(None)]
        if len(members) == 1:
            hint = members[0]
    try:
        return _PARSERS_BY_TYPE[hint]
    except KeyError:
        raise TypeError(f"no configuration parser for fields of type {hint!r}") from None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(value: object, ctx: _Context) -> tuple[Network, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(f'expected an array such as ["192.0.2.0/24", "2001:db8::/32"], '
                       f"got {_show(value)}")
    problems: list[str] = []
    networks: list[Network] = []
    for entry in value:
        try:
            # strict: "192.0.2.1/24" is more likely a typo than a network
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as exc:
            problems.append(f"{entry!r}: {exc}")
    if problems:
        raise _Invalid(*problems)
    return tuple(networks)


# Metadata shared by several sections.
_COUNT = _key(_integer(1))
_SECONDS = _key(_seconds())
_ZERO_OK = _seconds(zero_ok=True)


def _names(known: tuple[str, ...], *, kind: str, example: str, empty_ok: bool) -> _Parser:
    """An array of distinct names out of `known` (case-insensitive), such as the route chain or
    the accounting sinks; `kind` names one ("route source"), for the messages."""
    array = "an array" if empty_ok else "a non-empty array"

    def parse(value: object, ctx: _Context) -> tuple[str, ...]:
        if not isinstance(value, list) or not (value or empty_ok):
            raise _Invalid(f"expected {array} such as {example}, got {_show(value)}")
        problems: list[str] = []
        names: list[str] = []
        for entry in value:
            if not isinstance(entry, str):
                problems.append(f"expected {kind.split()[-1]} names such as {known[0]!r}, "
                                f"got {_show(entry)}")
            elif entry.lower() not in known:
                hint = difflib.get_close_matches(entry.lower(), known, n=1)
                suffix = f"did you mean {hint[0]!r}?" if hint else "known: " + ", ".join(known)
                problems.append(f"unknown {kind} {entry!r} ({suffix})")
            elif entry.lower() in names:
                problems.append(f"{entry!r} is listed twice")
            else:
                names.append(entry.lower())
        if problems:
            raise _Invalid(*problems)
        return tuple(names)

    return parse
