"""Serving as an unprivileged user: started as root, Moxy binds its listeners (port 25), then
switches to `[server] user` and `group` before it accepts a connection.

The rule: as root, `user` is required when a listener is on a privileged port (< 1024), the
case of a production MX; without it Moxy refuses to start, in one line. On other ports (a
developer's `make run`, the tests) it serves as root with a warning. The other way to port 25,
a non-root user with CAP_NET_BIND_SERVICE, is deploy/systemd/moxy.service.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from collections.abc import Callable

import attrs

from moxy.config import Config

logger = logging.getLogger("moxy")

PRIVILEGED_PORTS = 1024


class PrivilegeError(Exception):
    """Moxy must not serve with these privileges; the message is one line for the operator."""


@attrs.frozen
class Switch:
    """The user and group to become once the listeners are bound."""

    user: str
    uid: int
    gid: int


def plan(config: Config) -> Switch | None:
    """The switch `moxy serve` makes after binding, None for none; raises `PrivilegeError`."""
    server = config.server
    privileged = sorted({a.port for a in server.listen if 0 < a.port < PRIVILEGED_PORTS})
    if not server.user:
        if os.geteuid() != 0:
            return None
        if privileged:
            raise PrivilegeError(
                f"refusing to serve as root on port {privileged[0]}: set [server] user (and "
                "group) to serve as that user once the port is bound, or run Moxy as a user "
                "with CAP_NET_BIND_SERVICE (deploy/systemd/moxy.service)"
            )
        logger.warning("serving as root; set [server] user to serve as an unprivileged user")
        return None
    try:
        entry = pwd.getpwnam(server.user)
        gid = grp.getgrnam(server.group).gr_gid if server.group else entry.pw_gid
    except KeyError as exc:  # removed since the configuration was loaded
        raise PrivilegeError(f"server.user/group: {exc.args[0]}") from None
    if os.geteuid() != 0:
        if os.geteuid() == entry.pw_uid and os.getegid() == gid:
            return None  # already that user (systemd's User= and Group=)
        raise PrivilegeError(
            f"server.user: cannot become {server.user!r}: Moxy was not started as root"
        )
    if entry.pw_uid == 0:
        raise PrivilegeError(f"server.user: {server.user!r} is root; name an unprivileged user")
    return Switch(server.user, entry.pw_uid, gid)


def drop(switch: Switch) -> None:
    """Become `switch`'s user and group for good (real, effective and saved ids), with no
    supplementary groups but that group. Raises OSError, naming the call and the user, when
    the system refuses (e.g. a capability bounding set without CAP_SETUID/CAP_SETGID)."""
    steps: tuple[tuple[str, Callable[[], None]], ...] = (
        ("setgroups", lambda: os.setgroups([switch.gid])),
        ("setgid", lambda: os.setgid(switch.gid)),
        ("setuid", lambda: os.setuid(switch.uid)),
    )
    for call, step in steps:
        try:
            step()
        except OSError as exc:
            raise OSError(exc.errno, f"server.user: cannot become user {switch.user!r}: "
                          f"{call} failed: {exc.strerror or exc}") from None
    try:
        os.setuid(0)
    except PermissionError:
        logger.info("serving as user %s (uid %d, gid %d)", switch.user, switch.uid, switch.gid)
        return
    raise OSError(0, f"could not give up root privileges for user {switch.user!r}")


def current_user() -> str:
    """The name of the user this process runs as (its uid when it has no name), for messages."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
