"""Fixtures for the route-source tests: the example routes as a routes file. (The real
redis-server and slapd come from tests/conftest.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from peers.example_routes import ROUTES


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    """tmp_path/routes holding the routes of deploy/ldap/example.ldif."""
    path = tmp_path / "routes"
    path.write_text(ROUTES)
    return path
