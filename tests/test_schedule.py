"""moxy.schedule.yield_now, the schedule point of every read (moxy.stream): it must behave as
trio.lowlevel.cancel_shielded_checkpoint does, with the trio that is installed."""

from __future__ import annotations

import trio

from moxy import schedule, stream


def test_the_fast_form_is_in_use_with_this_trio() -> None:
    # trio still has the message: if this fails after a trio upgrade, Moxy still works (with
    # trio's own function) but every read costs more; see moxy/schedule.py.
    assert schedule._MESSAGE is not None
    assert schedule.yield_now is not trio.lowlevel.cancel_shielded_checkpoint
    assert stream._yield is schedule.yield_now


async def test_it_lets_the_other_runnable_tasks_run() -> None:
    # trio runs a batch of runnable tasks in random order (forward or reversed), so after one
    # yield this task may come before the others of its batch; after two, they have all run.
    order: list[str] = []

    async def other(name: str) -> None:
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other, "a")
        nursery.start_soon(other, "b")
        order.append("before")
        await schedule.yield_now()
        await schedule.yield_now()
        order.append("after")
    assert order[0] == "before"
    assert sorted(order[1:3]) == ["a", "b"]
    assert order[3] == "after"


async def test_it_is_not_a_cancel_point_and_returns_none() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(3):
            assert await schedule.yield_now() is None  # type: ignore[func-returns-value]
        reached = True
        await trio.lowlevel.checkpoint()  # the next cancel point does raise
        reached = False
    assert reached
    assert scope.cancelled_caught


async def test_a_loop_of_yields_does_not_starve_a_sleeper() -> None:
    woke: list[float] = []

    async def sleeper() -> None:
        await trio.sleep(0.01)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        while not woke:
            await schedule.yield_now()
    assert woke
