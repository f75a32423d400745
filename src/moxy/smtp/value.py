"""`Value`: the base of the few value objects made once or more per message.

Everywhere else Moxy's values are attrs frozen classes. These are not, for speed alone: attrs
generates their `__init__` as Python code, which the native build (moxy.native) cannot
compile, and a frozen attrs instance costs about ten times what a compiled class costs to
make (callgrind: ~4,700 instructions against ~480). A `Value` subclass names its fields in
`_fields` (equality, hash and repr come from them), declares them `Final` (mypy refuses any
assignment after `__init__`; compiled, they are read-only attributes) and lists them in
`__slots__`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Value:
    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple([getattr(self, name) for name in self._fields])

    def __eq__(self, other: object) -> bool:  # another type: never equal (no NotImplemented)
        if type(other) is not type(self):
            return False
        assert isinstance(other, Value)
        return self._values() == other._values()

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash((type(self), self._values()))

    def __repr__(self) -> str:
        fields = ", ".join([f"{name}={getattr(self, name)!r}" for name in self._fields])
        return f"{type(self).__name__}({fields})"
