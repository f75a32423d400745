"""Run one call of a blocking client library (dbm.gnu, ldap3, redis-py) off the event loop.

The call goes to a worker thread behind the source's `CapacityLimiter`, inside a deadline that
also covers the wait for a free thread: a backend that hangs costs its callers `timeout`, never
the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from moxy.lookup.base import LookupFailed

T = TypeVar("T")


async def run_blocking(
    call: Callable[[], T], *, limiter: trio.CapacityLimiter, timeout: float, what: str
) -> T:
    """Return `call()` run in a thread; `LookupFailed` naming `what` if it takes over `timeout`.

    A call that times out is abandoned, not killed: its thread finishes on its own (each client
    has its own socket timeout), and holds its limiter token until then.
    """
    started = False

    def started_call() -> T:
        nonlocal started
        started = True
        return call()

    try:
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(started_call, limiter=limiter,
                                                 abandon_on_cancel=True)
    except trio.TooSlowError:
        if not started:  # the source was never asked: every lookup thread was busy
            raise LookupFailed(
                f"{what}: not asked within {timeout:g}s: all {limiter.total_tokens:g} lookups "
                "at once were busy (the source answers too slowly for this load; see "
                "`lookups`)") from None
        raise LookupFailed(f"{what}: no answer within {timeout:g}s") from None
