"""STARTTLS towards destinations: `[tls] upstream` and the per-route `;tls=`, `;verify`,
`;sni=` options, against recording destinations that offer STARTTLS, offer it and then fail
the handshake, or do not offer it."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.tls import TlsFiles
from peers.waiting import eventually

from .helpers import BODY, body_of, send_one

MakeRecorder = Callable[..., Recorder]


@pytest.fixture
def server_tls(tls_files: TlsFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    return context


async def test_opportunistic_uses_starttls_when_offered_and_says_ehlo_again(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext
) -> None:
    upstream = make_recorder(starttls=server_tls)
    server = await moxy({"example.org": upstream})  # the default: opportunistic
    outcome = await send_one(server, ["u@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert upstream.connections[0].tls == "TLSv1.3"
    assert upstream.verbs(0)[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
    assert body_of(upstream.delivered[0]) == BODY


async def test_opportunistic_falls_back_to_plain_text_only_when_starttls_is_not_offered(
    moxy: StartMoxy, make_recorder: MakeRecorder, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG, "moxy")  # the normal case: not worth a line per connection
    upstream = make_recorder()
    server = await moxy({"example.org": upstream}, tls={"upstream": "opportunistic"})
    outcome = await send_one(server, ["u@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert "STARTTLS" not in upstream.verbs()
    assert any("does not offer STARTTLS" in r.getMessage() for r in caplog.records)


async def test_a_failed_handshake_is_never_followed_by_plain_text(
    moxy: StartMoxy, make_recorder: MakeRecorder, caplog: Any
) -> None:
    broken = make_recorder(broken_tls=True)
    server = await moxy({"example.org": broken}, tls={"upstream": "opportunistic"})
    outcome = await send_one(server, ["u@example.org"])
    [rcpt] = outcome.rcpt
    assert (rcpt.code, rcpt.enhanced) == (451, "4.7.5"), outcome.transcript
    assert "MAIL" not in broken.verbs()
    assert broken.messages == []
    assert any("TLS handshake failed" in r.getMessage() for r in caplog.records)


async def test_required_refuses_recipients_of_a_destination_without_starttls_with_4xx(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext
) -> None:
    plain = make_recorder(name="plain")
    secure = make_recorder(starttls=server_tls, name="secure")
    server = await moxy(
        {"example.org": plain, "example.net": secure}, tls={"upstream": "required"}
    )
    outcome = await send_one(server, ["a@example.org", "b@example.net"])
    assert [(r.code, r.enhanced) for r in outcome.rcpt] == [(451, "4.7.5"), (250, "2.1.5")]
    assert outcome.final is not None and outcome.final.code == 250
    assert "MAIL" not in plain.verbs()
    assert [m.rcpts for m in secure.delivered] == [["b@example.net"]]


async def test_a_route_overrides_the_global_mode(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext
) -> None:
    offered_but_off = make_recorder(starttls=server_tls, name="off")
    wanted = make_recorder(starttls=server_tls, name="wanted")
    server = await moxy(
        {"example.org": offered_but_off, "example.net": f"{wanted.address};tls=required"},
        tls={"upstream": "none"},
    )
    await send_one(server, ["a@example.org"])
    await send_one(server, ["b@example.net"])
    assert "STARTTLS" not in offered_but_off.verbs()
    assert offered_but_off.connections[0].tls == ""
    assert wanted.connections[0].tls == "TLSv1.3"
    assert len(offered_but_off.delivered) == len(wanted.delivered) == 1


async def test_verification_against_a_ca_file_with_an_sni_name(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext,
    tls_files: TlsFiles, caplog: Any,
) -> None:
    upstream = make_recorder(starttls=server_tls)
    route = f"127.0.0.1:{upstream.port};tls=required;verify;sni=localhost"
    trusted = await moxy({"example.org": route}, tls={"upstream_ca_file": str(tls_files.ca)})
    outcome = await send_one(trusted, ["u@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    # The system store does not know the test CA: the handshake fails, and nothing is sent.
    untrusted = await moxy({"example.org": route})
    outcome = await send_one(untrusted, ["u@example.org"])
    assert [(r.code, r.enhanced) for r in outcome.rcpt] == [(451, "4.7.5")]
    assert any("certificate verify failed" in r.getMessage() for r in caplog.records)
    assert len(upstream.delivered) == 1
    assert "MAIL" not in upstream.verbs(len(upstream.connections) - 1)


async def test_a_reply_injected_after_the_220_to_starttls_fails_the_leg(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext, caplog: Any
) -> None:
    # The 220 and a forged reply in one write, as a man in the middle would append it: read
    # after the handshake it would pass for the destination's answer over TLS.
    caplog.set_level(logging.INFO, "moxy")
    upstream = make_recorder(
        {"starttls": "220 2.0.0 Ready to start TLS\r\n250 2.1.0 forged"}, starttls=server_tls
    )
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["u@example.org"])
    assert [(r.code, r.enhanced) for r in outcome.rcpt] == [(451, "4.7.5")], outcome.transcript
    assert "MAIL" not in upstream.verbs()
    assert any("response injection" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


async def test_a_refused_starttls_fails_the_leg_with_a_warning(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext, caplog: Any
) -> None:
    """Offered, then refused (454): never clear text after that, and a warning as for a
    failed handshake (configuration.md, [tls] upstream)."""
    upstream = make_recorder({"starttls": "454 4.7.0 TLS not available"}, starttls=server_tls)
    server = await moxy({"example.org": upstream})
    outcome = await send_one(server, ["u@example.org"])
    assert [(r.code, r.enhanced) for r in outcome.rcpt] == [(451, "4.7.5")], outcome.transcript
    assert "MAIL" not in upstream.verbs()
    assert any("STARTTLS refused" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


async def test_a_leg_line_of_the_message_log_says_how_its_destination_was_reached(
    moxy: StartMoxy, make_recorder: MakeRecorder, server_tls: ssl.SSLContext
) -> None:
    """A leg's `tls` is its connection to the destination (STARTTLS there, or `-`); the
    message's is the client's (here plain text)."""
    secure = make_recorder(starttls=server_tls, name="secure")
    plain = make_recorder(name="plain")
    server = await moxy({"example.org": secure, "example.net": plain})
    for rcpt in ("u@example.org", "u@example.net"):
        outcome = await send_one(server, [rcpt])
        assert outcome.final is not None and outcome.final.code == 250, outcome.transcript

    def legs_and_messages() -> list[str]:
        return [line for line in server.log_lines() if " leg " in line or " message " in line]

    await eventually(lambda: len(legs_and_messages()) == 4, what="four log lines")
    tls = [(line.split()[1], line.split(" tls=")[1].split()[0]) for line in legs_and_messages()]
    assert tls[0][0] == "leg" and tls[0][1].startswith("TLSv1.3:TLS_"), tls
    assert tls[1:] == [("message", "-"), ("leg", "-"), ("message", "-")]
