"""`moxy serve` when it cannot listen: one line naming the address, exit status 1."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("workers", [1, 2])
def test_an_address_in_use_is_one_line_and_exit_1(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "routes").write_text("example.org 127.0.0.1:2526\n")
        config = tmp_path / "moxy.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = {workers}\n'
            '[routes]\nfile = "routes"\n'
        )
        result = subprocess.run(
            [sys.executable, "-m", "moxy", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"moxy: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stderr
