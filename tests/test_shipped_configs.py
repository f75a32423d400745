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
def test_shipped_configuration_passes_check_config(config: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "check-config", "--config", str(ROOT / config)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"moxy: configuration file {ROOT / config} is OK"

