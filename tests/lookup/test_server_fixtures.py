"""The real-server fixtures fail, never skip, when their program is missing, and say how to
install it."""

from __future__ import annotations

from pathlib import Path

import pytest

import peers.redis_server
import peers.slapd


def test_a_missing_redis_server_fails_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers.redis_server, "REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install redis-server.*make test"):
        peers.redis_server.RedisServer(tmp_path)


def test_a_missing_slapd_fails_naming_the_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers.slapd, "SLAPD", "/nonexistent/slapd")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install slapd ldap-utils.*make test"):
        peers.slapd.Slapd(tmp_path)
