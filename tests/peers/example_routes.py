"""The routes of deploy/ldap/example.ldif as a routes file, and recipients that try every key kind.

Each route source can be loaded with these same routes, so tests can ask every source the same
questions and expect the flat file's answers.
"""

from __future__ import annotations

from pathlib import Path

from moxy.lookup.base import RouteSource, SourceRouter
from moxy.lookup.file import FileSource

ROUTES = """\
# the routes of deploy/ldap/example.ldif
example.org        10.0.0.5:2525 mx2.example.org
shop.example       203.0.113.7:2600|198.51.100.9
.example.org       relay.example.org:587
boss@example.org   [2001:db8::25]
example.com        mail.example.com:2525
"""

# Most specific key first: address, domain, parents, nothing; odd case and a trailing dot.
RECIPIENTS = [
    "boss@example.org",
    "Boss@Example.ORG.",
    "anyone@example.org",
    "someone@sub.example.org",
    "x@deep.sub.example.org",
    "sales@shop.example",
    "info@example.com",
    "nobody@unknown.example",
    "*@example.org",
]


async def assert_answers_like_the_routes_file(source: RouteSource, routes_file: Path) -> None:
    """Every one of RECIPIENTS gets the same groups, through the same key, from `source` as from
    the flat file `routes_file` (which holds ROUTES)."""
    from_file = SourceRouter(FileSource.open(routes_file))
    from_source = SourceRouter(source)
    for recipient in RECIPIENTS:
        expected = await from_file.route(recipient)
        got = await from_source.route(recipient)
        assert (got and (got.groups, got.key)) == (expected and (expected.groups, expected.key))
        assert got is None or got.source == source.name
