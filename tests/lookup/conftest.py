"""Fixtures for the route-source tests: a real redis-server and slapd (from tests/peers/), and
the example routes as a routes file."""

from __future__ import annotations

from pathlib import Path

import pytest

from peers.example_routes import ROUTES
from peers.redis_server import make_redis_server, redis_sentinel, redis_server
from peers.slapd import slapd, slapd_tls
from peers.tls import tls_files

__all__ = [
    "make_redis_server",
    "redis_sentinel",
    "redis_server",
    "routes_file",
    "slapd",
    "slapd_tls",
    "tls_files",
]


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    """tmp_path/routes holding the routes of deploy/ldap/example.ldif."""
    path = tmp_path / "routes"
    path.write_text(ROUTES)
    return path
