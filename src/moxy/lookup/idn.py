"""Internationalized domain names in routing: keys hold A-labels (`xn--bcher-kva.example`).

A recipient's domain in UTF-8 (an SMTPUTF8 transaction, RFC 6531) is looked up by its A-label
form, and a routes-file (or `moxy route set`) key written in UTF-8 is stored in that form, so
either spelling reaches the same route. The conversion is IDNA 2008 with the UTS #46 mapping
(the `idna` package), which also folds case and width. The address itself goes upstream as
the client wrote it.
"""

from __future__ import annotations

import functools

import idna


@functools.lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str | None:
    """The A-label form of `domain` (ASCII passes through), or None when it is not a valid
    internationalized domain name."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None
