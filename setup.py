"""Moxy's native build: the modules of the hot path compiled with mypyc, and the few written
in C (moxy.native.C_MODULES).

The same source, compiled to C: fewer instructions per message, no change in what Moxy does
(docs/architecture.md, "The native build"). `make` builds it in place for `make run` and
`make test`; `MOXY_NATIVE=1 pip install --no-build-isolation .` (with mypy and Moxy's
dependencies already installed) builds it into an installation, as the container image does.
Without MOXY_NATIVE=1 an installation is pure Python.

`python3 setup.py --native-sources` prints the compiled modules' source files (for make): the
mypyc modules' .py files, then the C modules' .c files and the headers they include.
"""

import ast
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _listed(name: str) -> list[str]:
    """A tuple of module names in src/moxy/native.py (read, not imported: Moxy's dependencies
    need not be installed yet)."""
    tree = ast.parse((HERE / "src/moxy/native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return list(ast.literal_eval(node.value))
    raise SystemExit(f"setup.py: no {name} in src/moxy/native.py")


def native_sources() -> list[str]:
    """The source files of moxy.native.MODULES."""
    return [f"src/{name.replace('.', '/')}.py" for name in _listed("MODULES")]


def c_sources() -> dict[str, str]:
    """moxy.native.C_MODULES: module name -> its C source file."""
    return {name: f"src/{name.replace('.', '/')}.c" for name in _listed("C_MODULES")}


def c_headers() -> list[str]:
    """The headers the C modules include (beside them)."""
    return sorted({str(header) for source in c_sources().values()
                   for header in Path(source).parent.glob("*.h")})


def ext_modules() -> list[object]:
    if os.environ.get("MOXY_NATIVE") != "1":
        return []
    from mypyc.build import mypycify
    from setuptools import Extension

    return [
        *mypycify(native_sources(), opt_level="3", group_name="moxy_native"),
        *[Extension(name, [source], depends=c_headers(), extra_compile_args=["-O2"])
          for name, source in c_sources().items()],
    ]


if sys.argv[1:] == ["--native-sources"]:
    print(" ".join([*native_sources(), *c_sources().values(), *c_headers()]))
else:
    from setuptools import setup

    setup(ext_modules=ext_modules())
