"""Walking the section declarations over a TOML table: each key through its parser, unknown
keys named (with a "did you mean"), every problem collected as "section.key: message".
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from moxy.config._parsing import (
    _CHECK,
    _KEYS,
    _OPTIONAL,
    _PARSER,
    _SECTION,
    _Context,
    _Invalid,
    _Parser,
    _show,
)


class ConfigError(Exception):
    """The configuration cannot be used; `errors` holds one "section.key: message" per problem.

    `path` is the file it came from; problems with the file as a whole (unreadable, not TOML)
    carry no key.
    """

    def __init__(self, errors: list[str], path: Path | None = None) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors
        self.path = path


def _load_table(
    cls: type[Any],
    table: Mapping[str, object],
    prefix: str,
    ctx: _Context,
    errors: list[str],
    keys: Mapping[str, _Parser] | None = None,
) -> Any:
    """Build `cls` from one TOML table, appending "prefix.key: message" for each problem.

    `keys` are the parsers of a backend settings class (see `_backend_table`); without them the
    keys and sub-tables are those of `cls`'s fields that carry config metadata.
    """
    if keys is not None:
        fields = {name: attrs.fields_dict(cls)[name] for name in keys}
    else:
        fields = {f.name: f for f in attrs.fields(cls) if f.metadata.keys() & {_PARSER, _SECTION}}
    for key, value in table.items():
        if key not in fields:
            kind = "section" if isinstance(value, dict) else "key"
            hint = difflib.get_close_matches(key, fields, n=1)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            errors.append(f"{prefix}{key}: unknown {kind}{suffix}")
    before = len(errors)
    values: dict[str, object] = {}
    for name, field in fields.items():
        if _SECTION in field.metadata:
            values[name] = _load_section(field, table.get(name), f"{prefix}{name}", ctx, errors)
        elif name in table:
            parse = keys[name] if keys is not None else field.metadata[_PARSER]
            try:
                values[name] = parse(table[name], ctx)
            except _Invalid as exc:
                errors.extend(f"{prefix}{name}: {msg}" for msg in exc.args)
        elif field.default is attrs.NOTHING:
            errors.append(f"{prefix}{name}: required")
    if keys is None:
        return cls(**values)
    if len(errors) > before:
        return None
    try:
        return cls(**values)  # runs the backend's own validators
    except ValueError as exc:
        # Moxy's backends word them "key: message" when one key is at fault.
        key, sep, message = str(exc).partition(": ")
        if sep and key in fields:
            errors.append(f"{prefix}{key}: {message}")
        else:
            errors.append(f"{prefix.rstrip('.')}: {exc}")
        return None


def _load_section(
    field: attrs.Attribute[Any], table: object, name: str, ctx: _Context, errors: list[str]
) -> Any:
    """One sub-table; its cross-key check runs only when its keys themselves were valid.

    An absent optional table is None; an absent other one takes its defaults.
    """
    if table is None:
        if field.metadata.get(_OPTIONAL):
            return None
        table = {}
    if not isinstance(table, dict):
        errors.append(f"{name}: expected a table [{name}], got {_show(table)}")
        if field.metadata.get(_OPTIONAL):
            return None
        table = {}
    before = len(errors)
    section = _load_table(
        field.metadata[_SECTION], table, f"{name}.", ctx, errors, field.metadata.get(_KEYS)
    )
    check = field.metadata[_CHECK]
    if check is not None and len(errors) == before:
        errors.extend(f"{name}.{key}: {msg}" for key, msg in check(section))
    if section is None and not field.metadata.get(_OPTIONAL):
        return field.metadata[_SECTION]()  # only reached with errors reported: any value will do
    return section
