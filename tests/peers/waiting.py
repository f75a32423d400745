"""Waiting for peers that record from their own threads or processes."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def eventually(
    condition: Callable[[], object], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll a condition from a trio test (peers record from their own threads).

    A condition that raises IndexError counts as false, as in Recorder.wait_for."""
    with trio.move_on_after(timeout):
        while not _holds(condition):
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _holds(condition: Callable[[], object]) -> bool:
    try:
        return bool(condition())
    except IndexError:
        return False
