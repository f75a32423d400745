"""The `moxy` command as a user runs it: exit codes and one-line messages, never a traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moxy import __version__
from moxy.cli import main

REPO = Path(__file__).resolve().parent.parent


def moxy(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moxy", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(
    directory: Path, toml: str = "", routes: str = "example.test 127.0.0.1:2526\n"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "routes").write_text(routes)
    path = directory / "moxy.toml"
    path.write_text(f'[routes]\nfile = "routes"\n{toml}')
    return path


def test_version() -> None:
    result = moxy("--version")
    assert (result.returncode, result.stdout) == (0, f"moxy {__version__}\n")


def test_check_config_ok_is_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = moxy("check-config", "--config", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"moxy: configuration file {path} is OK\n",
        "",
    )


def test_check_config_accepts_short_option(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert moxy("check-config", "-c", str(path)).returncode == 0


def test_example_config_is_ok() -> None:
    result = moxy("check-config", "-c", "examples/moxy.toml", cwd=REPO)
    assert (result.returncode, result.stdout) == (
        0,
        "moxy: configuration file examples/moxy.toml is OK\n",
    )


def test_relative_routes_path_is_found_from_any_directory(tmp_path: Path) -> None:
    write_config(tmp_path / "etc")
    (tmp_path / "elsewhere").mkdir()
    result = moxy("check-config", "-c", "../etc/moxy.toml", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("toml", "routes", "expected"),
    [
        (
            '[limits]\nrecipients = "ten"\n',
            "example.test mx\n",
            ["{config}: limits.recipients: expected a positive integer, got 'ten'"],
        ),
        (
            "[limits]\nrecipients = 0\n[timeouts]\nclient_comand = 5\n",
            "example.test mx\n",
            [
                "{config}: limits.recipients: expected a positive integer, got 0",
                "{config}: timeouts.client_comand: unknown key (did you mean 'client_command'?)",
            ],
        ),
        (
            "",
            "# routes\nexample.test mx:smtp\nbad.example\n",
            [
                "{routes}:2: 'mx:smtp': bad port 'smtp'",
                "{routes}:3: key 'bad.example' has no destinations",
            ],
        ),
    ],
)
def test_check_config_reports_each_error_on_one_line(
    tmp_path: Path, toml: str, routes: str, expected: list[str]
) -> None:
    path = write_config(tmp_path, toml, routes)
    result = moxy("check-config", "-c", str(path))
    lines = [e.format(config=path, routes=tmp_path / "routes") for e in expected]
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "".join(f"moxy: {line}\n" for line in lines),
    )


def test_invalid_toml_names_the_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[server\n")
    result = moxy("check-config", "-c", str(path))
    assert result.returncode == 2
    assert re.fullmatch(rf"moxy: {re.escape(str(path))}: invalid TOML: .*line 3.*\n", result.stderr)


def test_missing_config_file(tmp_path: Path) -> None:
    result = moxy("check-config", "-c", str(tmp_path / "nope.toml"))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {tmp_path / 'nope.toml'}: cannot read: No such file or directory\n",
    )


def test_missing_routes_file(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "routes").unlink()
    result = moxy("check-config", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {tmp_path / 'routes'}: cannot read: No such file or directory\n",
    )


def test_serve_with_bad_config_exits_before_serving(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[limits]\nerrors = -1\n")
    result = moxy("serve", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {path}: limits.errors: expected a positive integer, got -1\n",
    )


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate",), ("check-config", "--bogus"), ("check-config", "-c")],
)
def test_usage_error_exits_2_without_traceback(args: tuple[str, ...]) -> None:
    result = moxy(*args)
    assert result.returncode == 2
    assert "usage: moxy" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("argv", "status"),
    [(["--version"], 0), (["--help"], 0), ([], 2), (["check-config", "-c", "/nonexistent"], 2)],
)
def test_main_returns_the_exit_status(
    argv: list[str], status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == status
