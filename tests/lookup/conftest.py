"""Fixtures for the route-source tests: the example routes as a routes file. (The real
redis-server and slapd come from tests/conftest.py.)"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from moxy.lookup.base import DestinationGroup, parse_destinations
from peers.example_routes import ROUTES


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    """tmp_path/routes holding the routes of deploy/ldap/example.ldif."""
    path = tmp_path / "routes"
    path.write_text(ROUTES)
    return path


@pytest.fixture
def parse_threads(monkeypatch: pytest.MonkeyPatch) -> Callable[[ModuleType], list[int]]:
    """parse_threads(module): the threads `module`'s parse_destinations is called in from now
    on (a source must parse in its worker thread, not on the event loop every session shares:
    a large value takes milliseconds)."""

    def watch(module: ModuleType) -> list[int]:
        threads: list[int] = []

        def parse(text: str) -> tuple[DestinationGroup, ...]:
            threads.append(threading.get_ident())
            return parse_destinations(text)

        monkeypatch.setattr(module, "parse_destinations", parse)
        return threads

    return watch
