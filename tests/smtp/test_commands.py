"""The command grammar: one line in, one event (or the reply refusing it) out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy.smtp import commands
from moxy.smtp.commands import command_verb, parse_command, parse_verb, split_command
from moxy.smtp.events import (
    Data,
    Event,
    Hello,
    Help,
    Invalid,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Reset,
    Verify,
)


def refusal(event: Event) -> tuple[int, str | None]:
    assert isinstance(event, Invalid), event
    return event.reply.code, event.reply.enhanced


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (b"EHLO client.example", Hello("EHLO", "client.example")),
        (b"HELO client.example", Hello("HELO", "client.example")),
        (b"ehlo [192.0.2.1]", Hello("EHLO", "[192.0.2.1]")),
        (b"EHLO client.example ", Hello("EHLO", "client.example")),
        (b"MAIL FROM:<a@example.org>", MailFrom("a@example.org")),
        (b"mail from:<a@example.org>", MailFrom("a@example.org")),
        (b"MAIL FROM: <a@example.org>", MailFrom("a@example.org")),
        (b"MAIL FROM:<>", MailFrom("")),
        (b"MAIL FROM:<@relay.example,@b.example:a@example.org>", MailFrom("a@example.org")),
        (b'MAIL FROM:<"john doe"@example.org>', MailFrom('"john doe"@example.org')),
        (b'MAIL FROM:<"a\\"b"@example.org>', MailFrom('"a\\"b"@example.org')),
        (b"MAIL FROM:<a@[192.0.2.1]>", MailFrom("a@[192.0.2.1]")),
        (b"MAIL FROM:<a@[IPv6:2001:db8::1]>", MailFrom("a@[IPv6:2001:db8::1]")),
        (b"MAIL FROM:<a@example.org.>", MailFrom("a@example.org.")),
        (b"RCPT TO:<b@example.org>", RcptTo("b@example.org")),
        (b"RCPT TO: <b@example.org>", RcptTo("b@example.org")),
        (b"RCPT TO:<@hop.example:b@example.org>", RcptTo("b@example.org")),
        (b"RCPT TO:<postmaster>", RcptTo("postmaster")),
        (b"RCPT TO:<Postmaster>", RcptTo("Postmaster")),
        (b"DATA", Data()),
        (b"data", Data()),
        (b"RSET", Reset()),
        (b"NOOP", Noop()),
        (b"NOOP anything at all", Noop()),
        (b"QUIT", Quit()),
        (b"VRFY postmaster", Verify("postmaster")),
        (b"HELP", Help("")),
        (b"HELP MAIL", Help("MAIL")),
    ],
)
def test_valid_command_becomes_its_event(line: bytes, event: Event) -> None:
    assert parse_command(line) == event


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"", 500, "5.5.2"),
        (b"   ", 500, "5.5.2"),
        (b"FOO", 500, "5.5.2"),
        (b"MAILFROM:<a@b>", 500, "5.5.2"),
        (b"\x00MAIL FROM:<a@b>", 500, "5.5.2"),
        (b"EHLO", 501, "5.5.4"),
        (b"EHLO two words", 501, "5.5.4"),
        (b"HELO caf\xc3\xa9.example", 501, "5.5.4"),
        (b"EHLO a\x00b", 501, "5.5.4"),
        (b"MAIL", 501, "5.5.4"),
        (b"MAIL TO:<a@example.org>", 501, "5.5.4"),
        (b"MAIL FROM:", 501, "5.1.7"),
        (b"MAIL FROM:a@example.org", 501, "5.1.7"),
        (b"MAIL FROM:<a@example.org", 501, "5.1.7"),
        (b"MAIL FROM:  <a@example.org>", 501, "5.1.7"),
        (b"MAIL FROM:<a>", 501, "5.1.7"),
        (b"MAIL FROM:<@example.org>", 501, "5.1.7"),
        (b"MAIL FROM:<a@>", 501, "5.1.7"),
        (b"MAIL FROM:<a b@example.org>", 501, "5.1.7"),
        (b"MAIL FROM:<caf\xc3\xa9@example.org>", 553, "5.6.7"),
        (b"MAIL FROM:<caf\xe9@example.org> SMTPUTF8", 501, "5.1.7"),
        (b"MAIL FROM:<a@example.org> SMTPUTF8=yes", 555, "5.5.4"),
        (b"RCPT TO:<caf\xc3\xa9@example.org>", 553, "5.6.7"),
        (b"STARTTLS now", 501, "5.5.4"),
        (b"MAIL FROM:<a\x00@example.org>", 501, "5.1.7"),
        (b"MAIL FROM:<a@exa\rmple.org>", 501, "5.1.7"),
        (b"MAIL FROM:<a@-bad.example>", 501, "5.1.7"),
        (b"MAIL FROM:<postmaster>", 501, "5.1.7"),
        (b"RCPT", 501, "5.5.4"),
        (b"RCPT FROM:<a@example.org>", 501, "5.5.4"),
        (b"RCPT TO:<>", 501, "5.1.3"),
        (b"RCPT TO:b@example.org", 501, "5.1.3"),
        (b"RCPT TO:<b>", 501, "5.1.3"),
        (b"RCPT TO:<b@exa mple.org>", 501, "5.1.3"),
        (b"RCPT TO:<\xff@example.org>", 501, "5.1.3"),
        (b"RCPT TO:<b@example.org\x00>", 501, "5.1.3"),
        (b"DATA now", 501, "5.5.4"),
        (b"RSET please", 501, "5.5.4"),
        (b"QUIT now", 501, "5.5.4"),
        (b"VRFY", 501, "5.5.4"),
        (b"VRFY caf\xc3\xa9", 501, "5.5.4"),
        (b"NOOP \x07", 501, "5.5.4"),
        (b"HELP \x00", 501, "5.5.4"),
    ],
)
def test_malformed_command_is_refused_with_its_code(line: bytes, code: int, enhanced: str) -> None:
    assert refusal(parse_command(line)) == (code, enhanced)


@pytest.mark.parametrize(
    "verb",
    [
        "AUTH PLAIN",
        "BDAT 10 LAST",
        "ETRN example.org",
        "TURN",
        "EXPN list",
        "SEND FROM:<a@b>",
        "SOML FROM:<a@b>",
        "SAML FROM:<a@b>",
    ],
)
def test_known_but_unoffered_command_is_not_implemented(verb: str) -> None:
    assert refusal(parse_command(verb.encode())) == (502, "5.5.1")


@pytest.mark.parametrize(
    ("line", "params", "size", "body"),
    [
        (b"MAIL FROM:<a@b.example> SIZE=1000", {"SIZE": "1000"}, 1000, None),
        (b"MAIL FROM:<a@b.example> size=1000", {"SIZE": "1000"}, 1000, None),
        (b"MAIL FROM:<a@b.example> BODY=8BITMIME", {"BODY": "8BITMIME"}, None, "8BITMIME"),
        (b"MAIL FROM:<a@b.example> BODY=7bit", {"BODY": "7bit"}, None, "7BIT"),
        (b"MAIL FROM:<> SIZE=5  BODY=7BIT", {"SIZE": "5", "BODY": "7BIT"}, 5, "7BIT"),
    ],
)
def test_mail_parameters_are_parsed_with_upper_case_keys(
    line: bytes, params: dict[str, str], size: int | None, body: str | None
) -> None:
    event = parse_command(line, esmtp=True, max_message_size=10_000)
    assert isinstance(event, MailFrom)
    assert (dict(event.params), event.size, event.body) == (params, size, body)


@pytest.mark.parametrize(
    ("line", "code", "enhanced"),
    [
        (b"MAIL FROM:<a@b.example> SIZE=10001", 552, "5.3.4"),
        (b"MAIL FROM:<a@b.example> SIZE=ten", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example> SIZE", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME", 555, "5.5.4"),
        (b"MAIL FROM:<a@b.example> RET=HDRS", 555, "5.5.4"),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2", 555, "5.5.4"),
        (b"MAIL FROM:<a@b.example> =x", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example> SIZE=1=2", 501, "5.5.4"),
        (b"MAIL FROM:<a@b.example> BODY=\xff", 501, "5.5.4"),
        (b"RCPT TO:<a@b.example> NOTIFY=NEVER", 555, "5.5.4"),
    ],
)
def test_bad_parameter_is_refused(line: bytes, code: int, enhanced: str) -> None:
    assert refusal(parse_command(line, esmtp=True, max_message_size=10_000)) == (code, enhanced)


def test_mail_parameters_need_ehlo() -> None:
    assert refusal(parse_command(b"MAIL FROM:<a@b.example> SIZE=10", esmtp=False)) == (555, "5.5.4")


def test_size_parameter_is_unchecked_without_a_limit() -> None:
    event = parse_command(b"MAIL FROM:<a@b.example> SIZE=99999999999", max_message_size=0)
    assert isinstance(event, MailFrom) and event.size == 99999999999


@given(st.binary(max_size=600))
def test_any_line_gives_an_event_and_every_refusal_has_an_enhanced_code(line: bytes) -> None:
    event = parse_command(line, esmtp=True, max_message_size=1000)
    if isinstance(event, Invalid):
        assert event.reply.enhanced is not None
        assert 500 <= event.reply.code < 600


ATOMS = st.lists(st.text("abcXYZ09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=8),
                min_size=1, max_size=3).map(".".join)
LABELS = st.lists(st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,6}[a-zA-Z0-9]", fullmatch=True),
                  min_size=1, max_size=3).map(".".join)


@given(ATOMS, LABELS, st.lists(st.tuples(st.integers(min_value=0, max_value=40),
                                         st.characters(codec="ascii")), max_size=3))
def test_any_address_the_grammar_accepts_is_printable_ascii(
    local: str, domain: str, noise: list[tuple[int, str]]
) -> None:
    """A dot-atom address is accepted as it is; with any ASCII characters put into it, what is
    accepted is still printable and has no '<' in its domain, and a control character is
    never accepted."""
    address = f"{local}@{domain}"
    for at, char in noise:
        at %= len(address) + 1
        address = address[:at] + char + address[at:]
    event = parse_command(b"RCPT TO:<" + address.encode() + b">")
    if not noise:
        assert event == RcptTo(address=address, params={})
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
        assert isinstance(event, Invalid)
    if isinstance(event, RcptTo):
        assert all(0x20 <= ord(c) < 0x7F for c in event.address)
        assert "<" not in event.address.split("@")[-1]


@given(st.binary(max_size=40))
def test_split_verb_is_the_command_verb_for_ascii_verbs(line: bytes) -> None:
    verb, _ = split_command(line)
    if verb != "?":
        assert verb == command_verb(line)
    else:  # not ASCII: never one of the verbs with order rules
        assert command_verb(line) not in ("MAIL", "RCPT", "DATA", "STARTTLS")


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_a_line_split_before_splits_the_same(lines: list[bytes]) -> None:
    for line in lines + lines:  # the second time from memory
        assert split_command(line) == commands._split(line)


def test_the_split_lines_kept_are_bounded_and_short() -> None:
    for n in range(commands._SPLIT_MAX + 10):
        line = b"RCPT TO:<u%d@example.org>" % n
        assert split_command(line) == ("RCPT", f"TO:<u{n}@example.org>")
    assert len(commands._SPLIT) <= commands._SPLIT_MAX
    long = b"NOOP " + b"x" * 400
    assert split_command(long) == ("NOOP", "x" * 400)
    assert long not in commands._SPLIT


# MAIL and RCPT arguments already parsed are answered from a bounded cache (commands._SEEN_*):
# the answer must be the grammar's, whatever else decides it (EHLO, the size limit, SMTPUTF8).


def _uncached(verb: str, arg: str, esmtp: bool, max_size: int, smtputf8: bool) -> Event:
    arg = arg.strip(" ")
    if verb == "RCPT":
        return commands._parse_rcpt(arg, smtputf8)
    return commands._parse_mail(arg, esmtp, max_size)


_ARGS = st.sampled_from([
    "FROM:<a@b.example>", "FROM:<a@b.example> SIZE=100", "FROM:<> BODY=8BITMIME",
    "FROM:<d\xc3\xbc@b.example> SMTPUTF8", "TO:<a@b.example>", "TO:<d\xc3\xbc@b.example>",
    "TO:<postmaster>", " TO:<a@b.example> ", "TO:<a@b.example> NOTIFY=NEVER", "FROM:a@b",
]) | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60)


@given(
    st.lists(
        st.tuples(st.sampled_from(["MAIL", "RCPT"]), _ARGS, st.booleans(),
                  st.sampled_from([0, 50, 10_000]), st.booleans()),
        min_size=1, max_size=12,
    )
)
def test_a_cached_mail_or_rcpt_gets_the_grammars_answer(
    calls: list[tuple[str, str, bool, int, bool]],
) -> None:
    for call in calls + calls:  # again: now answered from the cache
        assert parse_verb(*call) == _uncached(*call), call


def test_the_cache_tells_apart_what_else_decides_the_answer() -> None:
    mail = "FROM:<a@b.example> SIZE=100"
    assert isinstance(parse_verb("MAIL", mail, True, 0, False), MailFrom)
    assert refusal(parse_verb("MAIL", mail, True, 50, False)) == (552, "5.3.4")  # too big
    assert refusal(parse_verb("MAIL", mail, False, 0, False)) == (555, "5.5.4")  # needs EHLO
    assert isinstance(parse_verb("MAIL", mail, True, 0, False), MailFrom)
    rcpt = "TO:<d\xc3\xbc@b.example>"  # UTF-8, as split_command decodes it (latin-1)
    assert refusal(parse_verb("RCPT", rcpt, False, 0, False)) == (553, "5.6.7")
    event = parse_verb("RCPT", rcpt, False, 0, True)
    assert isinstance(event, RcptTo) and event.address == "dü@b.example"
    assert refusal(parse_verb("RCPT", rcpt, False, 0, False)) == (553, "5.6.7")


def test_with_smtputf8_a_quoted_local_part_may_hold_utf8() -> None:
    """RFC 6531 §3.3 extends qtextSMTP with UTF-8 as it does atext (was 501 5.1.3)."""
    rcpt = '"\xc3\xbc x"@b.example'  # UTF-8, as split_command decodes it (latin-1)
    event = parse_verb("RCPT", f"TO:<{rcpt}>", True, 0, True)
    assert isinstance(event, RcptTo) and event.address == '"ü x"@b.example'
    assert refusal(parse_verb("RCPT", f"TO:<{rcpt}>", True, 0, False)) == (553, "5.6.7")
    # Controls stay out, quoted or not.
    assert refusal(parse_verb("RCPT", 'TO:<"\xc2\x85"@b.example>', True, 0, True))[0] == 501


def test_the_cache_is_bounded_and_keeps_no_long_argument() -> None:
    for n in range(3 * commands._SEEN_MAX):
        assert isinstance(parse_verb("RCPT", f"TO:<user{n}@b.example>", True, 0, False), RcptTo)
        assert len(commands._SEEN_RCPT) <= commands._SEEN_MAX
    long = "TO:<" + "a" * commands._SEEN_ARG + "@b.example>"
    assert isinstance(parse_verb("RCPT", long, True, 0, False), RcptTo)
    assert long not in commands._SEEN_RCPT
    same = "TO:<again@b.example>"
    assert parse_verb("RCPT", same, True, 0, False) is parse_verb("RCPT", same, True, 0, False)
