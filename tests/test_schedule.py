"""moxy.schedule.yield_now, the schedule point of every read (moxy.stream): it must behave as
trio.lowlevel.cancel_shielded_checkpoint does, with the trio that is installed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from moxy import native, schedule, stream

# The forms a read's yield takes: the native build's (C) and the pure-Python generator.
_FORMS: list[Callable[[], Awaitable[None]]] = [schedule._yield_message]
if "moxy._schedule" in native.compiled():
    from moxy import _schedule

    _FORMS.append(_schedule.yield_now)
# else a pure-Python checkout: `make test` always builds it, and conftest.py fails the run
# under MOXY_EXPECT_NATIVE=1 when it is missing.


@pytest.fixture(params=_FORMS, ids=lambda form: form.__module__ or "?")
def yield_now(request: pytest.FixtureRequest) -> Callable[[], Awaitable[None]]:
    return request.param  # type: ignore[no-any-return]


def test_the_fast_form_is_in_use_with_this_trio() -> None:
    # trio still has the message: if this fails after a trio upgrade, Moxy still works (with
    # trio's own function) but every read costs more; see moxy/schedule.py.
    assert schedule._MESSAGE is not None
    assert schedule.yield_now is not trio.lowlevel.cancel_shielded_checkpoint
    assert stream._yield is schedule.yield_now
    assert schedule.yield_now is _FORMS[-1]  # the C form wherever it is built


def test_the_c_form_yields_the_message_once_then_returns_none() -> None:
    if "moxy._schedule" not in native.compiled():
        pytest.skip("pure Python: no C form")
    awaitable = _schedule.yield_now()
    iterator = awaitable.__await__()
    assert iterator is awaitable
    assert iterator.send(None) is schedule._MESSAGE
    with pytest.raises(StopIteration) as done:
        iterator.send("whatever the run loop sends back")
    assert done.value.value is None
    again = _schedule.yield_now().__await__()
    assert next(again) is schedule._MESSAGE
    with pytest.raises(StopIteration):
        next(again)


async def test_an_exception_thrown_in_at_the_yield_comes_out_of_the_await(
    yield_now: Callable[[], Awaitable[None]],
) -> None:
    async def reader() -> None:
        await yield_now()

    coro = reader()
    assert coro.send(None) is schedule._MESSAGE  # at the yield, as trio's loop sees it
    with pytest.raises(KeyError):
        coro.throw(KeyError("thrown"))
    closed = reader()
    closed.send(None)
    closed.close()  # a task's coroutine closed while it waits: no error, no warning


async def test_it_lets_the_other_runnable_tasks_run(
    yield_now: Callable[[], Awaitable[None]],
) -> None:
    # trio runs a batch of runnable tasks in random order (forward or reversed), so after one
    # yield this task may come before the others of its batch; after two, they have all run.
    order: list[str] = []

    async def other(name: str) -> None:
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other, "a")
        nursery.start_soon(other, "b")
        order.append("before")
        await yield_now()
        await yield_now()
        order.append("after")
    assert sorted(order[1:3]) == ["a", "b"]
    assert order[3] == "after"


async def test_it_is_not_a_cancel_point_and_returns_none(
    yield_now: Callable[[], Awaitable[None]],
) -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        for _ in range(3):
            assert await yield_now() is None  # type: ignore[func-returns-value]
        reached = True
        await trio.lowlevel.checkpoint()  # the next cancel point does raise
        reached = False
    assert reached
    assert scope.cancelled_caught


async def test_a_loop_of_yields_does_not_starve_a_sleeper(
    yield_now: Callable[[], Awaitable[None]],
) -> None:
    woke: list[float] = []

    async def sleeper() -> None:
        await trio.sleep(0.01)
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sleeper)
        start, yields = trio.current_time(), 0
        # A starved sleeper would keep this loop going: bounded, it fails instead of hanging.
        while not woke and yields < 1_000_000:
            await yield_now()
            yields += 1
    assert woke, f"the sleeper did not run in {yields} yields"
    assert woke[0] - start < 1.0
