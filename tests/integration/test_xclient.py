"""XCLIENT to destinations marked `;xclient` in their route, seen by a recording destination:
the original client's address (from a PROXY header here), HELO and protocol."""

from __future__ import annotations

import ssl
from collections.abc import Callable

from peers.client import SmtpClient
from peers.moxy import StartMoxy
from peers.recorder import Recorder
from peers.tls import TlsFiles

from .helpers import BODY, SENDER, open_session, send_one

MakeRecorder = Callable[..., Recorder]


async def test_trusted_destination_gets_the_clients_address_and_helo(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder(xclient="NAME ADDR PROTO HELO")
    server = await moxy(
        {"example.org": f"{upstream.address};xclient"},
        server={"listen_proxy": ["127.0.0.1:0"], "proxy_protocol_from": ["127.0.0.0/8"]},
    )
    async with await SmtpClient.connect(*server.bound[-1]) as client:
        await client.send(b"PROXY TCP6 2001:db8::9 2001:db8::25 40000 25\r\n")
        await client.greeting_and_ehlo("customer-client.test")
        _, final = await client.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    [conn] = upstream.connections
    assert conn.xclient == {
        "NAME": "[UNAVAILABLE]", "ADDR": "IPV6:2001:db8::9", "PROTO": "ESMTP",
        "HELO": "customer-client.test",
    }
    assert upstream.verbs(0)[:4] == ["EHLO", "XCLIENT", "EHLO", "MAIL"]
    assert len(upstream.delivered) == 1


async def test_xclient_is_sent_only_to_marked_destinations_that_advertise_it(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    unmarked = make_recorder(xclient="ADDR HELO", name="unmarked")
    silent = make_recorder(name="silent")  # marked, but no XCLIENT keyword
    server = await moxy({"example.org": unmarked, "example.net": f"{silent.address};xclient"})
    outcome = await send_one(server, ["a@example.org", "b@example.net"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert "XCLIENT" not in unmarked.verbs() and "XCLIENT" not in silent.verbs()


async def test_a_refused_xclient_fails_the_leg_instead_of_sending_as_moxy(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder({"xclient": "550 5.7.0 Insufficient authorization"}, xclient="ADDR")
    server = await moxy({"example.org": f"{upstream.address};xclient"})
    outcome = await send_one(server, ["u@example.org"])
    assert [(r.code, r.enhanced) for r in outcome.rcpt] == [(451, "4.4.1")], outcome.transcript
    assert "MAIL" not in upstream.verbs()


async def test_connections_with_a_clients_identity_are_not_pooled_for_other_clients(
    moxy: StartMoxy, make_recorder: MakeRecorder
) -> None:
    upstream = make_recorder(xclient="ADDR HELO")
    server = await moxy(
        {"example.org": f"{upstream.address};xclient"}, limits={"idle_upstreams": 2}
    )
    await send_one(server, ["u@example.org"])
    await send_one(server, ["u@example.org"])
    assert len(upstream.connections) == 2
    assert all(c.xclient["ADDR"] == "127.0.0.1" for c in upstream.connections)


def test_xclient_line_takes_the_offered_attributes_in_xtext() -> None:
    from moxy.leg_setup import ClientIdentity

    client = ClientIdentity("192.0.2.1", "a+b=c", "ESMTP")
    assert client.xclient_line("addr HELO") == b"XCLIENT ADDR=192.0.2.1 HELO=a+2Bb+3Dc\r\n"
    assert client.xclient_line("LOGIN DESTADDR") == b""
    assert ClientIdentity("::1").xclient_line("ADDR NAME") == \
        b"XCLIENT ADDR=IPV6:::1 NAME=[UNAVAILABLE]\r\n"


async def test_after_starttls_no_leg_opened_before_it_carries_the_clear_text_helo(
    moxy: StartMoxy, make_recorder: MakeRecorder, tls_files: TlsFiles
) -> None:
    """RFC 3207 §4.2: nothing learnt before TLS is kept. A leg opened in clear text had told
    its destination the HELO a man in the middle may have written; reused after STARTTLS, it
    vouched for that name for mail sent over TLS."""
    upstream = make_recorder(xclient="ADDR HELO")
    server = await moxy({"example.org": f"{upstream.address};xclient"},
                        tls={"cert": str(tls_files.cert), "key": str(tls_files.key)})
    async with await open_session(server, helo="clear-text.test") as client:
        assert (await client.command(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await client.command("RCPT TO:<u@example.org>")).code == 250
        assert (await client.command("RSET")).code == 250
        assert (await client.command("STARTTLS")).code == 220
        await client.start_tls(ssl.create_default_context(cafile=str(tls_files.ca)))
        assert (await client.command("EHLO over-tls.test")).code == 250
        _, final = await client.send_message(SENDER, ["u@example.org"], BODY)
        assert final is not None and final.code == 250, client.dump()
    assert [c.xclient.get("HELO") for c in upstream.connections] == [
        "clear-text.test", "over-tls.test"
    ]
    assert len(upstream.delivered) == 1
    assert "DATA" not in upstream.verbs(0)  # the message went over the new leg only
