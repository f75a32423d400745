"""[tls]: STARTTLS towards clients (certificate and key) and towards destinations; the ssl
contexts themselves are built in moxy.tls.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from moxy.config._parsing import _boolean, _choice, _key, _path, _text

TLS_VERSIONS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
UPSTREAM_TLS_MODES = ("none", "opportunistic", "required")


@attrs.frozen
class TlsSettings:
    """[tls]: STARTTLS for clients (cert/key) and towards destinations (upstream*)."""

    cert: Path | None = attrs.field(default=None, metadata=_key(_path))  # PEM, chain included
    key: Path | None = attrs.field(default=None, metadata=_key(_path))
    min_version: str = attrs.field(
        default="TLSv1.2",
        metadata=_key(_choice(*TLS_VERSIONS, aliases={v.lower(): v for v in TLS_VERSIONS})),
    )
    ciphers: str = attrs.field(default="", metadata=_key(_text))  # OpenSSL syntax, TLS <= 1.2
    require: bool = attrs.field(default=False, metadata=_key(_boolean))
    upstream: str = attrs.field(
        default="opportunistic", metadata=_key(_choice(*UPSTREAM_TLS_MODES))
    )
    upstream_verify: bool = attrs.field(default=False, metadata=_key(_boolean))
    upstream_ca_file: Path | None = attrs.field(default=None, metadata=_key(_path))


def _check_tls(tls: TlsSettings) -> list[tuple[str, str]]:
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        return [(missing, "required with tls.cert and tls.key: both or neither")]
    if tls.require and tls.cert is None:
        return [("require", "needs tls.cert and tls.key (STARTTLS cannot be offered without)")]
    return []
