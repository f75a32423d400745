"""The SMTP command grammar: one command line (without its CRLF) in, one event out.

Pure syntax: whether a command may come *now* is the state machine's business (server.py).
Anything malformed becomes an `Invalid` event carrying the reply; nothing here raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

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
    StartTls,
    Verify,
)
from moxy.smtp.replies import Reply

VERBS: Final = frozenset(
    {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "STARTTLS"}
)
# Verbs with a meaning in some SMTP extension or old RFC that Moxy does not offer: 502, not 500,
# tells the client the command exists but is not available here.
UNIMPLEMENTED: Final = frozenset(
    {"AUTH", "BDAT", "ETRN", "TURN", "ATRN", "EXPN", "SEND", "SOML", "SAML"}
)


def _invalid(code: int, enhanced: str, text: str) -> Invalid:
    return Invalid(Reply.make(code, enhanced, text))


UNKNOWN_COMMAND: Final = _invalid(500, "5.5.2", "Error: command not recognized")
EMPTY_COMMAND: Final = _invalid(500, "5.5.2", "Error: bad syntax")
NOT_IMPLEMENTED: Final = _invalid(502, "5.5.1", "Error: command not implemented")
BAD_CHARACTER: Final = _invalid(501, "5.5.4", "Syntax error: invalid character in argument")
BAD_SENDER: Final = _invalid(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT: Final = _invalid(501, "5.1.3", "Bad recipient address syntax")
BAD_PARAMETER: Final = _invalid(501, "5.5.4", "Bad parameter syntax")
BAD_SIZE: Final = _invalid(501, "5.5.4", "Bad SIZE parameter syntax")
BAD_BODY: Final = _invalid(555, "5.5.4", "Unsupported BODY value")
PARAMS_NEED_EHLO: Final = _invalid(555, "5.5.4", "Error: parameters require EHLO")
SIZE_TOO_BIG: Final = _invalid(552, "5.3.4", "Message size exceeds fixed limit")
# RFC 6531 §3.5 / RFC 6533: a UTF-8 address in a transaction without SMTPUTF8.
NEEDS_SMTPUTF8: Final = _invalid(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
# Events without fields: one value serves every such command.
DATA: Final = Data()
NOOP: Final = Noop()
RESET: Final = Reset()
QUIT: Final = Quit()
STARTTLS: Final = StartTls()

# RFC 5321 §4.1.2, printable ASCII only: without SMTPUTF8 a non-ASCII or control byte in a path
# is a syntax error, and refusing it here keeps it out of upstream commands and Received headers.
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING: Final = rf"(?:{_ATEXT}|\.)+"  # lenient about dot placement, like most MTAs
_QUOTED: Final = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN: Final = rf"{_LABEL}(?:\.{_LABEL})*\.?"  # a trailing dot is harmless; routing ignores it
_LITERAL: Final = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX: Final = rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})"
_SOURCE_ROUTE: Final = rf"@{_DOMAIN}(?:,@{_DOMAIN})*:"  # obsolete; must be accepted and ignored
_PATH_AND_PARAMS: Final = re.compile(
    rf"<(?:{_SOURCE_ROUTE})?(?P<mailbox>{_MAILBOX})>(?: +(?P<params>.*))?", re.ASCII
)
# RFC 6531 §3.3: with SMTPUTF8, atext and domain labels also take UTF-8 characters (not the
# C1 controls); what goes upstream is exactly the UTF-8 the client sent.
_U: Final = "\u00a0-\U0010ffff"
_UTF8_ATEXT: Final = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U}-]"
_UTF8_LABEL: Final = rf"[A-Za-z0-9{_U}](?:[A-Za-z0-9{_U}-]*[A-Za-z0-9{_U}])?"
_UTF8_DOMAIN: Final = rf"{_UTF8_LABEL}(?:\.{_UTF8_LABEL})*\.?"
# qtextSMTP takes UTF-8 too (RFC 6531 §3.3: `"ü x"@example.org`).
_UTF8_QUOTED: Final = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
_UTF8_MAILBOX: Final = (
    rf"(?:(?:{_UTF8_ATEXT}|\.)+|{_UTF8_QUOTED})@(?:{_UTF8_DOMAIN}|{_LITERAL})"
)
_UTF8_PATH_AND_PARAMS: Final = re.compile(
    rf"<(?:{_SOURCE_ROUTE})?(?P<mailbox>{_UTF8_MAILBOX})>(?: +(?P<params>[\x20-\x7e]*))?"
)
_NULL_PATH_AND_PARAMS: Final = re.compile(r"<>(?: +(?P<params>.*))?")
_POSTMASTER_AND_PARAMS: Final = re.compile(r"<(?P<mailbox>postmaster)>(?: +(?P<params>.*))?", re.I)
_PARAM: Final = re.compile(
    r"(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?"
)
_HOST: Final = re.compile(r"[\x21-\x7e]+")
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]*")


def command_verb(line: bytes) -> str:
    """The upper-cased verb of a command line, "" when it has none."""
    return line.strip(b" \t").partition(b" ")[0].decode("ascii", "replace").upper()


# Command lines already split, by their bytes: clients say the same DATA, RSET and QUIT, and
# the same MAIL and RCPT lines, again and again; splitting is about 1,400 instructions (strip,
# decode, partition, upper). Bounded: emptied when full, lines up to _SPLIT_LINE bytes.
_SPLIT: Final[dict[bytes, tuple[str, str]]] = {}
_SPLIT_MAX: Final = 1024
_SPLIT_LINE: Final = 300


def split_command(line: bytes) -> tuple[str, str]:
    """The verb (upper-cased; "?" when not ASCII) and the rest of a command line.

    The verb is what `command_verb` gives for every ASCII verb, so the state machine can check
    the command order on it and then parse the same split line (`parse_verb`)."""
    split = _SPLIT.get(line)
    if split is None:
        split = _split(line)
        if len(line) <= _SPLIT_LINE:
            if len(_SPLIT) >= _SPLIT_MAX:
                _SPLIT.clear()
            _SPLIT[line] = split
    return split


def _split(line: bytes) -> tuple[str, str]:
    # latin-1 maps every byte to one character, so decoding cannot fail and the grammar
    # regexes (printable ASCII only) reject whatever is not ASCII.
    verb, _, arg = line.strip(b" \t").decode("latin-1").partition(" ")
    return (verb.upper() if verb.isascii() else "?"), arg  # "ß".upper() is "SS"


def parse_command(
    line: bytes, *, esmtp: bool = True, max_message_size: int = 0, smtputf8: bool = False
) -> Event:
    """Turn one command line (CRLF removed) into an event, or an `Invalid` with its reply.

    `esmtp` says whether the client greeted with EHLO (MAIL parameters need it);
    `max_message_size` (0: no limit) is checked against a MAIL SIZE= parameter; `smtputf8`
    says whether the current transaction's MAIL carried SMTPUTF8 (UTF-8 in RCPT addresses).
    """
    verb, arg = split_command(line)
    return parse_verb(verb, arg, esmtp, max_message_size, smtputf8)


# MAIL and RCPT arguments already parsed, by their text (as split_command gave it), with what
# else decides the answer: an MX hears the same recipients (and many of the same senders) again
# and again, and the address grammar's regex is most of a command's parsing cost. Events are
# values, so sessions can share them. Bounded: emptied when full (every sender new, say).
_SEEN_RCPT: Final[dict[str, tuple[bool, Event]]] = {}  # arg -> (smtputf8, event)
_SEEN_MAIL: Final[dict[str, tuple[bool, int, Event]]] = {}  # arg -> (esmtp, max size, event)
_SEEN_MAX: Final = 1024
_SEEN_ARG: Final = 300  # characters: longer arguments are not kept


def parse_verb(verb: str, arg: str, esmtp: bool, max_message_size: int, smtputf8: bool) -> Event:
    """`parse_command` on a line already split by `split_command`."""
    # The commands of every transaction first.
    if verb == "RCPT":
        rcpt = _SEEN_RCPT.get(arg)
        if rcpt is not None and rcpt[0] == smtputf8:
            return rcpt[1]
        event = _parse_rcpt(arg.strip(" "), smtputf8)
        if len(arg) <= _SEEN_ARG:
            if len(_SEEN_RCPT) >= _SEEN_MAX:
                _SEEN_RCPT.clear()
            _SEEN_RCPT[arg] = (smtputf8, event)
        return event
    if verb == "MAIL":
        mail = _SEEN_MAIL.get(arg)
        if mail is not None and mail[0] == esmtp and mail[1] == max_message_size:
            return mail[2]
        event = _parse_mail(arg.strip(" "), esmtp, max_message_size)
        if len(arg) <= _SEEN_ARG:
            if len(_SEEN_MAIL) >= _SEEN_MAX:
                _SEEN_MAIL.clear()
            _SEEN_MAIL[arg] = (esmtp, max_message_size, event)
        return event
    arg = arg.strip(" ")
    if verb == "DATA" and not arg:
        return DATA
    if not verb:
        return EMPTY_COMMAND
    if verb not in VERBS:
        return NOT_IMPLEMENTED if verb in UNIMPLEMENTED else UNKNOWN_COMMAND
    if verb in ("EHLO", "HELO"):
        if not _HOST.fullmatch(arg):
            return _invalid(501, "5.5.4", f"Syntax: {verb} hostname")
        return Hello(verb, arg)
    if verb == "STARTTLS":  # whether it is offered is the state machine's business
        return STARTTLS if not arg else _invalid(501, "5.5.4", "Syntax: STARTTLS")
    if not _PRINTABLE.fullmatch(arg):
        return BAD_CHARACTER
    if verb == "VRFY":
        return Verify(arg) if arg else _invalid(501, "5.5.4", "Syntax: VRFY address")
    if verb == "HELP":
        return Help(arg)
    if verb == "NOOP":  # RFC 5321 allows an argument and says to ignore it
        return NOOP
    if arg:
        return _invalid(501, "5.5.4", f"Syntax: {verb}")
    return DATA if verb == "DATA" else RESET if verb == "RSET" else QUIT


def _after_keyword(arg: str, keyword: str) -> str | None:
    """What follows `FROM:`/`TO:`, tolerating one space after the colon as many clients send."""
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :]
    return rest[1:] if rest.startswith(" ") else rest


def _parse_mail(arg: str, esmtp: bool, max_message_size: int) -> Event:
    rest = _after_keyword(arg, "FROM:")
    if rest is None:
        return _invalid(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    if rest.startswith("<>") and (m := _NULL_PATH_AND_PARAMS.fullmatch(rest)):
        address = ""
    elif m := _PATH_AND_PARAMS.fullmatch(rest) or _utf8_path(rest):
        address = m["mailbox"]
    else:
        return BAD_SENDER
    params = parse_params(m["params"])
    if isinstance(params, Invalid):
        return params
    if params and not esmtp:
        return PARAMS_NEED_EHLO
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return BAD_SIZE
            size = int(value)
            if max_message_size and size > max_message_size:
                return SIZE_TOO_BIG
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                return BAD_BODY
        elif key == "SMTPUTF8" and value is None:
            smtputf8 = True
        else:
            return _invalid(555, "5.5.4", f"Unsupported parameter: {key}")
    if not smtputf8 and not address.isascii():
        return NEEDS_SMTPUTF8
    return MailFrom(address, params, size=size, body=body, smtputf8=smtputf8)


def _utf8_path(rest: str) -> re.Match[str] | None:
    """A path with UTF-8 in it (RFC 6531); `rest` was decoded as latin-1."""
    if rest.isascii():
        return None
    try:
        text = rest.encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        return None
    return _UTF8_PATH_AND_PARAMS.fullmatch(text)


def _parse_rcpt(arg: str, smtputf8: bool) -> Event:
    rest = _after_keyword(arg, "TO:")
    if rest is None:
        return _invalid(501, "5.5.4", "Syntax: RCPT TO:<address>")
    m = _PATH_AND_PARAMS.fullmatch(rest) or _POSTMASTER_AND_PARAMS.fullmatch(rest)
    if m is None:
        m = _utf8_path(rest)
        if m is not None and not smtputf8:
            return NEEDS_SMTPUTF8
    if m is None:
        return BAD_RECIPIENT
    params = parse_params(m["params"])
    if isinstance(params, Invalid):
        return params
    # Moxy advertises no extension with RCPT parameters (no DSN), so any is unexpected.
    if params:
        return _invalid(555, "5.5.4", f"Unsupported parameter: {next(iter(params))}")
    return RcptTo(m["mailbox"])


def parse_params(text: str | None) -> Mapping[str, str | None] | Invalid:
    """`KEY=VALUE KEY2` → {"KEY": "VALUE", "KEY2": None}; keys upper-cased, duplicates refused."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for word in text.split(" "):
        if not word:
            continue  # tolerate runs of spaces
        m = _PARAM.fullmatch(word)
        if m is None:
            return BAD_PARAMETER
        key = m["key"].upper()
        if key in params:
            return _invalid(555, "5.5.4", f"Duplicate parameter: {key}")
        params[key] = m["value"]
    return params
