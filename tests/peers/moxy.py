"""Moxy as the tests see it: config files written from Python values, and a running instance.

`routes` is either the text of a routes file, or a mapping from key to destinations where a
destination is a string, anything with an `.address` (a Recorder, an SmtpSink), or a list of
those (one group each). Failover is written as a string: f"{a.address}|{b.address}".
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs


class HasAddress(Protocol):
    @property
    def address(self) -> str: ...


Destination = str | HasAddress
Routes = str | Mapping[str, Destination | Sequence[Destination]]

# Timeouts short enough for fault tests to be quick, long enough for a loaded CI machine.
DEFAULT_SECTIONS: Mapping[str, Mapping[str, Any]] = {
    "server": {"hostname": "mx.moxy.test"},
    "proxy": {"helo_name": "relay.moxy.test"},
    "timeouts": {
        "client_command": 10.0,
        "client_data": 10.0,
        "upstream_connect": 3.0,
        "upstream_greeting": 3.0,
        "upstream_command": 3.0,
        "upstream_mail": 3.0,
        "upstream_rcpt": 3.0,
        "upstream_data_init": 3.0,
        "upstream_data_block": 3.0,
        "upstream_data_end": 3.0,
    },
}


# --- config files --------------------------------------------------------------------------


def _address(dest: Destination) -> str:
    return dest if isinstance(dest, str) else dest.address


def routes_text(routes: Routes) -> str:
    if isinstance(routes, str):
        return routes
    lines = []
    for key, value in routes.items():
        groups: Sequence[Destination] = (
            [value] if isinstance(value, str) or hasattr(value, "address") else value
        )
        lines.append(f"{key}  {'  '.join(_address(g) for g in groups)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(sections: Mapping[str, Mapping[str, object]]) -> str:
    out = []
    for name, keys in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
        out.append("")
    return "\n".join(out)


def merge_sections(
    *layers: Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, object]]:
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for name, keys in layer.items():
            merged.setdefault(name, {}).update(keys)
    return merged


@attrs.frozen
class RunningMoxy:
    bound: list[tuple[str, int]]  # every address serve() reported as bound
    config_path: Path
    log_file: Path

    @property
    def host(self) -> str:
        return self.bound[0][0]

    @property
    def port(self) -> int:
        return self.bound[0][1]

    def log_lines(self) -> list[str]:
        try:
            return self.log_file.read_text().splitlines()
        except FileNotFoundError:
            return []


StartMoxy = Callable[..., Awaitable[RunningMoxy]]


@attrs.define
class MoxyProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    config_path: Path
    log_file: Path
    stderr_path: Path

    stopped_by_test: bool = False

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the process and wait for it; returns its exit status."""
        self.stopped_by_test = True
        self.process.send_signal(sig)
        return self.process.wait(timeout)
