"""The Received header's `with` keyword (RFC 3848, RFC 6531 §3.7.3), case by case."""

from __future__ import annotations

import pytest

from moxy.trace import with_protocol


@pytest.mark.parametrize(
    ("greeted", "smtputf8", "tls", "keyword"),
    [
        ("SMTP", False, False, "SMTP"),  # after HELO: no ESMTP keyword, whatever else
        ("SMTP", True, True, "SMTP"),
        ("ESMTP", False, False, "ESMTP"),
        ("ESMTP", False, True, "ESMTPS"),
        ("ESMTP", True, False, "UTF8SMTP"),
        ("ESMTP", True, True, "UTF8SMTPS"),
    ],
)
def test_with_keyword(greeted: str, smtputf8: bool, tls: bool, keyword: str) -> None:
    assert with_protocol(greeted, smtputf8, tls) == keyword
