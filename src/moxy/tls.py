"""TLS contexts from `[tls]`: the server side of STARTTLS and the client side towards destinations.

`server_context` is the one place the listener's context is made, so a configuration reload can
call it again; both raise `ConfigError` naming the key when a file cannot be used, which
`moxy check-config` and `moxy serve` report before anything listens.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import attrs

from moxy.config import Config, ConfigError, TlsSettings

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


def _error(config: Config, key: str, message: str) -> ConfigError:
    return ConfigError([f"tls.{key}: {message}"], config.path)


def server_context(config: Config) -> ssl.SSLContext | None:
    """The context STARTTLS wraps client connections in; None when no certificate is set."""
    tls = config.tls
    if tls.cert is None or tls.key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if tls.min_version in ("TLSv1", "TLSv1.1"):
        # OpenSSL 3's default security level refuses these protocols outright.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.minimum_version = _VERSIONS[tls.min_version]
    # No session tickets: they would need key rotation across workers; no renegotiation.
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
    if tls.ciphers:
        try:
            context.set_ciphers(tls.ciphers)
        except ssl.SSLError:
            raise _error(config, "ciphers", f"no usable cipher in {tls.ciphers!r}") from None
    for key, path in (("cert", tls.cert), ("key", tls.key)):
        if not path.is_file():
            raise _error(config, key, f"{path}: no such file")
    try:
        # No passphrase: OpenSSL would otherwise ask for one on the terminal (a start that
        # hangs); an encrypted key fails instead, and is named below.
        context.load_cert_chain(tls.cert, tls.key, password=b"")
    except OSError as exc:  # ssl.SSLError is an OSError: wrong format, key does not match
        raise _cert_chain_error(config, tls.cert, tls.key, exc) from None
    return context


def _cert_chain_error(config: Config, cert: Path, key: Path, exc: OSError) -> ConfigError:
    """Which file of the pair is wrong, in words: OpenSSL says `[SSL] PEM lib (_ssl.c:3895)`
    for a key file that holds no key as for a certificate file that holds no certificate."""
    if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        return _error(config, "key", f"{key} does not match tls.cert {cert}")
    try:
        encrypted = b"ENCRYPTED" in key.read_bytes()
    except OSError:
        encrypted = False
    if encrypted:
        return _error(config, "key", f"{key} is encrypted: Moxy needs the key without a "
                                     "passphrase (e.g. `openssl pkey -in KEY -out KEY.plain`)")
    for name, path in (("cert", cert), ("key", key)):
        try:
            path.read_bytes()
        except OSError as error:
            return _error(config, name, f"cannot read {path}: {error.strerror or error}")
    if isinstance(exc, ssl.SSLError):
        try:  # a certificate file holds at least one certificate
            ssl.create_default_context().load_verify_locations(cadata=cert.read_text("ascii"))
        except (ssl.SSLError, ValueError):  # ValueError: not ASCII
            return _error(config, "cert", f"{cert}: not a PEM certificate")
        if getattr(exc, "library", None) == "SSL" and exc.reason is None:  # "PEM lib"
            return _error(config, "key", f"{key}: not a PEM private key")
    reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
    reason = re.sub(r" \(_ssl\.c:\d+\)$", "", reason)
    return _error(config, "cert", f"cannot use {cert} with {key}: {reason}")


@attrs.frozen
class UpstreamTls:
    """How legs use STARTTLS: the global mode and the client contexts (with and without
    certificate verification; a route may ask for either)."""

    mode: str = "none"
    verify: bool = False
    verifying: ssl.SSLContext | None = attrs.field(default=None, eq=False)
    trusting: ssl.SSLContext | None = attrs.field(default=None, eq=False)

    @classmethod
    def from_config(cls, config: Config) -> UpstreamTls:
        tls: TlsSettings = config.tls
        try:
            verifying = ssl.create_default_context(
                cafile=str(tls.upstream_ca_file) if tls.upstream_ca_file else None
            )
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise _error(config, "upstream_ca_file", f"cannot use {tls.upstream_ca_file}: "
                         f"{reason}") from None
        # Opportunistic TLS without verification still beats clear text against a passive
        # eavesdropper (RFC 7435); most MX certificates would not verify anyway.
        trusting = ssl.create_default_context()
        trusting.check_hostname = False
        trusting.verify_mode = ssl.CERT_NONE
        return cls(tls.upstream, tls.upstream_verify, verifying, trusting)

    def context(self, verify: bool | None) -> ssl.SSLContext:
        ctx = self.verifying if (self.verify if verify is None else verify) else self.trusting
        if ctx is None:
            ctx = ssl.create_default_context()
        return ctx


def describe(stream: object) -> str:
    """"TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)", as Postfix writes it in
    Received headers; "" for a stream that is not TLS."""
    version = getattr(stream, "version", None)
    cipher = getattr(stream, "cipher", None)
    if not callable(version) or not callable(cipher):
        return ""
    info = cipher()
    if info is None:
        return ""
    name, _, bits = info
    return f"{version()} with cipher {name} ({bits}/{bits} bits)"


@attrs.frozen
class TlsContexts:
    """The TLS of one configuration, its files read: STARTTLS for clients (None without a
    certificate) and towards destinations. Made where the files can be read: before Moxy gives
    root up at the start (a key only root may read, as Let's Encrypt's), as Moxy's user at a
    reload."""

    server: ssl.SSLContext | None = attrs.field(eq=False)
    upstream: UpstreamTls

    @classmethod
    def read(cls, config: Config) -> TlsContexts:
        """Raises ConfigError naming the key of a file that cannot be used."""
        return cls(server_context(config), UpstreamTls.from_config(config))
