"""The native build's rules (setup.py, moxy/native.py), checked on the source."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from mypy import build
from mypy.modulefinder import BuildSource
from mypy.nodes import ComparisonExpr
from mypy.options import Options
from mypy.types import Instance, Type, UnionType, get_proper_type

from moxy import native

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _source(module: str) -> Path:
    return SRC / (module.replace(".", "/") + ".py")


def test_setup_py_compiles_exactly_the_listed_modules() -> None:
    out = subprocess.run([sys.executable, "setup.py", "--native-sources"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    c_sources = [SRC / (m.replace(".", "/") + ".c") for m in native.C_MODULES]
    headers = sorted({header for source in c_sources for header in source.parent.glob("*.h")})
    assert headers, "the C modules' shared header (accounting/_packing.h)"
    assert out == [str(path.relative_to(ROOT))
                   for path in [*map(_source, native.MODULES), *c_sources, *headers]]
    assert all(path.is_file() for path in [*map(_source, native.MODULES), *c_sources])


def _attrs_without_own_eq(t: Type | None) -> list[str]:
    """The attrs classes among the static type's parts whose __eq__ is the one attrs adds."""
    proper = get_proper_type(t)
    parts = proper.items if isinstance(proper, UnionType) else [proper]
    return [
        part.type.fullname for part in map(get_proper_type, parts)
        if isinstance(part, Instance) and "attrs" in part.type.metadata
        and "__eq__" not in part.type.names
    ]


def _equality_positions(path: Path) -> set[tuple[int, int]]:
    """(line, column) of each comparison with == or != in a source file."""
    return {
        (node.lineno, node.col_offset)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq)
                                                 for op in node.ops)
    }


def test_compiled_modules_never_compare_attrs_instances_with_eq() -> None:
    """mypyc compiles `a == b` between instances of an attrs class (as declared) to an identity
    test: it does not see the __eq__ attrs adds. Two equal Replies would then differ. Compiled
    modules compare such values with operator.eq, which keeps Python's meaning."""
    options = Options()
    options.python_version = (3, 11)
    options.mypy_path = [str(SRC)]
    options.export_types = True
    options.incremental = False
    options.show_traceback = True
    sources = [BuildSource(str(_source(m)), m) for m in native.MODULES]
    result = build.build(sources, options)
    assert not result.errors, result.errors
    # mypy's node visitors are compiled classes that cannot be subclassed here: the
    # comparisons are found with ast, and their types by position among mypy's expressions
    # (a position shared with another module's comparison can only add a false alarm).
    positions = {pos: str(_source(m).relative_to(ROOT)) for m in native.MODULES
                 for pos in _equality_positions(_source(m))}
    found = []
    for expr in result.types:
        where = positions.get((expr.line, expr.column))
        if where is None or not isinstance(expr, ComparisonExpr):
            continue
        for op, left, right in zip(expr.operators, expr.operands, expr.operands[1:],
                                   strict=False):
            classes = (_attrs_without_own_eq(result.types.get(left))
                       + _attrs_without_own_eq(result.types.get(right)))
            if op in ("==", "!=") and classes:
                found.append(f"{where}:{expr.line}: {op} on {', '.join(sorted(set(classes)))}")
    assert sorted(found) == []


def test_the_running_build_is_named_and_a_newer_source_makes_it_stale() -> None:
    names = native.compiled()
    if not names:  # pure Python (no .so files): nothing can be stale
        assert native.describe() == "pure Python"
        assert native.stale() == []
        return
    assert native.describe() == f"native build: {len(names)} modules compiled"
    assert native.stale() == []
    source = _source(names[0])  # a mypyc module (C_MODULES come last)
    before = source.stat()
    built = os.stat(native._file(names[0])).st_mtime
    try:
        os.utime(source, (before.st_atime, built + 60))  # "edited" after the build
        assert native.stale() == [names[0]]
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert native.stale() == []
