"""Destinations that are there and not there, on loopback: what a customer's server looks like
when its dynamic IP goes dark.

- `black_hole()`: a listener whose accept queue is full, so the kernel drops further SYNs and a
  connect hangs (as to an address whose packets vanish).
- `silent_listener()`: completes the TCP handshake (the kernel does, from the accept queue) and
  then never says a word: the greeting never comes.
- `refusing_address()`: a port with nothing listening: connection refused at once.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

from peers.sink import free_port


@contextlib.contextmanager
def black_hole() -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(4):  # fill the accept queue; the listener never accepts
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(address)
        probe = stack.enter_context(socket.socket())
        probe.settimeout(0.5)
        try:
            probe.connect(address)
        except TimeoutError:
            pass  # proof that connecting now hangs
        else:
            raise AssertionError("the black hole accepted a connection")
        yield f"127.0.0.1:{address[1]}"


@contextlib.contextmanager
def silent_listener(backlog: int = 64) -> Iterator[str]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(backlog)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def refusing_address() -> str:
    return f"127.0.0.1:{free_port()}"
