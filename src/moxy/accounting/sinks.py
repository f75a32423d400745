"""The accounting sinks by name: `build_sink` makes the one `[accounting] sinks` names, and
`check_sinks` is what `moxy serve` checks of them before it listens (each can be made, the
message log and the GDBM log can be written by whoever writes them)."""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from moxy.accounting.base import Sink
from moxy.accounting.filesink import FileSink
from moxy.accounting.settings import RedisSinkSettings, SyslogSinkSettings
from moxy.accounting.syslog import SyslogSink
from moxy.config import Config, ConfigError
from moxy.privileges import current_user

# Sinks whose modules import client libraries: loaded only when configured.
_LAZY = {"gdbm": ("moxy.accounting.gdbm", "GdbmSink"), "redis": ("moxy.accounting.redis",
                                                                   "RedisSink")}


def build_sink(name: str, config: Config) -> Sink:
    """The sink `name` of `[accounting] sinks`, made from its `[accounting.<name>]` table.

    Raises ConfigError when it cannot be made (a sink missing from this installation)."""
    if name == "file":
        return FileSink(config.file_sink)
    if name == "syslog":
        return SyslogSink(config.accounting.syslog or SyslogSinkSettings())
    if name not in _LAZY:
        raise ConfigError([f"accounting.sinks: unknown sink {name!r}"], config.path)
    settings = getattr(config.accounting, name)
    if settings is None and name == "redis":  # every key has a default: the table may be absent
        settings = RedisSinkSettings()
    return _lazy_class(name, config)(settings)


def _lazy_class(name: str, config: Config) -> Callable[[Any], Sink]:
    """The class of a sink whose module is imported only when it is configured."""
    module_name, class_name = _LAZY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name == module_name:
            raise ConfigError(
                [f"accounting.sinks: the {name!r} sink is not part of this Moxy installation"],
                config.path,
            ) from None
        raise ConfigError(
            [f"accounting.sinks: the {name!r} sink cannot be loaded: {exc}"], config.path
        ) from None
    return cast(Callable[[Any], Sink], getattr(module, class_name))


def check_sinks(
    config: Config, user: tuple[str, int, int] | None = None, *, create: bool = True
) -> None:
    """What `moxy serve` checks before it listens: every sink can be made, and the message log
    can be opened (a typo in its path is a configuration error, not a silent loss of events).
    With `user` (name, uid, gid: the `[server] user` root will become), the log must be
    writable by that user, who writes it: one this check creates is given to the user (made
    by root, it was written by nobody: every event of a first start lost).

    Without `create` (`moxy check-config`), a missing log is not made: its directory must be
    there, and writable by whoever writes it. With `user`, that user must also be able to
    create files in the directory: after logrotate's rename, Moxy (as that user by then)
    creates the log afresh. The GDBM and Redis sinks are only loaded, not made: they open their
    backends when made, and each worker process makes its own; the GDBM log's file is checked
    as the message log's is (`_check_gdbm_log`). Raises ConfigError naming the key."""
    for name in config.accounting.sinks:
        if name in _LAZY:
            _lazy_class(name, config)
    gdbm = config.accounting.gdbm
    if "gdbm" in config.accounting.sinks and gdbm is not None:
        _check_gdbm_log(config, gdbm.path, user)
    path = config.file_sink.path
    if "file" in config.accounting.sinks and path is not None:
        key = "log.file"
        if config.accounting.file is not None and config.accounting.file.path is not None:
            key = "accounting.file.path"
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.lexists(directory):
            raise ConfigError([f"{key}: directory {directory} does not exist"], config.path)
        if create or os.path.lexists(path):
            _check_log_file(config, key, path, user)
        _check_log_directory(config, key, path, user)


def _check_log_file(
    config: Config, key: str, path: Path, user: tuple[str, int, int] | None
) -> None:
    """The log can be opened for appending (made if missing), and written by `user`. Opened
    without waiting: a FIFO with no reader yet (ENXIO) would otherwise block the start for
    good; the sink itself copes with one."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            fd, created = os.open(path, flags | os.O_EXCL, 0o640), True
        except FileExistsError:
            try:
                fd, created = os.open(path, flags, 0o640), False
            except OSError as exc:
                if exc.errno == errno.ENXIO and stat.S_ISFIFO(os.stat(path).st_mode):
                    return  # a FIFO whose reader is not there yet
                raise
        try:
            if user is not None and created:
                _give(config, key, path, fd, user)
            elif user is not None and not _writable_by(os.fstat(fd), user[1], user[2]):
                raise ConfigError([f"{key}: {path} is not writable by user {user[0]}, who "
                                   "writes it once Moxy has given root up"], config.path)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ConfigError(
            [f"{key}: cannot open {path} for appending: {exc.strerror or exc}"], config.path
        ) from None


def _check_log_directory(
    config: Config, key: str, path: Path, user: tuple[str, int, int] | None
) -> None:
    """Whoever writes the log can create it in its directory: `user` (reopening after a
    rotation creates it afresh), or without one this process if the log is not there yet."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError:
        return  # opening the log said why already
    if user is not None:
        if not _writable_by(st, user[1], user[2], directory=True):
            raise ConfigError([f"{key}: directory {directory} is not writable by user {user[0]}: "
                               f"Moxy could not create {os.path.basename(path)} afresh after a "
                               "log rotation"], config.path)
    elif not os.path.lexists(path) and not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError([f"{key}: directory {directory} is not writable by user "
                           f"{current_user()}, who creates {os.path.basename(path)}"], config.path)


def _check_gdbm_log(config: Config, path: Path, user: tuple[str, int, int] | None) -> None:
    """The GDBM log's file, if there, is GDBM and writable by whoever writes it (`user`, else
    this process); if not there yet, that one can create it in its directory. Not created
    here: the sink makes it at its first flush, as the user who then writes it."""
    import dbm.gnu

    from moxy.lookup.gdbm import reason

    key = "accounting.gdbm.path"
    directory = os.path.dirname(os.path.abspath(path))
    who = current_user() if user is None else user[0]
    if not os.path.isdir(directory):
        raise ConfigError([f"{key}: directory {directory} does not exist"], config.path)
    if not os.path.lexists(path):
        st = os.stat(directory)
        if not (os.access(directory, os.W_OK | os.X_OK) if user is None
                else _writable_by(st, user[1], user[2], directory=True)):
            raise ConfigError([f"{key}: directory {directory} is not writable by user {who}, "
                               f"who creates {os.path.basename(path)}"], config.path)
        return
    if not os.path.isfile(path):
        raise ConfigError([f"{key}: {path} is not a file"], config.path)
    try:
        with dbm.gnu.open(str(path), "ru"):  # no lock: a running Moxy may be writing it
            pass
    except (dbm.gnu.error, OSError) as exc:
        raise ConfigError([f"{key}: {path} is not a GDBM file Moxy can read: {reason(exc)}"],
                          config.path) from None
    if not (os.access(path, os.W_OK) if user is None
            else _writable_by(os.stat(path), user[1], user[2])):
        raise ConfigError([f"{key}: {path} is not writable by user {who}, who writes it"],
                          config.path)


def _give(config: Config, key: str, path: Path, fd: int, user: tuple[str, int, int]) -> None:
    """Give the log just created to `user`; if that fails, remove it again (left as root's, it
    would stop the next start)."""
    try:
        os.fchown(fd, user[1], user[2])
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ConfigError([f"{key}: cannot give {path} to user {user[0]}: "
                           f"{exc.strerror or exc}"], config.path) from None


def _writable_by(st: os.stat_result, uid: int, gid: int, *, directory: bool = False) -> bool:
    """Can that user (with that one group, as Moxy becomes it) write the file, or create files
    in the directory?"""
    mode = st.st_mode
    if st.st_uid == uid:
        bits = stat.S_IWUSR | (stat.S_IXUSR if directory else 0)
    elif st.st_gid == gid:
        bits = stat.S_IWGRP | (stat.S_IXGRP if directory else 0)
    else:
        bits = stat.S_IWOTH | (stat.S_IXOTH if directory else 0)
    return mode & bits == bits
