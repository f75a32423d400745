"""`[server] user`/`group`: started as root, `moxy serve` binds a port below 1024, then serves as
that user (master and workers); as root on such a port without `user` it refuses in one line.

The suite runs as root (here and in CI), which these tests need: they start `moxy serve` as a
subprocess and read its ids from /proc.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from peers.recorder import Recorder
from peers.sink import wait_for_greeting
from peers.tls import make_tls_files

from .helpers import send_one

MakeRecorder = Callable[..., Recorder]
NOBODY = pwd.getpwnam("nobody")


def free_privileged_port() -> int:
    for port in range(900, 1000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port in 900-999 on 127.0.0.1")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that the unprivileged user can reach (pytest's tmp_path is root's only)."""
    assert os.geteuid() == 0, "these tests start moxy serve as root: run the suite as root"
    directory = Path(tempfile.mkdtemp(prefix="moxy-privileges-"))
    directory.chmod(0o755)
    # The message log's directory: Moxy, as the user, creates the log afresh after a rotation.
    os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    yield directory
    shutil.rmtree(directory)


def write(directory: Path, server: str, routes: str) -> Path:
    (directory / "routes").write_text(routes)
    log = directory / "moxy.log"
    log.touch()
    os.chown(log, NOBODY.pw_uid, NOBODY.pw_gid)  # the log is opened after the switch
    config = directory / "moxy.toml"
    config.write_text(f'[server]\nhostname = "mx.moxy.test"\n{server}\n'
                      f'[routes]\nfile = "routes"\n[log]\nfile = "moxy.log"\n')
    return config


async def serve_as_root(config: Path, port: int, output: Path) -> subprocess.Popen[bytes]:
    """`moxy serve` started (as root, as the suite runs), its output to `output`, greeting."""
    with open(output, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "moxy", "serve", "-c", str(config)],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT,
        )
    try:
        await trio.to_thread.run_sync(wait_for_greeting, "127.0.0.1", port, 15, process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return process


def ids(pid: int) -> tuple[list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split()[1:] for line in status}
    return [int(v) for v in fields["Uid"]], [int(v) for v in fields["Gid"]]


def accounting_processes(parents: list[int]) -> list[int]:
    """The `moxy.accounting.host` processes whose parent is one of `parents`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent in parents and b"moxy.accounting.host" in command:
            found.append(int(entry.name))
    return found


@pytest.mark.parametrize("workers", [1, 2])
async def test_root_binds_the_port_then_serves_as_the_user(
    shared_dir: Path, make_recorder: MakeRecorder, workers: int
) -> None:
    upstream = make_recorder()
    port = free_privileged_port()
    config = write(
        shared_dir,
        f'listen = ["127.0.0.1:{port}"]\nuser = "nobody"\ngroup = "nogroup"\nworkers = {workers}',
        f"example.org {upstream.address}\n",
    )
    output = shared_dir / "stderr"
    process = await serve_as_root(config, port, output)
    try:
        pids = [process.pid]
        if workers > 1:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            pids += [int(pid) for pid in children.split()]
            assert len(pids) == 1 + workers
        for pid in pids:
            assert ids(pid) == ([NOBODY.pw_uid] * 4, [NOBODY.pw_gid] * 4), pid
        # Each serving process's accounting process, started after the switch, as the user.
        serving = pids if workers == 1 else pids[1:]
        with trio.move_on_after(15):  # the other worker may still be starting
            while len(hosts := accounting_processes(serving)) < len(serving):
                await trio.sleep(0.05)
        assert len(hosts) == len(serving), hosts
        for pid in hosts:
            assert ids(pid) == ([NOBODY.pw_uid] * 4, [NOBODY.pw_gid] * 4), pid
        outcome = await send_one(("127.0.0.1", port), ["user@example.org"])
        assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
        assert len(upstream.messages) == 1
    finally:
        process.terminate()
        assert process.wait(15) == 0, output.read_text()
    assert "serving as user nobody (uid 65534, gid 65534)" in output.read_text()
    assert " message " in (shared_dir / "moxy.log").read_text()  # written as nobody


def test_root_on_a_privileged_port_without_user_refuses_in_one_line(shared_dir: Path) -> None:
    port = free_privileged_port()
    config = write(shared_dir, f'listen = ["127.0.0.1:{port}"]', "example.org 127.0.0.1:2526\n")
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"moxy: refusing to serve as root on port {port}: set [server] user (and group) to "
        "serve as that user once the port is bound, or run Moxy as a user with "
        "CAP_NET_BIND_SERVICE (deploy/systemd/moxy.service)"
    ]
    with socket.socket() as probe:  # nothing was bound
        probe.bind(("127.0.0.1", port))


def test_a_user_other_than_the_current_one_needs_root(shared_dir: Path) -> None:
    config = write(shared_dir, 'listen = ["127.0.0.1:0"]\nuser = "root"', "")
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "serve", "-c", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
        user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "moxy: server.user: cannot become 'root': Moxy was not started as root"
    ]


@pytest.mark.parametrize("log", ["absent", "root's"])
async def test_the_message_log_is_one_the_user_can_write(
    shared_dir: Path, make_recorder: MakeRecorder, log: str
) -> None:
    """The start's check created a missing message log as root (0640): the accounting
    process, running as the user, could not open it, and every event of a first start was
    lost. Created now, it is the user's; one the user cannot write stops the start."""
    upstream = make_recorder()
    port = free_privileged_port()
    config = write(shared_dir, f'listen = ["127.0.0.1:{port}"]\nuser = "nobody"',
                   f"example.org {upstream.address}\n")
    path = shared_dir / "moxy.log"
    path.unlink()  # write() made it the user's
    if log == "root's":
        path.touch(mode=0o640)
    if log == "root's":
        done = subprocess.run([sys.executable, "-m", "moxy", "serve", "-c", str(config)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (f"moxy: {config}: log.file: {path} is not writable by user "
                               "nobody, who writes it once Moxy has given root up\n")
        return
    output = shared_dir / "stderr"
    process = await serve_as_root(config, port, output)
    try:
        outcome = await send_one(("127.0.0.1", port), ["user@example.org"])
        assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    finally:
        process.terminate()
        assert process.wait(15) == 0, output.read_text()
    assert path.stat().st_uid == NOBODY.pw_uid
    assert " message " in path.read_text(), output.read_text()


def _starttls_verifies(port: int, ca: Path) -> bool:
    with smtplib.SMTP("127.0.0.1", port, "privileges.test", timeout=10) as smtp:
        smtp.starttls(context=ssl.create_default_context(cafile=str(ca)))
        return smtp.ehlo()[0] == 250


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_key_only_root_may_read_is_read_before_root_is_given_up(
    shared_dir: Path, tmp_path: Path, workers: int
) -> None:
    """Let's Encrypt's privkey.pem is mode 0600, root's: Moxy reads it at the start, as root,
    and a worker started again later has it too. (It was read after the switch: Moxy could
    not start, with a traceback.)"""
    tls = make_tls_files(tmp_path)  # root's directory: nobody cannot even reach it
    tls.key.chmod(0o600)
    port = free_privileged_port()
    config = write(
        shared_dir,
        f'listen = ["127.0.0.1:{port}"]\nuser = "nobody"\ngroup = "nogroup"\nworkers = {workers}'
        f'\n[tls]\ncert = "{tls.cert}"\nkey = "{tls.key}"',
        "example.org 127.0.0.1:9\n",
    )
    output = shared_dir / "stderr"
    process = await serve_as_root(config, port, output)
    try:
        assert await trio.to_thread.run_sync(_starttls_verifies, port, tls.ca)
        if workers > 1:
            children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text()
            for pid in children.split():
                os.kill(int(pid), signal.SIGKILL)
            with trio.fail_after(15):
                while output.read_text().count("starting it again") < workers:
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(wait_for_greeting, "127.0.0.1", port, 15, process)
            for _ in range(4):  # whichever worker takes it
                assert await trio.to_thread.run_sync(_starttls_verifies, port, tls.ca)
        # A reload reads the files as nobody: that one cannot, so it fails in one line and
        # the certificate read at the start keeps serving.
        process.send_signal(signal.SIGHUP)
        with trio.fail_after(15):
            while "reload failed" not in output.read_text():
                await trio.sleep(0.05)
        assert await trio.to_thread.run_sync(_starttls_verifies, port, tls.ca)
    finally:
        process.terminate()
        assert process.wait(15) == 0, output.read_text()
    assert "Traceback" not in output.read_text()


def test_a_log_directory_the_user_cannot_write_stops_the_start(shared_dir: Path) -> None:
    """After logrotate's rename Moxy, as the user by then, creates the log afresh: in a
    directory only root may write it could not, and kept writing into the renamed file."""
    logs = shared_dir / "logs"
    logs.mkdir(mode=0o755)  # root's
    config = write(shared_dir, f'listen = ["127.0.0.1:{free_privileged_port()}"]\n'
                   'user = "nobody"', "")
    config.write_text(config.read_text().replace('"moxy.log"', f'"{logs}/moxy.log"'))
    line = (f"moxy: {config}: log.file: directory {logs} is not writable by user nobody: Moxy "
            "could not create moxy.log afresh after a log rotation\n")
    for command in ("check-config", "serve"):
        done = subprocess.run([sys.executable, "-m", "moxy", command, "-c", str(config)],
                              capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stderr) == (2, line), command
    os.chown(logs, NOBODY.pw_uid, NOBODY.pw_gid)
    done = subprocess.run([sys.executable, "-m", "moxy", "check-config", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_a_log_the_check_cannot_give_to_the_user_is_removed(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a capability bounding set without CAP_CHOWN, fchown fails: the file the check
    made was left behind as root's (stopping every later start), with a message about
    opening it."""
    from moxy.accounting.sinks import check_sinks
    from moxy.config import ConfigError, load_config

    config = write(shared_dir, 'user = "nobody"', "")
    (shared_dir / "moxy.log").unlink()

    def refuse(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refuse)
    with pytest.raises(ConfigError) as caught:
        check_sinks(load_config(config), ("nobody", NOBODY.pw_uid, NOBODY.pw_gid))
    assert caught.value.errors == [
        f"log.file: cannot give {shared_dir / 'moxy.log'} to user nobody: Operation not permitted"
    ]
    assert not (shared_dir / "moxy.log").exists()


def test_a_refused_switch_names_the_call_and_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """It said only "Operation not permitted"."""
    from moxy import privileges

    def refuse(gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setgroups", lambda groups: None)
    monkeypatch.setattr(os, "setgid", refuse)
    monkeypatch.setattr(os, "setuid", refuse)
    with pytest.raises(OSError) as caught:
        privileges.drop(privileges.Switch("nobody", NOBODY.pw_uid, NOBODY.pw_gid))
    assert caught.value.strerror == (
        "server.user: cannot become user 'nobody': setgid failed: Operation not permitted"
    )


async def test_the_control_socket_is_the_users(shared_dir: Path) -> None:
    """Bound by root before the switch, the socket was root's (mode 0600): `moxy
    destinations` as Moxy's user was refused. Moxy, as the user by then, cannot remove it
    from a directory only root may write: it says so at the stop."""
    run = shared_dir / "run"
    run.mkdir(mode=0o755)  # root's
    port = free_privileged_port()
    config = write(shared_dir, f'listen = ["127.0.0.1:{port}"]\nuser = "nobody"',
                   "example.org 127.0.0.1:9\n")
    config.write_text(config.read_text() + f'[destinations]\ncontrol_socket = "{run}/c"\n')
    output = shared_dir / "stderr"
    process = await serve_as_root(config, port, output)
    try:
        assert (run / "c").stat().st_uid == NOBODY.pw_uid
        done = subprocess.run(
            [sys.executable, "-m", "moxy", "destinations", "list", "-c", str(config)],
            capture_output=True, text=True, timeout=30,
            user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
        )
        assert (done.returncode, done.stderr) == (0, "")
    finally:
        process.terminate()
        assert process.wait(15) == 0, output.read_text()
    assert f"cannot remove the control socket {run}/c: Permission denied" in output.read_text()
