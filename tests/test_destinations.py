"""The dead set and the concurrency caps on their own (src/moxy/destinations.py), on trio's
mock clock: the state machine, not the sockets, which tests/integration/test_dead_destinations.py
covers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from moxy import control
from moxy.config import ConfigError, DestinationOverride, DestinationSettings, load_config
from moxy.destinations import Destinations, Unavailable
from moxy.lookup.base import Destination
from moxy.transaction import leg_error_reply
from moxy.upstream import LegError

A = Destination("192.0.2.1", 25)
B = Destination("192.0.2.2", 2525)


def make(**settings: object) -> Destinations:
    return Destinations(DestinationSettings(**settings))  # type: ignore[arg-type]


async def fail(d: Destinations, address: Destination = A) -> None:
    slot = await d.admit(address)
    slot.done("connect: no connection within 30s")
    slot.release()


async def test_a_failure_marks_down_and_later_failures_double_the_time_up_to_the_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    d = make(down_time=10.0, down_time_max=35.0)
    waits = []
    for _ in range(5):
        await fail(d)
        waits.append(round(d.down()[0].retry_in))
        with pytest.raises(Unavailable) as exc:
            await d.admit(A)
        assert exc.value.stage == "down"
        await trio.sleep(waits[-1])
    assert waits == [10, 20, 35, 35, 35]
    assert d.down()[0].failures == 5


async def test_failures_of_attempts_that_began_before_the_marking_do_not_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    d = make(down_time=10.0)
    slots = [await d.admit(A) for _ in range(5)]  # five legs connecting at once
    for slot in slots:
        slot.done("connect: refused")
        slot.release()
    [entry] = d.down()
    assert (entry.failures, round(entry.retry_in)) == (1, 10)


async def test_when_the_time_is_up_one_attempt_goes_through_and_its_success_clears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    d = make(down_time=10.0)
    await fail(d)
    await trio.sleep(10)
    probe = await d.admit(A)
    assert probe.probe
    assert d.down()[0].probing
    with pytest.raises(Unavailable, match="being retried"):
        await d.admit(A)
    probe.done(None)
    assert d.down() == []
    (await d.admit(A)).release()  # everyone may go again


async def test_an_abandoned_attempt_lets_the_next_leg_try(
    autojump_clock: trio.testing.MockClock,
) -> None:
    d = make(down_time=10.0)
    await fail(d)
    await trio.sleep(10)
    (await d.admit(A)).release()  # its session went away: no verdict
    assert not d.down()[0].probing
    assert (await d.admit(A)).probe


async def test_down_time_zero_remembers_nothing() -> None:
    d = make(down_time=0.0)
    await fail(d)
    assert d.down() == []


async def test_past_the_cap_admit_waits_then_says_busy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    d = make(concurrency=2, concurrency_wait=3.0)
    first, second = await d.admit(A), await d.admit(A)
    assert d.in_use(A) == 2
    start = trio.current_time()
    with pytest.raises(Unavailable) as exc:
        await d.admit(A)
    assert exc.value.stage == "busy"
    assert trio.current_time() - start == pytest.approx(3.0)
    (await d.admit(B)).release()  # other addresses are not affected
    first.release()
    first.release()  # idempotent
    third = await d.admit(A)
    assert d.in_use(A) == 2
    second.release()
    third.release()
    assert d.in_use(A) == 0 and not d._slots  # nothing kept for idle addresses


async def test_a_waiting_leg_gets_the_slot_a_closing_connection_gives_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    d = make(concurrency=1, concurrency_wait=3.0)
    held = await d.admit(A)
    got = []

    async def wait() -> None:
        got.append(await d.admit(A))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(1)
        held.release()
    assert len(got) == 1 and d.in_use(A) == 1


async def test_overrides_apply_by_address_or_by_the_name_in_the_route() -> None:
    name = Destination("mx.example.org", 25)
    d = make(concurrency=20, override=(DestinationOverride(A, 3), DestinationOverride(name, 5)))
    assert d.cap(A) == 3
    assert d.cap(B, name) == 5
    assert d.cap(B) == 20


async def test_concurrency_zero_is_unlimited(autojump_clock: trio.testing.MockClock) -> None:
    d = make(concurrency=0)
    assert d.cap(A) == 0
    start = trio.current_time()
    slots = [await d.admit(A) for _ in range(100)]  # all held at once
    assert len(slots) == 100
    assert trio.current_time() == start  # none waited for a place (the clock jumps if one does)
    for slot in slots:
        slot.release()
    capped = make(concurrency=1)
    held = await capped.admit(A)
    with pytest.raises(Unavailable):
        await capped.admit(A)  # the same count against a cap waits, then gives up
    assert trio.current_time() > start
    held.release()


async def test_clear_forgets_one_address_or_all() -> None:
    d = make()
    await fail(d, A)
    await fail(d, B)
    assert d.clear(Destination("192.0.2.9")) == []
    assert d.clear(A) == ["192.0.2.1:25"]
    assert [e.address for e in d.down()] == ["192.0.2.2:2525"]
    assert d.clear() == ["192.0.2.2:2525"]
    assert d.down() == []


async def test_control_requests() -> None:
    d = make()
    await fail(d, B)
    [entry] = control.answer(d, "list")
    assert entry["address"] == "192.0.2.2:2525" and entry["failures"] == 1
    assert control.describe(entry)[0].startswith("192.0.2.2:2525  down since ")
    assert control.answer(d, "clear 192.0.2.2:2525") == [{"cleared": ["192.0.2.2:2525"]}]
    assert control.answer(d, "clear [nonsense") == [{"error": "'[nonsense': missing ']'"}]
    assert "unknown request" in str(control.answer(d, "drop everything")[0]["error"])
    with pytest.raises(control.ControlError, match="unexpected answer"):
        control.describe({"address": "x"})  # a server of another version


def test_the_sender_hears_4_4_1_for_down_and_4_4_5_for_busy() -> None:
    down = leg_error_reply(LegError("down", "a", "known down"))
    busy = leg_error_reply(LegError("busy", "a", "20 connections in use"))
    assert (down.code, down.enhanced) == (451, "4.4.1")
    assert (busy.code, busy.enhanced) == (451, "4.4.5")


# --- [destinations] in the configuration -----------------------------------------------------


def _load(tmp_path: Path, text: str) -> DestinationSettings:
    (tmp_path / "routes").write_text("example.org 127.0.0.1\n")
    path = tmp_path / "moxy.toml"
    path.write_text('[routes]\nfile = "routes"\n' + text)
    return load_config(path).destinations


def test_destination_overrides_are_read(tmp_path: Path) -> None:
    settings = _load(tmp_path, (
        '[destinations]\nconcurrency = 50\n'
        '[destinations.override."192.0.2.10:2525"]\nconcurrency = 5\n'
        '[destinations.override."MX.Example.org"]\nconcurrency = 7\n'
    ))
    assert settings.concurrency == 50
    assert settings.override == (
        DestinationOverride(Destination("192.0.2.10", 2525), 5),
        DestinationOverride(Destination("mx.example.org", 25), 7),
    )


@pytest.mark.parametrize(("toml", "error"), [
    ("down_time_max = 5", "destinations.down_time_max: must be at least down_time (30)"),
    ("concurrency = -1", "destinations.concurrency: expected 0 (unlimited) or a non-negative"),
    ('override = { "a:b" = { concurrency = 1 } }', "destinations.override: 'a:b': "),
    ('override = { "a" = { concurrency = 0 } }',
     "destinations.override: 'a': concurrency: expected a positive integer, got 0"),
    ('override = { "a" = { limit = 1 } }', "destinations.override: 'a': unknown key 'limit'"),
    ('override = { "a" = 3 }', "destinations.override: 'a': expected a table"),
    ('override = 3', "destinations.override: expected a table"),
])
def test_bad_destination_settings_name_the_key(tmp_path: Path, toml: str, error: str) -> None:
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, f"[destinations]\n{toml}\n")
    assert any(e.startswith(error) for e in exc.value.errors), exc.value.errors


async def test_a_host_name_idna_cannot_encode_is_a_resolution_failure_not_a_crash() -> None:
    """A route may name a host with a label over 63 characters (nothing checks it before the
    lookup): getaddrinfo's IDNA encoding raised UnicodeError, which ended the session."""
    from moxy.destinations import resolve

    with pytest.raises(socket.gaierror, match="not a valid host name"):
        await resolve(Destination("a" * 64 + ".example", 25))


async def test_a_local_shortage_of_descriptors_marks_no_destination_down() -> None:
    """connect() failing with EMFILE is this host's trouble: the leg fails (451 4.3.0), and the
    address is not put in the dead set, where every leg would skip it for `down_time`."""
    import resource

    from moxy.config import Timeouts
    from moxy.connection import UpstreamSettings, connect

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    destinations = make()
    target = Destination("127.0.0.1", listener.getsockname()[1])
    settings = UpstreamSettings("moxy.test", Timeouts(), destinations=destinations)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        # No descriptor left for the next socket() (the lowest free number is not allowed);
        # restored before anything else runs.
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        with pytest.raises(LegError) as caught:
            await connect(target, settings)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        listener.close()
    assert caught.value.stage == "local", caught.value
    assert (leg_error_reply(caught.value).code, leg_error_reply(caught.value).enhanced) == (
        451, "4.3.0")
    assert destinations.down() == []


async def test_a_control_socket_a_server_answers_on_is_not_taken_over(tmp_path: Path) -> None:
    """A second `moxy serve` of the same configuration replaced the running server's socket
    file (and, failing to bind its port, removed it): `moxy destinations` then found no one.
    A stale file, with nobody listening, is replaced as before."""
    path = tmp_path / "ctl"
    running = control.bind(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve_control, running, Destinations(DestinationSettings()))
        with pytest.raises(OSError, match="a running Moxy answers on it"):
            await trio.to_thread.run_sync(control.bind, path)
        assert path.exists()
        # Many asking at once, more than the server's queue held (16): each gets its answer.
        async def ask(results: list[object]) -> None:
            results.append(await trio.to_thread.run_sync(control.ask, path, "list",
                                                         abandon_on_cancel=True))

        results: list[object] = []
        async with trio.open_nursery() as askers:
            for _ in range(60):
                askers.start_soon(ask, results)
        assert results == [[]] * 60
        nursery.cancel_scope.cancel()
    control.unbind(running, path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    control.unbind(control.bind(path), path)


def test_the_upstream_connection_cap_is_the_setting_or_what_the_open_file_limit_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import resource

    from moxy import destinations

    limit = [65536]
    monkeypatch.setattr(destinations.resource, "getrlimit",
                        lambda which: (limit[0], resource.RLIM_INFINITY))
    assert destinations.connection_cap(500, 1000) == 500  # set: as set
    # 0: the limit less the client connections and the reserve for listeners, logs, clients
    assert destinations.connection_cap(0, 1000) == 65536 - 1000 - destinations.FD_RESERVE
    limit[0] = 1024  # a shell's default: the clients' share would leave nothing
    assert destinations.connection_cap(0, 1000) == 512
    limit[0] = resource.RLIM_INFINITY
    assert destinations.connection_cap(0, 1000) == 0  # no limit, no cap


@pytest.mark.parametrize(
    ("soft", "hard", "configured", "raised", "warns"),
    [
        (1024, 1_048_576, 0, True, False),  # a shell's soft limit under a large hard one
        (1024, 1024, 0, False, True),  # no higher to go: say how far to raise it
        (1024, 1024, 300, False, False),  # the cap set by hand: the operator chose
        (65536, 65536, 0, False, False),  # the systemd unit's LimitNOFILE
    ],
)
def test_serve_raises_the_open_file_limit_to_the_hard_one_and_warns_when_it_stays_low(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    soft: int, hard: int, configured: int, raised: bool, warns: bool,
) -> None:
    import logging

    from moxy import destinations

    limits = [(soft, hard)]
    monkeypatch.setattr(destinations.resource, "getrlimit", lambda which: limits[-1])
    monkeypatch.setattr(destinations.resource, "setrlimit", lambda which, v: limits.append(v))
    caplog.set_level(logging.WARNING, "moxy")
    destinations.raise_open_file_limit(configured, 1000)
    assert limits[1:] == ([(hard, hard)] if raised else [])
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ([
        "the open-file limit (1024) is low for limits.connections = 1000: each client "
        "connection may need an upstream one too; upstream connections are capped at 512, and "
        "clients may be refused for want of descriptors (raise LimitNOFILE or ulimit -n to "
        "about 2128, or set limits.upstream_connections)"
    ] if warns else [])
