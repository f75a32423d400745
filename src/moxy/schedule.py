"""The schedule point of every read on the hot path (moxy.stream), cheaper than trio's.

`trio.lowlevel.cancel_shielded_checkpoint` is an async function that awaits a generator which
yields trio's `CancelShieldedCheckpoint` message to the run loop, then unwraps the outcome the
loop sends back: for each read, a coroutine, a generator and two method calls. `yield_now`
yields the same message itself. The run loop answers that message in one way only: it puts
the task back on its run queue with `Value(None)`; so there is nothing to unwrap, and this is
neither more nor less than trio's function (a schedule point, not a cancel point).

About 0.3 µs a read, seven reads a message with a client that reuses its connection
(docs/benchmarks.md). The message is a private name of trio's: if a trio release no longer has
it, `yield_now` is trio's own function. This module is not compiled (moxy.native): mypyc does
not make generator-based coroutines (`types.coroutine`). The native build's `yield_now` is
`moxy._schedule.yield_now`, in C: an object whose await yields the message once, through the
type's slots, without the Python call, the generator and its frame that `_yield_message` costs
on each read; `_yield_message` stays the reference and the pure-Python form.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import trio


def _message() -> object | None:
    try:
        from trio._core._traps import CancelShieldedCheckpoint
    except ImportError:  # pragma: no cover - another trio
        return None
    return CancelShieldedCheckpoint


_MESSAGE = _message()


@types.coroutine
def _yield_message() -> Generator[Any, Any, None]:
    yield _MESSAGE


def _fastest() -> Callable[[], Awaitable[None]]:
    if _MESSAGE is None:
        return trio.lowlevel.cancel_shielded_checkpoint
    try:  # the native build's (C)
        from moxy import _schedule
    except ImportError:  # pure Python
        return _yield_message
    _schedule.set_message(_MESSAGE)
    return _schedule.yield_now


yield_now: Callable[[], Awaitable[None]] = _fastest()
