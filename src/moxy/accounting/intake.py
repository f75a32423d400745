"""The call every message makes into accounting with the sinks in the serving process
(`[accounting] process = false`): `Mailbox.put`, which sessions know as `emit`
(moxy.accounting.dispatch.Accounting). With an accounting process, `emit` is a Packer's `put`
instead (moxy.accounting.remote).

It is a module of its own so that the native build compiles it (moxy.native.MODULES): called
from compiled sessions at every end of data, an interpreted `emit` cost about 1,300
instructions a message, a fifth of what accounting adds to the serving process. What it does
stays small: append the event to the intake list while that holds fewer than `wake_at` events,
else hand it to `crowded` (the Intake's own method, which wakes the clock and enforces the
bound).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Mailbox:
    def __init__(self, events: list[tuple[Any, ...]], wake_at: int,
                 crowded: Callable[[tuple[Any, ...]], None]) -> None:
        self.events = events  # the Intake's list: emptied by its clock, never replaced
        self.wake_at = wake_at
        self.crowded = crowded

    def put(self, *event: Any) -> None:
        events = self.events
        if len(events) < self.wake_at:
            events.append(event)
        else:
            self.crowded(event)
