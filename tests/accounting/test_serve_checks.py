"""`moxy serve` checks its accounting before it listens: one line naming the key, exit 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

WriteConfig = Callable[..., Path]


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moxy", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"log": {"file": "no/such/dir/moxy.log"}}, "log.file"),
        ({"accounting.file": {"path": "no/such/dir/events.jsonl"}}, "accounting.file.path"),
    ],
)
def test_a_message_log_that_cannot_be_opened_stops_the_start(
    write_config: WriteConfig, sections: dict[str, dict[str, str]], key: str
) -> None:
    config = write_config({"example.org": "127.0.0.1:2526"}, **sections)
    result = serve(config)
    assert result.returncode == 2, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if key in ln]
    assert line.endswith(f"{key}: directory {config.parent / 'no/such/dir'} does not exist"), line
    assert "Traceback" not in result.stderr
