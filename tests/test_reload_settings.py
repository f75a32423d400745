"""What a reload applies and what waits for the next restart (moxy.reload.RESTART_ONLY)."""

from __future__ import annotations

from pathlib import Path

from moxy.config import Config, load_config
from moxy.reload import RESTART_ONLY, keep_restart_only, restart_only_changes

FIRST = """\
[server]
listen = ["127.0.0.1:2525"]
banner = "ESMTP first"
workers = 2
[routes]
file = "routes"
[accounting]
sinks = ["file"]
"""

SECOND = """\
[server]
listen = ["127.0.0.1:2600"]
listen_proxy = ["127.0.0.1:2601"]
proxy_protocol_from = ["127.0.0.1"]
banner = "ESMTP second"
workers = 4
[routes]
file = "routes"
[limits]
recipients = 7
[accounting]
sinks = ["file"]
[accounting.file]
format = "json"
"""


def config(tmp_path: Path, name: str, text: str) -> Config:
    (tmp_path / "routes").write_text("example.org 127.0.0.1:2526\n")
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def test_every_restart_only_change_is_named(tmp_path: Path) -> None:
    first, second = config(tmp_path, "a.toml", FIRST), config(tmp_path, "b.toml", SECOND)
    assert restart_only_changes(first, second) == [
        "server.listen", "server.listen_proxy", "server.workers", "[accounting]",
    ]
    assert restart_only_changes(first, first) == []


def test_a_reload_keeps_what_waits_for_a_restart_and_takes_the_rest(tmp_path: Path) -> None:
    first, second = config(tmp_path, "a.toml", FIRST), config(tmp_path, "b.toml", SECOND)
    in_force = keep_restart_only(first, second)
    assert restart_only_changes(first, in_force) == []
    for section, key in RESTART_ONLY:
        if key is None:
            assert getattr(in_force, section) == getattr(first, section)
        else:
            assert getattr(getattr(in_force, section), key) == getattr(getattr(first, section), key)
    # Everything else is the new file's.
    assert in_force.server.banner == "ESMTP second"
    assert in_force.server.proxy_protocol_from == second.server.proxy_protocol_from
    assert in_force.limits == second.limits
    assert in_force.path == second.path
    # And a second reload of the same file still finds the same settings waiting.
    assert restart_only_changes(in_force, second) == restart_only_changes(first, second)
