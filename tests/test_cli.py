"""The `moxy` command as a user runs it: exit codes and one-line messages, never a traceback."""

from __future__ import annotations

import dbm.gnu
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from moxy import __version__
from moxy.cli import main
from moxy.lookup.gdbm import make_db
from moxy.lookup.redis import RedisSettings, route_import, route_set
from peers.example_routes import ROUTES
from peers.redis_server import RedisServer
from peers.sink import free_port, wait_for_greeting
from peers.slapd import ROUTES_BASE, Slapd

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


@pytest.mark.parametrize("where", ["missing directory", "a directory", "to be made"])
def test_check_config_checks_the_message_log_as_serve_does(tmp_path: Path, where: str) -> None:
    """serve refused a log in a missing directory, or one that is a directory, which
    check-config passed (systemd's ExecStartPre then let a start fail every 2 s). A log not
    made yet is fine, and check-config does not make it."""
    log = {"missing directory": tmp_path / "nowhere" / "moxy.log", "a directory": tmp_path,
           "to be made": tmp_path / "moxy.log"}[where]
    path = write_config(tmp_path, f'[log]\nfile = "{log}"\n')
    result = moxy("check-config", "-c", str(path))
    if where == "to be made":
        assert result.returncode == 0, result.stderr
        assert not log.exists()
        return
    message = (f"directory {log.parent} does not exist" if where == "missing directory"
               else f"cannot open {log} for appending: Is a directory")
    assert (result.returncode, result.stderr) == (2, f"moxy: {path}: log.file: {message}\n")


def test_check_config_does_not_wait_for_a_fifo_log_reader(tmp_path: Path) -> None:
    """A message log that is a FIFO nobody reads yet: check-config (and serve) hung for good
    in the open; the file sink copes with such a FIFO itself."""
    log = tmp_path / "moxy.log"
    os.mkfifo(log)
    path = write_config(tmp_path, f'[log]\nfile = "{log}"\n')
    result = moxy("check-config", "-c", str(path))  # the helper's own timeout would fail it
    assert (result.returncode, result.stderr) == (0, "")


def test_accounting_only_without_routes(tmp_path: Path) -> None:
    """`[routes]` may be left out in accounting-only mode: check-config and serve gave a
    traceback ("CachedRouter needs at least one route source"); lookup says in one line that
    there is no route source."""
    port = free_port()
    path = tmp_path / "moxy.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
                    '[relay]\naccounting_only = "127.0.0.1:10025"\n')
    result = moxy("check-config", "-c", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    result = moxy("lookup", "-c", str(path), "a@example.org")
    assert (result.returncode, result.stdout, result.stderr) == (2, "", (
        f"moxy: {path}: no route source: [routes] is not configured (relay.accounting_only "
        "sends every recipient to 127.0.0.1:10025)\n"
    ))
    with open(tmp_path / "serve.out", "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "moxy", "serve", "-c", str(path)],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_greeting("127.0.0.1", port, 15, process)
    finally:
        process.terminate()
        status = process.wait(10)
    output = (tmp_path / "serve.out").read_text()
    assert status == 0, output
    assert "Traceback" not in output


NOBODY = pwd.getpwnam("nobody")


@pytest.mark.parametrize("case", ["root on port 25", "another user", "socket directory missing",
                                  "socket path too long", "socket directory read-only",
                                  "log directory read-only"])
def test_check_config_refuses_what_serve_refuses(case: str) -> None:
    """check-config said OK for each of these, and serve then refused to start."""
    directory = Path(tempfile.mkdtemp(prefix="moxy-cc-"))  # nobody can reach it
    directory.chmod(0o755)
    try:
        (directory / "routes").write_text("example.test 127.0.0.1:2526\n")
        server = {"root on port 25": 'listen = ["127.0.0.1:25"]',
                  "another user": 'listen = ["127.0.0.1:2525"]\nuser = "daemon"'}.get(
                      case, 'listen = ["127.0.0.1:2525"]')
        socket_path = {"socket directory missing": directory / "run" / "control",
                       "socket path too long": directory / ("c" * 120)}.get(
                           case, directory / "control")
        log = directory / "moxy.log"
        config = directory / "moxy.toml"
        config.write_text(f'[server]\n{server}\n[routes]\nfile = "routes"\n'
                          f'[destinations]\ncontrol_socket = "{socket_path}"\n'
                          f'[log]\nfile = "{log}"\n')
        if case in ("root on port 25",):
            as_user = {}
        else:  # the others as an unprivileged user
            as_user = {"user": NOBODY.pw_uid, "group": NOBODY.pw_gid, "extra_groups": []}
            if case not in ("socket directory read-only", "log directory read-only"):
                os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
            if case == "socket directory read-only":
                log.touch()
                os.chown(log, NOBODY.pw_uid, NOBODY.pw_gid)
            if case == "log directory read-only":
                (directory / "run").mkdir()
                os.chown(directory / "run", NOBODY.pw_uid, NOBODY.pw_gid)
                config.write_text(config.read_text().replace(str(socket_path),
                                                             str(directory / "run" / "c")))
        result = subprocess.run([sys.executable, "-m", "moxy", "check-config", "-c", str(config)],
                                capture_output=True, text=True, timeout=60, **as_user)
    finally:
        shutil.rmtree(directory)
    expected = {
        "root on port 25": "refusing to serve as root on port 25: set [server] user (and group) "
        "to serve as that user once the port is bound, or run Moxy as a user with "
        "CAP_NET_BIND_SERVICE (deploy/systemd/moxy.service)",
        "another user": "server.user: cannot become 'daemon': Moxy was not started as root",
        "socket directory missing": f"{config}: destinations.control_socket: directory "
        f"{directory / 'run'} does not exist",
        "socket path too long": f"{config}: destinations.control_socket: {socket_path} is "
        "longer than the 107 bytes of a unix socket path",
        "socket directory read-only": f"{config}: destinations.control_socket: directory "
        f"{directory} is not writable by user nobody, who binds the socket",
        "log directory read-only": f"{config}: log.file: directory {directory} is not writable "
        "by user nobody, who creates moxy.log",
    }[case]
    assert (result.returncode, result.stdout, result.stderr) == (2, "", f"moxy: {expected}\n")


def test_check_config_accepts_short_option(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    assert moxy("check-config", "-c", str(path)).returncode == 0


@pytest.mark.parametrize("example", ["examples/moxy.toml", "examples/moxy-redis.toml"])
def test_example_config_is_ok(example: str) -> None:
    result = moxy("check-config", "-c", example, cwd=REPO)
    assert (result.returncode, result.stdout) == (
        0,
        f"moxy: configuration file {example} is OK\n",
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


# --- route sources in the configuration -------------------------------------------------------


def test_check_config_opens_the_gdbm_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[routes.gdbm]\npath = "routes.db"\n')
    path.write_text(path.read_text().replace("[routes]\n", '[routes]\nchain = ["gdbm", "file"]\n'))
    result = moxy("check-config", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {path}: routes.gdbm.path: cannot open {tmp_path / 'routes.db'}: No such file or "
        "directory (build it with `moxy makedb`)\n",
    )
    assert moxy("makedb", str(tmp_path / "routes")).returncode == 0
    assert moxy("check-config", "-c", str(path)).returncode == 0


def test_check_config_says_why_a_gdbm_file_cannot_be_used(tmp_path: Path) -> None:
    """dbm.gnu.error has no strerror: the message said `None`."""
    path = write_config(tmp_path, '[routes.gdbm]\npath = "routes"\n')  # the text file
    path.write_text(path.read_text().replace("[routes]\n", '[routes]\nchain = ["gdbm", "file"]\n'))
    result = moxy("check-config", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {path}: routes.gdbm.path: cannot open {tmp_path / 'routes'}: Unexpected end of "
        "file (build it with `moxy makedb`)\n",
    )


def test_serve_refuses_a_chain_naming_a_source_without_its_table(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text('[routes]\nchain = ["ldap", "file"]\nfile = "routes"\n')
    result = moxy("serve", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {path}: routes.chain: 'ldap' needs a [routes.ldap] table\n",
    )


@pytest.mark.parametrize(("ca", "tls"), [("missing", "starttls = true\n"), ("missing", ""),
                                       ("not a certificate", "")])
def test_an_ldap_ca_file_is_checked_with_or_without_tls(tmp_path: Path, ca: str, tls: str) -> None:
    """configuration.md: check-config refuses a missing CA file or one holding no certificate;
    it did only with StartTLS or ldaps://."""
    path = write_config(tmp_path)
    if ca == "not a certificate":
        (tmp_path / "ca.pem").write_text("not a certificate\n")
    path.write_text(
        '[routes]\nchain = ["ldap"]\n[routes.ldap]\nuri = "ldap://127.0.0.1:1"\nbase = "o=x"\n'
        f'{tls}ca_file = "ca.pem"\n'
    )
    result = moxy("check-config", "-c", str(path))
    assert result.returncode == 2
    prefix = re.escape(f"moxy: {path}: routes.ldap.ca_file: ")
    assert re.fullmatch(rf"{prefix}.*\n", result.stderr)


def test_an_ldap_uri_that_ldap3_cannot_use_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text('[routes]\nchain = ["ldap"]\n[routes.ldap]\nuri = "ldap://h:x"\nbase = "o=x"\n')
    result = moxy("check-config", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {path}: routes.ldap.uri: 'ldap://h:x': port must be an integer\n",
    )


# --- moxy makedb ------------------------------------------------------------------------------


def test_makedb_writes_routes_db_beside_the_routes_file(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("example.org  10.0.0.5:2525 MX2.example.org\n*  fallback.example\n")
    result = moxy("makedb", str(routes))
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"moxy: {routes}.db: 2 routes from {routes}\n",
        "",
    )
    with dbm.gnu.open(str(tmp_path / "routes.db"), "r") as db:
        assert db[b"example.org"] == b"10.0.0.5:2525 mx2.example.org:25"


def test_makedb_output_option(tmp_path: Path) -> None:
    (tmp_path / "routes").write_text("example.org  10.0.0.5\n")
    result = moxy("makedb", "routes", "-o", "out/custom.db", cwd=tmp_path)
    assert result.returncode == 3  # the directory does not exist
    assert result.stderr == "moxy: cannot write out/custom.db: No such file or directory\n"
    (tmp_path / "out").mkdir()
    result = moxy("makedb", "routes", "-o", "out/custom.db", cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, "moxy: out/custom.db: 1 routes from routes\n")


def test_makedb_reports_every_bad_line_and_writes_nothing(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("example.org  mx:smtp\nok.example  mx\nbad.example\n")
    result = moxy("makedb", str(routes))
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        f"moxy: {routes}:1: 'mx:smtp': bad port 'smtp'\n"
        f"moxy: {routes}:3: key 'bad.example' has no destinations\n",
    )
    assert not (tmp_path / "routes.db").exists()


def test_makedb_of_a_missing_file(tmp_path: Path) -> None:
    result = moxy("makedb", str(tmp_path / "routes"))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {tmp_path / 'routes'}: cannot read: No such file or directory\n",
    )


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "link to a device"])
def test_makedb_writes_only_over_a_regular_file(tmp_path: Path, kind: str) -> None:
    """makedb renames its new file over the target: over /dev/full that would be a database
    where every program expects a device."""
    (tmp_path / "routes").write_text("example.org  10.0.0.5\n")
    target = tmp_path / "target"
    # Never a system's own device as the target: a makedb that regressed would replace it.
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device":
        try:
            os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null of its own
        except PermissionError:
            pytest.skip("creating a device node needs root")
    else:
        target.symlink_to("/dev/null")  # a regressed makedb replaces the link, not /dev/null
    before = target.lstat()
    result = moxy("makedb", "routes", "-o", str(target), cwd=tmp_path)
    what = "a directory" if kind == "directory" else "not a regular file"
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", f"moxy: {target}: {what}; makedb writes a database only over a regular file\n"
    )  # fmt: skip
    after = target.lstat()
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_makedb_over_an_older_database_and_through_a_dangling_link(tmp_path: Path) -> None:
    (tmp_path / "routes").write_text("example.org  10.0.0.5\n")
    assert moxy("makedb", "routes", cwd=tmp_path).returncode == 0
    assert moxy("makedb", "routes", cwd=tmp_path).returncode == 0  # a regular file: replaced
    (tmp_path / "link.db").symlink_to(tmp_path / "nowhere.db")
    assert moxy("makedb", "routes", "-o", "link.db", cwd=tmp_path).returncode == 0


def test_makedb_cuts_a_huge_bad_line_in_its_message(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("ok.example  10.0.0.5\nexample.org  " + "x" * 1_000_000 + ":smtp\n")
    result = moxy("makedb", str(routes))
    assert result.returncode == 2 and result.stdout == "", result
    [line] = result.stderr.splitlines()
    assert len(line) < 400, line[:500]
    assert line.startswith(f"moxy: {routes}:2: 'xxx")
    assert re.search(r"xxx\[\.\.\. \d+ characters \.\.\.\]xxx", line), line
    assert line.endswith("x:smtp': bad host name")  # the end still says why


# --- moxy route -------------------------------------------------------------------------------


def redis_config(directory: Path, server: RedisServer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "moxy.toml"
    path.write_text(f'[routes]\nchain = ["redis"]\n[routes.redis]\nurl = "{server.url}"\n')
    return path


def test_route_set_list_del(tmp_path: Path, redis_server: RedisServer) -> None:
    config = str(redis_config(tmp_path, redis_server))
    result = moxy("route", "set", "Example.ORG", "10.0.0.6:2525", "mx2.example.org", "-c", config)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "moxy: example.org -> 10.0.0.6:2525 mx2.example.org:25\n",
        "",
    )
    settings = RedisSettings(url=redis_server.url)
    route_set(redis_server.client(), settings, ".example.org", "a|b:26")
    route_set(redis_server.client(), settings, "example.net", "mx.example.net")
    listed = moxy("route", "list", "-c", config)
    assert (listed.returncode, sorted(listed.stdout.splitlines())) == (
        0,
        [".example.org  a:25|b:26", "example.net  mx.example.net:25",
         "example.org  10.0.0.6:2525 mx2.example.org:25"],
    )  # fmt: skip
    listed = moxy("route", "list", "*.ORG", "-c", config)
    assert sorted(listed.stdout.splitlines()) == [
        ".example.org  a:25|b:26",
        "example.org  10.0.0.6:2525 mx2.example.org:25",
    ]
    result = moxy("route", "del", "-c", config, "example.org")
    assert (result.returncode, result.stdout) == (0, "moxy: example.org deleted\n")
    result = moxy("route", "del", "-c", config, "example.org")
    assert (result.returncode, result.stdout, result.stderr) == (
        1,
        "",
        f"moxy: no route for example.org in Redis redis://127.0.0.1:{redis_server.port}/0\n",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("example.org", "mx:smtp"), "'mx:smtp': bad port 'smtp'"),
        (
            ("*.example.org", "mx"),
            "bad key '*.example.org': a parent domain is written '.example.org'",
        ),
        (("example.org", "[2001:db8::1"), "'[2001:db8::1': missing ']'"),
    ],
)
def test_route_set_refuses_bad_input(
    tmp_path: Path,
    redis_server: RedisServer,
    args: tuple[str, ...],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["route", "set", "-c", str(redis_config(tmp_path, redis_server)), *args])
    assert (status, capsys.readouterr().err) == (2, f"moxy: {message}\n")
    assert redis_server.client().dbsize() == 0


def test_route_import(tmp_path: Path, redis_server: RedisServer) -> None:
    config = str(redis_config(tmp_path, redis_server))
    (tmp_path / "routes").write_text(ROUTES)
    result = moxy("route", "import", "-c", config, str(tmp_path / "routes"))
    assert (result.returncode, result.stdout) == (
        0,
        f"moxy: imported 5 routes from {tmp_path / 'routes'}\n",
    )
    assert redis_server.client().get("moxy:route:shop.example") == (
        b"203.0.113.7:2600|198.51.100.9:25"
    )
    (tmp_path / "bad").write_text("a.example  mx\nb.example  mx:0\n")
    result = moxy("route", "import", "-c", config, str(tmp_path / "bad"))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {tmp_path / 'bad'}:2: 'mx:0': port 0 out of range 1-65535\n",
    )


def test_route_needs_a_redis_table(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = moxy("route", "list", "-c", str(path))
    assert (result.returncode, result.stderr) == (
        2,
        f"moxy: {path}: routes.redis: not configured; `moxy route` needs this table\n",
    )


def test_route_with_redis_down_is_one_line_and_status_3(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = str(redis_config(tmp_path, redis_server))
    redis_server.stop()
    result = moxy("route", "set", "-c", config, "example.org", "mx")
    assert result.returncode == 3
    assert re.fullmatch(
        rf"moxy: Redis redis://127\.0\.0\.1:{redis_server.port}/0: .*Connection refused\.\n",
        result.stderr,
    )


# --- moxy lookup ------------------------------------------------------------------------------


def test_lookup_names_source_key_and_groups_in_every_source(
    tmp_path: Path, redis_server: RedisServer, slapd: Slapd, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "routes").write_text(ROUTES)
    make_db(tmp_path / "routes", tmp_path / "routes.db")
    route_import(redis_server.client(), RedisSettings(url=redis_server.url), tmp_path / "routes")
    tables = {
        "file": 'file = "routes"\n',
        "gdbm": '[routes.gdbm]\npath = "routes.db"\n',
        "ldap": f'[routes.ldap]\nuri = "{slapd.uri}"\nbase = "{ROUTES_BASE}"\n',
        "redis": f'[routes.redis]\nurl = "{redis_server.url}"\n',
    }
    for name, table in tables.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(f'[routes]\nchain = ["{name}"]\n{table}')
        status = main(["lookup", "-c", str(path), "Someone@Sub.Example.ORG"])
        assert (status, *capsys.readouterr()) == (
            0,
            f"source: {name}\nkey: .example.org\ngroup 1: relay.example.org:587\n",
            "",
        )
        assert main(["lookup", "example.org", "-c", str(path)]) == 0
        assert capsys.readouterr().out == (
            f"source: {name}\nkey: example.org\n"
            "group 1: 10.0.0.5:2525\ngroup 2: mx2.example.org:25\n"
        )


def test_lookup_as_a_process(tmp_path: Path) -> None:
    path = write_config(tmp_path, routes="example.test  127.0.0.1:2526|[::1]:2526 mx.example\n")
    result = moxy("lookup", "-c", str(path), "user@example.test")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "source: file\nkey: example.test\ngroup 1: 127.0.0.1:2526|[::1]:2526\n"
        "group 2: mx.example:25\n",
        "",
    )


def test_lookup_without_a_route_says_which_keys_were_tried(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    result = moxy("lookup", "-c", str(path), "x@sub.unknown.example")
    assert (result.returncode, result.stdout) == (
        1,
        "no route for x@sub.unknown.example (keys tried: x@sub.unknown.example, "
        "sub.unknown.example, .unknown.example, .example, *)\n",
    )


def test_lookup_with_a_backend_down_is_one_line_and_status_3(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = redis_config(tmp_path, redis_server)
    redis_server.stop()
    result = moxy("lookup", "-c", str(config), "user@example.org")
    assert (result.returncode, result.stdout) == (3, "")
    assert re.fullmatch(
        r"moxy: route source redis failed for 'user@example\.org': Redis redis://127\.0\.0\.1:"
        r"\d+/0: .*Connection refused\.\n",
        result.stderr,
    )


def test_lookup_of_a_malformed_value_is_status_4(tmp_path: Path, redis_server: RedisServer) -> None:
    redis_server.client().set("moxy:route:example.org", "mx.example.org:0")
    result = moxy("lookup", "-c", str(redis_config(tmp_path, redis_server)), "user@example.org")
    assert (result.returncode, result.stderr) == (
        4,
        "moxy: bad route data in source redis for 'example.org': moxy:route:example.org = "
        "b'mx.example.org:0': 'mx.example.org:0': port 0 out of range 1-65535\n",
    )


@pytest.mark.parametrize(
    "target", ["", ".example.org", "user @example.org", "x@", "@", "@example.org",
               "x@@example.org"],
)
def test_lookup_refuses_what_is_no_address(
    tmp_path: Path, target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["lookup", "-c", str(write_config(tmp_path)), target]) == 2
    assert capsys.readouterr().err == (
        f"moxy: {target!r}: expected an address, a domain or a local part\n"
    )


# --- moxy destinations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        {"address": "192.0.2.2:25", "since": 1e300, "retry_in": 5, "probing": False,
         "failures": 1, "reason": "timeout"},
        {"address": "192.0.2.2:25", "since": 10**400, "retry_in": 5, "probing": False,
         "failures": 1, "reason": "timeout"},
        "[" * 100_000 + "]" * 100_000,
        '{"a": ' * 100_000 + "1" + "}" * 100_000,
    ],
    ids=["since-1e300", "since-400-digits", "nested-list", "nested-object"],
)
def test_destinations_list_with_a_malformed_answer_is_one_line(
    tmp_path: Path, answer: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server of another version, or something else on the socket: one line, status 3."""
    line = (answer if isinstance(answer, str) else json.dumps(answer)).encode() + b"\n"
    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # a unix socket path is short
        path = Path(short) / "control"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(1024)
                connection.sendall(line)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        config = write_config(tmp_path, f'[destinations]\ncontrol_socket = "{path}"\n')
        try:
            status = main(["destinations", "list", "-c", str(config)])
        finally:
            server.join(5)
            listener.close()
    out, err = capsys.readouterr()
    assert (status, out) == (3, "")
    [message] = err.splitlines()
    assert message.startswith("moxy: unexpected answer from ") and len(message) < 400, message
