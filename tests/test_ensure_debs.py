"""scripts/ensure-debs, the first step of `make run` and `make test`, on each of its paths.

The script runs for real (dash, the real dpkg-query on this machine's package database); only
the commands that would change the machine (apt-get, debconf-set-selections, sudo, and `id` to
play a non-root user) are small recording scripts on a PATH of its own, and the policy file is
moved into a temporary directory with MOXY_POLICY_RC_D.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ensure-debs"
# Real commands the script needs besides the shell's builtins.
REAL = ["dpkg-query", "grep", "tee", "chmod", "rm", "env", "cat", "tr"]
INSTALLED = ["coreutils", "dpkg"]  # on every Debian machine
MISSING = "moxy-test-no-such-package"
POLICY = "#!/bin/sh\n# the administrator's own policy\nexit 101\n"

# apt-get records its arguments, and whether the policy file was there (and what it said) at
# the time; `install` fails when APT_FAIL is set, as it does for a package no mirror has.
APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$CALLS"
if [ -e "$MOXY_POLICY_RC_D" ]; then
    echo "policy: $(tr '\\n' ' ' < "$MOXY_POLICY_RC_D")" >> "$CALLS"
else
    echo "policy: none" >> "$CALLS"
fi
case "$1" in install) [ -z "${APT_FAIL:-}" ] || exit 100 ;; esac
exit 0
"""
DEBCONF = """#!/bin/sh
echo "debconf-set-selections $(cat)" >> "$CALLS"
"""
SUDO = """#!/bin/sh
echo "sudo $1" >> "$CALLS"
exec "$@"
"""


@attrs.frozen
class Run:
    status: int
    stdout: str
    stderr: str
    calls: list[str]


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    for name in REAL:
        real = shutil.which(name)
        assert real, f"{name} is missing: run `apt-get install coreutils grep dpkg`"
        (directory / name).symlink_to(real)
    _script(directory / "apt-get", APT_GET)
    _script(directory / "debconf-set-selections", DEBCONF)
    return directory


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def ensure_debs(
    tmp_path: Path, bin_dir: Path, packages: Sequence[str], **env: str
) -> Run:
    calls = tmp_path / "calls"
    calls.touch()
    done = subprocess.run(
        ["/bin/sh", str(SCRIPT), *packages],
        capture_output=True,
        text=True,
        timeout=30,
        env={
            "PATH": str(bin_dir),
            "CALLS": str(calls),
            "MOXY_POLICY_RC_D": str(tmp_path / "policy-rc.d"),
            **env,
        },
    )
    return Run(done.returncode, done.stdout, done.stderr, calls.read_text().splitlines())


def test_installed_packages_need_nothing(tmp_path: Path, bin_dir: Path) -> None:
    run = ensure_debs(tmp_path, bin_dir, INSTALLED)
    assert (run.status, run.stdout, run.stderr, run.calls) == (0, "", "", [])
    assert not (tmp_path / "policy-rc.d").exists()


def test_missing_package_is_installed_with_services_kept_stopped(
    tmp_path: Path, bin_dir: Path
) -> None:
    run = ensure_debs(tmp_path, bin_dir, [*INSTALLED, MISSING])
    assert run.status == 0, run.stderr
    assert run.stdout == f"ensure-debs: installing: {MISSING}\n"
    assert run.calls == [
        "debconf-set-selections postfix postfix/main_mailer_type select No configuration",
        "apt-get update -qq",
        "policy: #!/bin/sh exit 101 ",
        f"apt-get install -y -qq --no-install-recommends {MISSING}",
        "policy: #!/bin/sh exit 101 ",
    ]
    # The policy file the script made for the install is gone afterwards.
    assert not (tmp_path / "policy-rc.d").exists()


def test_existing_policy_file_is_kept_and_the_install_succeeds(
    tmp_path: Path, bin_dir: Path
) -> None:
    """The bug of issue 14: with /usr/sbin/policy-rc.d already there, the first `make test`
    installed everything and still failed."""
    policy = tmp_path / "policy-rc.d"
    policy.write_text(POLICY)
    run = ensure_debs(tmp_path, bin_dir, [MISSING])
    assert run.status == 0, run.stderr
    assert f"apt-get install -y -qq --no-install-recommends {MISSING}" in run.calls
    assert policy.read_text() == POLICY


@pytest.mark.parametrize("policy_present", [False, True], ids=["no-policy", "policy"])
def test_failed_install_fails_and_cleans_up(
    tmp_path: Path, bin_dir: Path, policy_present: bool
) -> None:
    policy = tmp_path / "policy-rc.d"
    if policy_present:
        policy.write_text(POLICY)
    run = ensure_debs(tmp_path, bin_dir, [MISSING], APT_FAIL="1")
    assert run.status == 100
    assert policy.exists() == policy_present
    if policy_present:
        assert policy.read_text() == POLICY


def test_non_root_without_sudo_says_so_in_one_line(tmp_path: Path, bin_dir: Path) -> None:
    _script(bin_dir / "id", "#!/bin/sh\necho 1000\n")
    run = ensure_debs(tmp_path, bin_dir, [*INSTALLED, MISSING])
    assert run.status == 1
    assert run.stderr == f"ensure-debs: need root (or sudo) to install: {MISSING}\n"
    assert run.calls == []


def test_non_root_installs_through_sudo(tmp_path: Path, bin_dir: Path) -> None:
    _script(bin_dir / "id", "#!/bin/sh\necho 1000\n")
    _script(bin_dir / "sudo", SUDO)
    run = ensure_debs(tmp_path, bin_dir, [MISSING])
    assert run.status == 0, run.stderr
    assert run.calls == [
        "sudo debconf-set-selections",
        "debconf-set-selections postfix postfix/main_mailer_type select No configuration",
        "sudo tee",
        "sudo chmod",
        "sudo apt-get",
        "apt-get update -qq",
        "policy: #!/bin/sh exit 101 ",
        "sudo env",
        f"apt-get install -y -qq --no-install-recommends {MISSING}",
        "policy: #!/bin/sh exit 101 ",
        "sudo rm",
    ]
    assert not (tmp_path / "policy-rc.d").exists()


def test_script_is_executable_as_make_calls_it() -> None:
    assert os.access(SCRIPT, os.X_OK)
