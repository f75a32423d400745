"""The native build (setup.py): which of Moxy's modules run compiled by mypyc (and which are
written in C), and whether an in-place build is older than its source (it would run the code
from before the edit)."""

from __future__ import annotations

import importlib
import importlib.machinery
import os

# The hot path: every command, reply and body chunk of a session goes through these modules.
# setup.py reads this tuple. Compiled code does not see the __eq__ that attrs adds to a class:
# `==` and `!=` between attrs instances of a declared type compare identities there, so these
# modules use operator.eq for them (tests/test_native.py checks).
MODULES = (
    "moxy.accounting.intake",
    "moxy.smtp.client",
    "moxy.smtp.commands",
    "moxy.smtp.data",
    "moxy.smtp.events",
    "moxy.smtp.replies",
    "moxy.smtp.server",
    "moxy.smtp.value",
    "moxy.accept",
    "moxy.clientlimits",
    "moxy.connection",
    "moxy.lookup.cache",
    "moxy.lookup.keys",
    "moxy.pool",
    "moxy.relay",
    "moxy.session",
    "moxy.session_events",
    "moxy.session_kept",
    "moxy.stream",
    "moxy.trace",
    "moxy.transaction",
    "moxy.upstream",
)

# Modules written in C (src/.../<name>.c), each the fast path of a Python function that stays
# the reference and the fallback (a pure-Python installation runs that function instead).
# setup.py reads this tuple too.
C_MODULES = (
    "moxy._schedule", "moxy._sockio", "moxy.accounting._frames", "moxy.accounting._loglines",
    "moxy.accounting._packer", "moxy.accounting._speedups", "moxy.smtp._speedups",
)

_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def _file(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ImportError:  # a C module of a pure-Python installation
        return ""
    return getattr(module, "__file__", None) or ""


def compiled() -> list[str]:
    """The modules of MODULES and C_MODULES that were imported from a compiled extension."""
    return [name for name in MODULES + C_MODULES if _file(name).endswith(_EXTENSIONS)]


def in_place() -> bool:
    """Moxy runs from a source checkout (src/moxy beside setup.py), where `make` builds the
    compiled modules in place; an installed wheel's sources carry their install date."""
    package = os.path.dirname(_file("moxy"))
    return os.path.isfile(os.path.join(package, os.pardir, os.pardir, "setup.py"))


def stale() -> list[str]:
    """Compiled modules of an in-place build whose source beside them is newer."""
    if not in_place():
        return []
    out = []
    for name in compiled():
        path = _file(name)
        suffix = ".c" if name in C_MODULES else ".py"
        source = os.path.join(os.path.dirname(path), name.rpartition(".")[2] + suffix)
        try:
            if os.stat(source).st_mtime > os.stat(path).st_mtime:
                out.append(name)
        except FileNotFoundError:
            pass
    return out


def describe() -> str:
    """For the log: "native build: 19 modules compiled" or "pure Python"."""
    count = len(compiled())
    return f"native build: {count} modules compiled" if count else "pure Python"
