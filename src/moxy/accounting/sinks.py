"""The accounting sinks by name: `build_sink` makes the one `[accounting] sinks` names, and
`check_sinks` is what `moxy serve` checks of them before it listens (each can be made, the
message log can be written by whoever writes it)."""

from __future__ import annotations

import importlib
import os
import stat
from collections.abc import Callable
from typing import Any, cast

from moxy.accounting.base import Sink
from moxy.accounting.filesink import FileSink
from moxy.accounting.settings import RedisSinkSettings, SyslogSinkSettings
from moxy.accounting.syslog import SyslogSink
from moxy.config import Config, ConfigError

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
    there. The GDBM and Redis sinks are only loaded, not made: they open their backends when
    made, and each worker process makes its own. Raises ConfigError naming the key."""
    for name in config.accounting.sinks:
        if name in _LAZY:
            _lazy_class(name, config)
    path = config.file_sink.path
    if "file" in config.accounting.sinks and path is not None:
        key = "log.file"
        if config.accounting.file is not None and config.accounting.file.path is not None:
            key = "accounting.file.path"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        if not create and not os.path.lexists(path):
            if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                raise ConfigError([f"{key}: cannot open {path} for appending: No such file or "
                                   "directory"], config.path)
            return
        try:
            try:
                fd, created = os.open(path, flags | os.O_EXCL, 0o640), True
            except FileExistsError:
                fd, created = os.open(path, flags, 0o640), False
            try:
                if user is not None and created:
                    os.fchown(fd, user[1], user[2])
                elif user is not None and not _writable_by(os.fstat(fd), user[1], user[2]):
                    raise ConfigError([f"{key}: {path} is not writable by user {user[0]}, who "
                                       "writes it once Moxy has given root up"], config.path)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ConfigError(
                [f"{key}: cannot open {path} for appending: {exc.strerror or exc}"], config.path
            ) from None


def _writable_by(st: os.stat_result, uid: int, gid: int) -> bool:
    """Can that user (with that one group, as Moxy becomes it) write the file?"""
    mode = st.st_mode
    if st.st_uid == uid:
        return bool(mode & stat.S_IWUSR)
    if st.st_gid == gid:
        return bool(mode & stat.S_IWGRP)
    return bool(mode & stat.S_IWOTH)
