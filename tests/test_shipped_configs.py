"""The configurations the project ships pass `moxy check-config` as they are."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOBODY = pwd.getpwnam("nobody")


@pytest.mark.parametrize(
    "config", ["examples/moxy.toml", "examples/moxy-redis.toml", "deploy/moxy.toml"]
)
def test_shipped_configuration_passes_check_config(config: str, tmp_path: Path) -> None:
    path = ROOT / config
    as_user: dict[str, object] = {}
    if config.startswith("deploy/"):
        # Its message log is in systemd's LogsDirectory (/var/log/moxy) and its control socket
        # in its RuntimeDirectory (/run/moxy), both the moxy user's and there before the unit's
        # ExecStartPre runs check-config as that user; here, a directory of nobody's stands in.
        text = path.read_text()
        assert 'file = "/var/log/moxy/messages.log"' in text
        assert 'control_socket = "/run/moxy/control"' in text
        directory = Path(tempfile.mkdtemp(prefix="moxy-shipped-"))
        directory.chmod(0o755)
        os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
        path = directory / "moxy.toml"
        path.write_text(text.replace("/var/log/moxy/", f"{directory}/")
                        .replace("/run/moxy/", f"{directory}/"))
        for name in ("routes",):  # what it names relative to itself
            (directory / name).write_text((ROOT / "deploy" / name).read_text())
        as_user = {"user": NOBODY.pw_uid, "group": NOBODY.pw_gid, "extra_groups": []}
    try:
        result = subprocess.run(
            [sys.executable, "-m", "moxy", "check-config", "--config", str(path)],
            capture_output=True, text=True, check=False, **as_user,
        )
    finally:
        if as_user:
            shutil.rmtree(path.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"moxy: configuration file {path} is OK"
