"""`[tls]` turned into ssl contexts: files, versions and ciphers checked at start, each error
naming its key; and min_version enforced in a real handshake."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from moxy.config import Config, ConfigError, load_config
from moxy.tls import UpstreamTls, server_context
from peers.client import SmtpClient
from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.tls import TlsFiles


def config_with(tmp_path: Path, tls: str) -> Config:
    (tmp_path / "routes").write_text("example.org 127.0.0.1:25\n")
    (tmp_path / "moxy.toml").write_text(f'[routes]\nfile = "routes"\n[tls]\n{tls}')
    return load_config(tmp_path / "moxy.toml")


def tls_error(config: Config) -> str:
    with pytest.raises(ConfigError) as info:
        server_context(config)
        UpstreamTls.from_config(config)
    [error] = info.value.errors
    return error


def test_no_certificate_no_context(tmp_path: Path) -> None:
    assert server_context(config_with(tmp_path, "")) is None


def test_context_has_the_configured_floor(tmp_path: Path, tls_files: TlsFiles) -> None:
    config = config_with(
        tmp_path, f'cert = "{tls_files.cert}"\nkey = "{tls_files.key}"\nmin_version = "TLSv1.3"\n'
    )
    context = server_context(config)
    assert context is not None and context.minimum_version is ssl.TLSVersion.TLSv1_3


def test_a_key_that_does_not_match_is_an_error(tmp_path: Path, tls_files: TlsFiles) -> None:
    other = tmp_path / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-out", str(other)],
                   check=True, capture_output=True)
    config = config_with(tmp_path, f'cert = "{tls_files.cert}"\nkey = "{other}"\n')
    assert tls_error(config) == f"tls.key: {other} does not match tls.cert {tls_files.cert}"


@pytest.mark.parametrize("wrong", ["key", "cert"])
def test_a_file_of_the_wrong_kind_is_named(
    tmp_path: Path, tls_files: TlsFiles, wrong: str
) -> None:
    """OpenSSL's `[SSL] PEM lib (_ssl.c:3895)`, under tls.cert, for a key file that holds a
    certificate."""
    cert, key = (tls_files.cert, tls_files.cert) if wrong == "key" else (
        tls_files.key, tls_files.key)
    config = config_with(tmp_path, f'cert = "{cert}"\nkey = "{key}"\n')
    assert tls_error(config) == {"key": f"tls.key: {key}: not a PEM private key",
                                 "cert": f"tls.cert: {cert}: not a PEM certificate"}[wrong]


def test_an_encrypted_key_is_named_and_never_asks_for_a_passphrase(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    """OpenSSL asked for the passphrase on the terminal: check-config and serve hung there
    (and without a terminal the error blamed tls.cert)."""
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(tls_files.key), "-aes256", "-passout",
                    "pass:secret", "-out", str(encrypted)], check=True, capture_output=True)
    config = config_with(tmp_path, f'cert = "{tls_files.cert}"\nkey = "{encrypted}"\n')
    assert tls_error(config).startswith(f"tls.key: {encrypted} is encrypted: ")


def test_a_cipher_list_that_selects_nothing_is_an_error(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    config = config_with(
        tmp_path, f'cert = "{tls_files.cert}"\nkey = "{tls_files.key}"\nciphers = "NOPE"\n'
    )
    assert tls_error(config) == "tls.ciphers: no usable cipher in 'NOPE'"


def test_an_unreadable_ca_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    config = config_with(tmp_path, 'upstream_ca_file = "ca.pem"\n')
    assert tls_error(config).startswith(f"tls.upstream_ca_file: cannot use {tmp_path / 'ca.pem'}")


async def test_min_version_refuses_an_older_client(
    moxy: StartMoxy, make_recorder: Callable[..., Recorder], tls_files: TlsFiles
) -> None:
    server = await moxy(
        {"example.org": make_recorder()},
        tls={"cert": str(tls_files.cert), "key": str(tls_files.key), "min_version": "TLSv1.3"},
    )
    old = ssl.create_default_context(cafile=str(tls_files.ca))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    async with await SmtpClient.connect(server.host, server.port) as client:
        await client.greeting_and_ehlo()
        assert (await client.command("STARTTLS")).code == 220
        with pytest.raises(trio.BrokenResourceError):
            await client.start_tls(old)
