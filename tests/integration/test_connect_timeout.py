"""A destination that never completes the TCP handshake: `timeouts.upstream_connect`, then the
next alternative. The "black hole" is a loopback listener whose accept queue is full, so the
kernel drops further SYNs (no address outside loopback is needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from peers import dark
from peers.moxy import StartMoxy
from peers.recorder import Recorder

from .helpers import send_one

MakeRecorder = Callable[..., Recorder]


@pytest.fixture
def black_hole() -> Iterator[str]:
    with dark.black_hole() as address:
        yield address


async def test_a_connect_that_hangs_times_out_and_the_next_alternative_gets_the_mail(
    moxy: StartMoxy, make_recorder: MakeRecorder, black_hole: str
) -> None:
    backup = make_recorder()
    server = await moxy(
        {"example.org": f"{black_hole}|{backup.address}"}, timeouts={"upstream_connect": 0.5}
    )
    outcome = await send_one(server, ["user@example.org"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert len(backup.messages) == 1


async def test_a_connect_that_hangs_with_no_alternative_is_451_4_4_1(
    moxy: StartMoxy, black_hole: str
) -> None:
    server = await moxy({"example.org": black_hole}, timeouts={"upstream_connect": 0.5})
    outcome = await send_one(server, ["user@example.org"])
    rcpt = outcome.envelope[1]
    assert (rcpt.code, rcpt.lines[0][:5]) == (451, "4.4.1"), outcome.transcript
    assert outcome.final is None
