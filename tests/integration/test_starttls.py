"""STARTTLS from clients: smtplib, swaks and openssl s_client against a Moxy with `[tls]`.

Covers RFC 3207's reset after the handshake, the command-injection defence (CVE-2011-0411:
bytes pipelined after STARTTLS are never executed), `require`, a failed handshake ending that
session only, and the ESMTPS Received header and log field.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from typing import Any

import trio

from peers.client import READ_TIMEOUT, SmtpClient
from peers.moxy import RunningMoxy, StartMoxy
from peers.recorder import Recorder
from peers.sink import require_binary, swaks
from peers.tls import TlsFiles

from .helpers import BODY, SENDER, body_of, open_session, split_received

MakeRecorder = Callable[..., Recorder]
MESSAGE = b"From: <sender@client.test>\r\nSubject: tls\r\n\r\nover TLS\r\n"


def tls_section(files: TlsFiles, **extra: Any) -> dict[str, Any]:
    return {"cert": str(files.cert), "key": str(files.key), **extra}


def client_context(files: TlsFiles) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(files.ca))


def smtplib_over_tls(server: RunningMoxy, files: TlsFiles, rcpt: str) -> tuple[int, bytes]:
    """Blocking: EHLO, STARTTLS, EHLO, one message; returns the EHLO reply after TLS."""
    with smtplib.SMTP(server.host, server.port, "smtplib.test", timeout=READ_TIMEOUT) as smtp:
        smtp.starttls(context=client_context(files))
        code, text = smtp.ehlo()
        smtp.sendmail(SENDER, [rcpt], MESSAGE)
        return code, text


async def test_smtplib_starttls_delivers_with_an_esmtps_received_header_and_log_field(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls=tls_section(tls_files))
    async with await open_session(server) as client:
        ehlo = await client.command("EHLO client.test")
    assert "STARTTLS" in ehlo.lines
    code, text = await trio.to_thread.run_sync(
        smtplib_over_tls, server, tls_files, "user@example.org"
    )
    assert code == 250 and b"STARTTLS" not in text  # not offered twice
    [message] = upstream.delivered
    assert message.data is not None
    header, body = split_received(message.data)
    assert b"Received: from smtplib.test ([127.0.0.1])\r\n\t(using TLSv1.3 with cipher " in header
    assert b" with ESMTPS id " in header
    assert body == MESSAGE
    with trio.fail_after(5):
        while not any(" tls=TLSv1.3:" in line for line in server.log_lines()):
            await trio.sleep(0.02)


async def test_swaks_tls_delivers(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls=tls_section(tls_files))
    result = await trio.to_thread.run_sync(lambda: swaks(
        "--server", f"{server.host}:{server.port}", "--tls", "--helo", "swaks.test",
        "--from", SENDER, "--to", "user@example.org",
    ))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    [message] = upstream.delivered
    assert message.data is not None and b" with ESMTPS id " in split_received(message.data)[0]


async def _relay_with_injection(
    listener: trio.SocketListener, moxy_address: tuple[str, int], injected: bytes,
    plain_transcript: list[bytes],
) -> None:
    """Accept openssl s_client, do the clear-text part with Moxy ourselves (EHLO, then
    STARTTLS with `injected` commands in the same write), read the 220, then splice the two
    connections so that s_client does the TLS handshake with Moxy."""
    client = await listener.accept()
    upstream = await trio.open_tcp_stream(*moxy_address)
    reader = SmtpClient(upstream)
    await reader.greeting_and_ehlo("injector.test")
    await reader.send(b"STARTTLS\r\n" + injected)
    plain_transcript.append(str(await reader.reply()).encode())

    async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(sink)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe, client, upstream)
        nursery.start_soon(pipe, upstream, client)


async def test_commands_pipelined_after_starttls_are_discarded_openssl_s_client(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles, caplog: Any
) -> None:
    openssl = require_binary("openssl", "openssl")
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls=tls_section(tls_files))
    injected = b"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<user@example.org>\r\n"
    plain: list[bytes] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _relay_with_injection, listeners[0], (server.host, server.port), injected, plain
        )
        # After the handshake s_client sends EHLO and QUIT over TLS. Were the injected
        # commands executed, their replies (250, 250) would come before the EHLO reply.
        result = await trio.run_process(
            [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
             "-CAfile", str(tls_files.ca), "-verify_return_error", "-crlf", "-quiet",
             "-ign_eof"],
            stdin=b"EHLO after.test\nQUIT\n", capture_stdout=True, capture_stderr=True,
            check=False,
        )
        nursery.cancel_scope.cancel()
    await listeners[0].aclose()
    assert plain == [b"220 2.0.0 Ready to start TLS"]
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("250-mx.moxy.test greets after.test"), result.stdout
    assert lines[-1].startswith("221 "), result.stdout
    assert not any(line.startswith(("250 2.1.0", "250 2.1.5", "503")) for line in lines)
    assert upstream.connections == []  # the injected RCPT never reached a destination
    assert any(f"{len(injected)} bytes sent after STARTTLS" in r.getMessage()
               for r in caplog.records)


async def test_after_starttls_the_session_starts_again_and_a_second_starttls_is_refused(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls=tls_section(tls_files))
    async with await open_session(server) as client:
        assert (await client.command("MAIL FROM:<a@client.test>")).code == 250
        assert (await client.command("RSET")).code == 250
        assert (await client.command("STARTTLS")).code == 220
        await client.start_tls(client_context(tls_files))
        assert (await client.command("MAIL FROM:<a@client.test>")).code == 503  # EHLO first
        ehlo = await client.command("EHLO client.test")
        assert "STARTTLS" not in ehlo.lines
        assert (await client.command("STARTTLS")).code == 554
        _, final = await client.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    assert body_of(upstream.delivered[0]) == BODY


async def test_require_refuses_mail_before_starttls_with_530(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls=tls_section(tls_files, require=True))
    async with await open_session(server) as client:
        refused = await client.command(f"MAIL FROM:<{SENDER}>")
    assert (refused.code, refused.enhanced) == (530, "5.7.0")
    await trio.to_thread.run_sync(smtplib_over_tls, server, tls_files, "u@example.org")
    assert len(upstream.delivered) == 1


async def test_a_failed_handshake_ends_that_session_only(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "moxy")
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls=tls_section(tls_files))
    other = await open_session(server)  # a session in progress meanwhile
    async with await open_session(server) as client:
        assert (await client.command("STARTTLS")).code == 220
        await client.send(b"this is not a TLS ClientHello\r\n" * 4)
        await client.expect_closed()
    async with other:
        _, final = await other.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, other.dump()
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


def test_check_config_reports_a_missing_key_file(tmp_path: Any, tls_files: TlsFiles) -> None:
    import sys

    (tmp_path / "routes").write_text("example.org 127.0.0.1:25\n")
    config = tmp_path / "moxy.toml"
    config.write_text(
        f'[routes]\nfile = "routes"\n[tls]\ncert = "{tls_files.cert}"\nkey = "missing.key"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "moxy", "check-config", "-c", str(config)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"tls.key: {tmp_path / 'missing.key'}: no such file")
