"""The upstream pool (moxy.pool) under the destinations' concurrency cap: an idle connection
holds its place under the cap, but never once it has expired."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from moxy.config import DestinationSettings, Timeouts
from moxy.connection import LegError, UpstreamSettings, connect
from moxy.destinations import Destinations
from moxy.lookup.base import Destination
from moxy.pool import ConnectionPool
from peers.recorder import Recorder

MakeRecorder = Callable[..., Recorder]


async def test_an_expired_idle_connection_frees_its_place_at_once_and_gets_quit(
    make_recorder: MakeRecorder, mock_clock: trio.testing.MockClock
) -> None:
    recorder = make_recorder()
    destination = Destination(recorder.host, recorder.port)
    pool = ConnectionPool(per_destination=4, idle_time=10.0)
    # One place; no waiting for one (a leg without a place fails at once).
    destinations = Destinations(DestinationSettings(concurrency=1, concurrency_wait=0))
    settings = UpstreamSettings("moxy.test", Timeouts(), pool=pool, destinations=destinations)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.run)
        assert pool.give(await connect(destination, settings))
        with pytest.raises(LegError) as held:  # the idle connection holds the only place
            await connect(destination, settings)
        assert held.value.stage == "busy"

        mock_clock.jump(11.0)  # past idle_time: the reaper has not looked yet
        assert pool.take(destination) is None
        second = await connect(destination, settings)  # its place is free already
        # ... and it gets its QUIT now, not at the reaper's next round (5 s on).
        await trio.to_thread.run_sync(recorder.wait_closed, 0)
        assert recorder.verbs(0)[-1] == "QUIT"
        await second.close()
        nursery.cancel_scope.cancel()


async def test_oldest_gives_an_expired_connection_first_then_the_one_idle_longest(
    make_recorder: MakeRecorder, mock_clock: trio.testing.MockClock
) -> None:
    """What the process closes when it is at `limits.upstream_connections`."""
    recorders = [make_recorder() for _ in range(3)]
    places = [Destination(r.host, r.port) for r in recorders]
    pool = ConnectionPool(per_destination=4, idle_time=10.0)
    settings = UpstreamSettings("moxy.test", Timeouts(), pool=pool)
    conns = []
    for place in places:
        conn = await connect(place, settings)
        conns.append(conn)
        assert pool.give(conn)
        mock_clock.jump(1.0)
    assert settings.destinations.connections == 3
    assert pool.take(places[2]) is conns[2]  # in use again: not the pool's to give
    assert pool.give(conns[2])
    mock_clock.jump(8.5)  # the first one idle 10.5 s now: expired at the next take
    assert pool.take(places[0]) is None
    assert pool.oldest() is conns[0]  # expired, awaiting its QUIT
    assert pool.oldest() is conns[1]  # then the one idle longest, of any destination
    assert pool.oldest() is conns[2]
    assert pool.oldest() is None
    for conn in conns:
        await conn.close()
        await conn.close()  # twice: counted back once
    assert settings.destinations.connections == 0
