"""The GIL's switch interval of Moxy's processes (the serving ones and the accounting one).

A thread that wants the GIL waits on a condition the running thread signals whenever it lets
the GIL go, which the event loop does at each system call; every signal starts the waiter's
wait (`sys.getswitchinterval()`, 5 ms by default) again. At full load the event loop makes a
system call every few microseconds and takes the GIL back before a woken waiter can run, so
a thread with a moment's work (the message log's writer, a Redis flush, a lookup in a worker
thread) could wait for milliseconds, woken again and again, and each of those wake-ups cost
the event loop a futex call and the other CPU a context switch: in the serving process, with
the accounting sinks in it, about 5 µs of CPU a message (docs/accounting.md). With a wait of
0.1 ms the waiter asks for the GIL and gets it at the loop's next check (a thread that
computes for long then shares the GIL in slices of 0.1 ms, which the event loop's latency
only gains from). `[server] gil_switch_interval` sets it (docs/configuration.md).
"""

from __future__ import annotations

import sys


def set_switch_interval(seconds: float) -> None:
    """At the start of a serving process (workers inherit it) and of an accounting process."""
    sys.setswitchinterval(seconds)
