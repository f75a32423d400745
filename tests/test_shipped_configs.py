"""The configurations the project ships pass `moxy check-config` as they are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "config", ["examples/moxy.toml", "examples/moxy-redis.toml", "deploy/moxy.toml"]
)
def test_shipped_configuration_passes_check_config(config: str, tmp_path: Path) -> None:
    path = ROOT / config
    if config.startswith("deploy/"):
        # Its message log is in systemd's LogsDirectory (/var/log/moxy), there before the
        # unit's ExecStartPre runs check-config; here, a directory of the test's stands in.
        text = path.read_text()
        assert 'file = "/var/log/moxy/messages.log"' in text
        path = tmp_path / "moxy.toml"
        path.write_text(text.replace("/var/log/moxy/", f"{tmp_path}/"))
        for name in ("routes",):  # what it names relative to itself
            (tmp_path / name).write_text((ROOT / "deploy" / name).read_text())
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "check-config", "--config", str(path)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"moxy: configuration file {path} is OK"

