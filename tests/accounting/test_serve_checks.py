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


@pytest.mark.parametrize("case", ["missing directory", "not GDBM", "a directory"])
def test_a_gdbm_log_moxy_cannot_write_stops_the_start(write_config: WriteConfig, case: str) -> None:
    """A typo in `[accounting.gdbm] path`, or a file that is something else, is one line at
    the start, not a flush failing every few seconds while mail flows uncounted."""
    name = {"missing directory": "no/such/dir/totals.gdbm", "not GDBM": "totals.txt",
            "a directory": "subdir"}[case]
    config = write_config({"example.org": "127.0.0.1:2526"}, accounting={"sinks": ["gdbm"]},
                          **{"accounting.gdbm": {"path": name}})
    path = config.parent / name
    if case == "not GDBM":
        path.write_text("example.org 127.0.0.1:2526\n")
    elif case == "a directory":
        path.mkdir()
    result = serve(config)
    assert result.returncode == 2, result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if "accounting.gdbm.path" in ln]
    expected = {
        "missing directory": f"directory {path.parent} does not exist",
        "not GDBM": f"{path} is not a GDBM file Moxy can read: ",
        "a directory": f"{path} is not a file",
    }[case]
    assert f"accounting.gdbm.path: {expected}" in line, line
    assert "Traceback" not in result.stderr


def test_check_config_accepts_a_gdbm_log_moxy_wrote_and_the_check_refuses_one_it_cannot_write(
    write_config: WriteConfig,
) -> None:
    """check-config runs the same check: a GDBM log Moxy wrote passes. One the writing user
    cannot write is refused: as root, for the `[server] user` Moxy becomes (the file stays
    root's); otherwise, for this user, the file made read-only."""
    import dbm.gnu
    import os
    import pwd

    from moxy.accounting.sinks import check_sinks
    from moxy.config import ConfigError, load_config

    config = write_config({"example.org": "127.0.0.1:2526"}, accounting={"sinks": ["gdbm"]},
                          **{"accounting.gdbm": {"path": "totals.gdbm"}})
    path = config.parent / "totals.gdbm"
    with dbm.gnu.open(str(path), "c") as db:
        db[b"dest:127.0.0.1:2526"] = b"1 100 0 0"
    ok = subprocess.run(
        [sys.executable, "-m", "moxy", "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert ok.returncode == 0, ok.stderr

    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        user: tuple[str, int, int] | None = ("nobody", nobody.pw_uid, nobody.pw_gid)
        who = "nobody"
    else:
        path.chmod(0o444)
        user, who = None, pwd.getpwuid(os.geteuid()).pw_name
    with pytest.raises(ConfigError) as caught:
        check_sinks(load_config(config), user, create=False)
    assert caught.value.errors == [
        f"accounting.gdbm.path: {path} is not writable by user {who}, who writes it"
    ]
