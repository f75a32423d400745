"""Running moxylogalyze as the operator does: a subprocess, its exit status and both streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

LOGS = Path(__file__).resolve().parent / "logs"
PROG = [sys.executable, "-m", "moxy.tools.logalyze"]


@attrs.frozen
class Result:
    status: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.status == 0, self
        return json.loads(self.stdout)


def logalyze(
    *args: str | Path,
    stdin: bytes = b"",
    cwd: Path = LOGS,
    python: list[str] = PROG,
    env: dict[str, str] | None = None,
) -> Result:
    done = subprocess.run(
        [*python, *map(str, args)],
        input=stdin, capture_output=True, cwd=cwd, timeout=120,
        env=None if env is None else {**os.environ, **env},
    )  # fmt: skip
    return Result(
        done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8", "replace")
    )


def one_error_line(result: Result, status: int) -> str:
    """The single stderr line of a failed run, checked for the house style."""
    assert result.status == status, result
    assert "Traceback" not in result.stderr, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("moxylogalyze: "), line
    return line
