"""The upstream side: reading a server's replies, writing commands, reading EHLO extensions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moxy.smtp.client import ReplyParser, UpstreamProtocolError, format_command, parse_ehlo
from moxy.smtp.replies import Reply

from .splits import split_at


def parse(*pieces: bytes, **options: int) -> list[Reply]:
    parser = ReplyParser(**options)
    replies = []
    for piece in pieces:
        parser.receive_data(piece)
        while (reply := parser.next_reply()) is not None:
            replies.append(reply)
    return replies


@pytest.mark.parametrize(
    ("wire", "reply"),
    [
        (b"220 mx.example ESMTP\r\n", Reply(220, ("mx.example ESMTP",))),
        (b"250 2.1.0 Ok\r\n", Reply(250, ("2.1.0 Ok",))),
        (
            b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10240000\r\n",
            Reply(250, ("mx.example", "PIPELINING", "SIZE 10240000")),
        ),
        (b"250\r\n", Reply(250, ("",))),
        (b"250 \r\n", Reply(250, ("",))),
        (b"250-\r\n250 last\r\n", Reply(250, ("", "last"))),
        (b"550 5.7.1 Relaying denied\n", Reply(550, ("5.7.1 Relaying denied",))),
        (b"451-4.3.0 one\n451 4.3.0 two\r\n", Reply(451, ("4.3.0 one", "4.3.0 two"))),
        (b"250 caf\xc3\xa9\r\n", Reply(250, ("café",))),
        (b"250 a\x00b\x1bc\td\r\n", Reply(250, ("a?b?c\td",))),
        (b"250 a\rb\r\n", Reply(250, ("a?b",))),
    ],
)
def test_reply_is_read_with_the_peer_text(wire: bytes, reply: Reply) -> None:
    assert parse(wire) == [reply]


def test_parsed_enhanced_code_is_the_peers() -> None:
    (reply,) = parse(b"550 5.1.1 <x@y>: Recipient address rejected\r\n")
    assert (reply.enhanced, reply.text) == ("5.1.1", "<x@y>: Recipient address rejected")


def test_several_replies_in_one_packet_come_out_in_order() -> None:
    assert [r.code for r in parse(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 Go\r\n")] == [250, 250, 354]


MULTI = b"250-mx.example\r\n250-8BITMIME\r\n250 SIZE 100\r\n"


@pytest.mark.parametrize("point", range(len(MULTI) + 1))
def test_reply_split_anywhere_is_one_reply(point: int) -> None:
    replies = parse(*split_at(MULTI, point))
    assert replies == [Reply(250, ("mx.example", "8BITMIME", "SIZE 100"))]


def test_incomplete_reply_needs_more_data() -> None:
    parser = ReplyParser()
    parser.receive_data(b"250-first\r\n250 sec")
    assert parser.next_reply() is None


@pytest.mark.parametrize(
    "reply",
    [
        Reply(220, ("mx.example ESMTP",)),
        Reply(250, ("mx.example", "PIPELINING", "SIZE 10")),
        Reply.make(550, "5.7.1", "Relaying denied", "see the docs"),
    ],
)
def test_our_replies_read_back_unchanged(reply: Reply) -> None:
    assert parse(reply.to_bytes()) == [reply]


@pytest.mark.parametrize(
    ("wire", "options"),
    [
        (b"hello\r\n", {}),
        (b"25\r\n", {}),
        (b"2500 x\r\n", {}),
        (b"250x\r\n", {}),
        (b"150 x\r\n", {}),
        (b"650 x\r\n", {}),
        (b" 250 x\r\n", {}),
        (b"\r\n", {}),
        (b"250-a\r\n251 b\r\n", {}),
        (b"250 " + b"x" * 100 + b"\r\n", {"max_line": 50}),
        (b"250 " + b"x" * 100, {"max_line": 50}),
        (b"250-a\r\n" * 5 + b"250 b\r\n", {"max_lines": 5}),
    ],
)
def test_malformed_reply_raises(wire: bytes, options: dict[str, int]) -> None:
    with pytest.raises(UpstreamProtocolError):
        parse(wire, **options)


@pytest.mark.parametrize("partial", [b"", b"250-a\r\n", b"250 unterminated"])
def test_close_before_a_complete_reply_raises(partial: bytes) -> None:
    parser = ReplyParser()
    parser.receive_data(partial)
    parser.receive_data(b"")
    with pytest.raises(UpstreamProtocolError):
        parser.next_reply()


def test_complete_reply_before_the_close_is_still_read() -> None:
    parser = ReplyParser()
    parser.receive_data(b"221 2.0.0 Bye\r\n")
    parser.receive_data(b"")
    assert parser.next_reply() == Reply(221, ("2.0.0 Bye",))


def test_error_is_permanent() -> None:
    parser = ReplyParser()
    parser.receive_data(b"junk\r\n")
    for _ in range(2):
        with pytest.raises(UpstreamProtocolError):
            parser.next_reply()
    parser.receive_data(b"250 ok\r\n")
    with pytest.raises(UpstreamProtocolError):
        parser.next_reply()


# Well-formed replies: a code and one to five lines of printable text.
GOOD_REPLIES = st.lists(
    st.tuples(
        st.integers(min_value=200, max_value=599),
        st.lists(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
                 min_size=1, max_size=5),
    ),
    max_size=4,
)


def wire_of(code: int, lines: list[str]) -> bytes:
    *first, last = lines
    return b"".join(f"{code}-{line}\r\n".encode() for line in first) + f"{code} {last}\r\n".encode()


@given(GOOD_REPLIES, st.lists(st.binary(min_size=1, max_size=200), max_size=10),
       st.lists(st.integers(min_value=0, max_value=400), max_size=3))
def test_any_bytes_give_replies_or_the_protocol_error(
    good: list[tuple[int, list[str]]], junk: list[bytes], points: list[int]
) -> None:
    """Whatever follows, the well-formed replies before it come out as sent, in order; what
    the junk gives is a reply within the limits or the protocol error, never anything else."""
    parser = ReplyParser(max_line=100, max_lines=5)
    replies = []
    try:
        for packet in [*split_at(b"".join(wire_of(c, lines) for c, lines in good), *points),
                       *junk, b""]:
            parser.receive_data(packet)
            while (reply := parser.next_reply()) is not None:
                assert 200 <= reply.code < 600 and 1 <= len(reply.lines) <= 5
                replies.append(reply)
    except UpstreamProtocolError:
        pass
    assert replies[:len(good)] == [Reply(code, tuple(lines)) for code, lines in good]


# -- the fast path for a whole single-line reply ---------------------------------------------


class SlowParser:
    """The parser without its fast path: every line through the general line reader. (A
    wrapper, not a subclass: the native build's ReplyParser cannot be subclassed.)"""

    def __init__(self, **limits: int) -> None:
        self.parser = ReplyParser(**limits)

    def receive_data(self, data: bytes) -> None:
        self.parser.receive_data(data)

    def next_reply(self) -> Reply | None:
        return self.parser._next_reply_checked()


def read_all(parser: ReplyParser | SlowParser, pieces: list[bytes]) -> list[Reply | str]:
    """Replies as they come out, then the error that ended the stream (if any)."""
    out: list[Reply | str] = []
    try:
        for piece in [*pieces, b""]:
            parser.receive_data(piece)
            while (reply := parser.next_reply()) is not None:
                out.append(reply)
    except UpstreamProtocolError as exc:
        out.append(f"error: {exc}")
    return out


PIPELINED = (
    b"250 2.1.0 Ok\r\n250-2.1.5 first\r\n250 2.1.5 second\r\n354 End data\n"
    b"250 \r\n250\r\n550 5.7.1 caf\xc3\xa9 \x1b\r\r\n221 Bye\r\n"
)


@pytest.mark.parametrize("point", range(len(PIPELINED) + 1))
def test_replies_split_at_any_offset_read_as_without_the_fast_path(point: int) -> None:
    pieces = split_at(PIPELINED, point)
    fast = read_all(ReplyParser(), pieces)
    assert fast == read_all(SlowParser(), pieces)
    assert [r.code for r in fast if isinstance(r, Reply)] == [250, 250, 354, 250, 250, 550, 221]


def test_replies_fed_byte_by_byte_read_as_in_one_piece() -> None:
    one_by_one = [PIPELINED[i : i + 1] for i in range(len(PIPELINED))]
    assert read_all(ReplyParser(), one_by_one) == read_all(ReplyParser(), [PIPELINED])


def test_single_line_reply_longer_than_the_limit_is_refused_on_the_fast_path_too() -> None:
    for wire in (b"250 " + b"x" * 45 + b"\r\n", b"250 " + b"x" * 46 + b"\n"):
        assert len(wire) == 51
        assert read_all(ReplyParser(max_line=50), [wire]) == ["error: reply line too long"]
    assert read_all(ReplyParser(max_line=50), [b"250 " + b"x" * 44 + b"\r\n"]) == [
        Reply(250, ("x" * 44,)),
        "error: connection closed",
    ]


def test_buffered_counts_what_follows_a_fast_path_reply() -> None:
    parser = ReplyParser()
    parser.receive_data(b"250 Ok\r\n354 Go")
    assert parser.next_reply() == Reply(250, ("Ok",))
    assert parser.buffered == len(b"354 Go")


def test_replies_read_again_are_equal_and_the_memory_of_them_is_bounded() -> None:
    from moxy.smtp import client

    wire = b"".join(b"250 2.0.0 Ok: queued as Q%d\r\n" % i for i in range(600))
    first = read_all(ReplyParser(), [wire])
    assert read_all(ReplyParser(), [wire]) == first == read_all(SlowParser(), [wire])
    assert first[599] == Reply(250, ("2.0.0 Ok: queued as Q599",))
    assert len(client._SEEN) <= client._SEEN_MAX
    long = b"250 " + b"y" * 300 + b"\r\n"
    assert read_all(ReplyParser(), [long]) == [Reply(250, ("y" * 300,)), "error: connection closed"]
    assert long not in client._SEEN


def test_a_multi_line_reply_read_before_is_still_held_to_each_parsers_limits() -> None:
    ehlo = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
    expected = Reply(250, ("mx.example", "PIPELINING", "SIZE 10240000", "8BITMIME"))
    for _ in range(2):  # the second time from memory
        assert read_all(ReplyParser(), [ehlo])[0] == expected
    assert read_all(ReplyParser(max_line=18), [ehlo]) == ["error: reply line too long"]
    assert read_all(ReplyParser(max_line=19), [ehlo])[0] == expected
    assert read_all(ReplyParser(max_lines=3), [ehlo]) == ["error: reply longer than 3 lines"]
    assert read_all(ReplyParser(max_lines=4), [ehlo])[0] == expected
    changed = ehlo.replace(b"250 8BIT", b"251 8BIT")
    assert read_all(ReplyParser(), [changed]) == ["error: reply code changed from 250 to 251"]


def test_parsed_ehlo_extensions_are_a_callers_own() -> None:
    reply = Reply(250, ("mx", "PIPELINING", "SIZE 100"))
    first = parse_ehlo(reply)
    first["SIZE"] = "changed"
    assert parse_ehlo(reply) == {"PIPELINING": "", "SIZE": "100"}


def test_feed_is_receive_data_then_next_reply() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250 2.1.0 Ok\r\n250 2.1") == Reply(250, ("2.1.0 Ok",))
    assert parser.feed(b".5 Ok\r\n") == Reply(250, ("2.1.5 Ok",))
    assert parser.feed(b"250-a\r\n") is None
    assert parser.feed(b"250 b\r\n") == Reply(250, ("a", "b"))


def feed_all(parser: ReplyParser, pieces: list[bytes]) -> list[Reply | str]:
    """As read_all, each piece through `feed` (then `next_reply` while replies come)."""
    out: list[Reply | str] = []
    try:
        for piece in pieces:
            if not piece:
                continue
            reply = parser.feed(piece)
            while reply is not None:
                out.append(reply)
                reply = parser.next_reply()
        parser.receive_data(b"")
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    except UpstreamProtocolError as exc:
        out.append(f"error: {exc}")
    return out


def test_a_line_read_before_and_fed_whole_is_still_held_to_the_parsers_limit() -> None:
    wire = b"250 " + b"z" * 45 + b"\r\n"  # 51 bytes
    read = [Reply(250, ("z" * 45,)), "error: connection closed"]
    assert feed_all(ReplyParser(), [wire]) == read  # now a known line
    assert feed_all(ReplyParser(max_line=51), [wire]) == read
    assert feed_all(ReplyParser(max_line=50), [wire]) == ["error: reply line too long"]
    parser = ReplyParser()
    assert parser.feed(b"250-first\r\n") is None  # a multi-line reply under way
    assert parser.feed(wire) == Reply(250, ("first", "z" * 45))  # its last line


@given(REPLY_LINES_ANY := st.lists(
    st.tuples(
        st.sampled_from([b"250", b"354", b"550", b"25", b"2x0"]),
        st.sampled_from([b" ", b"-", b""]),
        st.sampled_from([b"", b"2.1.0 Ok", b"x" * 40]),
        st.sampled_from([b"\r\n", b"\n"]),
    ).map(b"".join),
    max_size=6,
), st.integers(min_value=20, max_value=60))
def test_feeding_whole_lines_reads_like_the_general_reader(
    lines: list[bytes], max_line: int
) -> None:
    # Each line once to a parser of its own first, so that the fed ones are known lines.
    feed_all(ReplyParser(), lines)
    assert feed_all(ReplyParser(max_line=max_line, max_lines=3), lines) == read_all(
        SlowParser(max_line=max_line, max_lines=3), lines
    )


def test_a_parser_must_allow_one_line() -> None:
    with pytest.raises(ValueError):
        ReplyParser(max_lines=0)


REPLY_LINES = st.lists(
    st.tuples(
        st.sampled_from([b"250", b"354", b"421", b"550", b"199", b"25", b"2x0"]),
        st.sampled_from([b" ", b"-", b"", b"x"]),
        st.binary(max_size=12),
        st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]),
    ).map(b"".join),
    max_size=8,
).map(b"".join)


@given(REPLY_LINES, st.lists(st.integers(min_value=0, max_value=120), max_size=4))
def test_fast_path_reads_like_the_general_reader(wire: bytes, points: list[int]) -> None:
    pieces = split_at(wire, *points)
    assert read_all(ReplyParser(max_line=30, max_lines=3), pieces) == read_all(
        SlowParser(max_line=30, max_lines=3), pieces
    )


@pytest.mark.parametrize(
    ("verb", "arg", "wire"),
    [
        ("EHLO", "moxy.example", b"EHLO moxy.example\r\n"),
        ("MAIL", "FROM:<a@b.example> SIZE=10", b"MAIL FROM:<a@b.example> SIZE=10\r\n"),
        ("DATA", "", b"DATA\r\n"),
        ("QUIT", "", b"QUIT\r\n"),
    ],
)
def test_format_command(verb: str, arg: str, wire: bytes) -> None:
    assert format_command(verb, arg) == wire


@pytest.mark.parametrize("arg", ["TO:<a@b>\r\nRCPT TO:<evil@x>", "TO:<a@b>\n", "x\x00", "café"])
def test_format_command_refuses_what_could_smuggle_a_command(arg: str) -> None:
    with pytest.raises(ValueError):
        format_command("RCPT", arg)


@pytest.mark.parametrize(
    ("reply", "extensions"),
    [
        (
            Reply(250, ("mx.example greets you", "PIPELINING", "SIZE 10240000", "8BITMIME")),
            {"PIPELINING": "", "SIZE": "10240000", "8BITMIME": ""},
        ),
        (Reply(250, ("mx", "auth  PLAIN   LOGIN", "size")), {"AUTH": "PLAIN LOGIN", "SIZE": ""}),
        (Reply(250, ("mx", "2.0.0 PIPELINING")), {"PIPELINING": ""}),
        (Reply(250, ("mx.example",)), {}),
        (Reply(502, ("5.5.1 EHLO not implemented",)), {}),
    ],
)
def test_parse_ehlo(reply: Reply, extensions: dict[str, str]) -> None:
    assert parse_ehlo(reply) == extensions
