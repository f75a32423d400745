"""Moxy's native build: the modules of the hot path compiled with mypyc.

The same source, compiled to C: fewer instructions per message, no change in what Moxy does
(docs/architecture.md, "The native build"). `make` builds it in place for `make run` and
`make test`; `MOXY_NATIVE=1 pip install --no-build-isolation .` (with mypy and Moxy's
dependencies already installed) builds it into an installation, as the container image does.
Without MOXY_NATIVE=1 an installation is pure Python.

`python3 setup.py --native-sources` prints the compiled modules' source files (for make).
"""

import ast
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def native_sources() -> list[str]:
    """The source files of moxy.native.MODULES (read, not imported: Moxy's dependencies need
    not be installed yet)."""
    tree = ast.parse((HERE / "src/moxy/native.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MODULES":
            names = ast.literal_eval(node.value)
            return [f"src/{name.replace('.', '/')}.py" for name in names]
    raise SystemExit("setup.py: no MODULES in src/moxy/native.py")


def ext_modules() -> list[object]:
    if os.environ.get("MOXY_NATIVE") != "1":
        return []
    from mypyc.build import mypycify

    return mypycify(native_sources(), opt_level="3", group_name="moxy_native")


if sys.argv[1:] == ["--native-sources"]:
    print(" ".join(native_sources()))
else:
    from setuptools import setup

    setup(ext_modules=ext_modules())
