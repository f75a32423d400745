"""The "syslog" accounting sink: one RFC 3164 message per event, to the local syslog socket
(a unix datagram socket, /dev/log by default) or to a host over UDP or TCP.

The message is the text log line without its timestamp (syslog adds its own). TCP frames use
octet counting (RFC 6587 §3.4.1: "LENGTH SP MESSAGE"). While syslog is unreachable events are
dropped and counted, never raised, and the connection is tried again once a second.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence

import trio

from moxy.accounting.base import SinkStats
from moxy.accounting.events import DeliveryEvent
from moxy.accounting.settings import SYSLOG_FACILITIES, SyslogSinkSettings
from moxy.logsetup import plural
from moxy.lookup.settings import host_port

logger = logging.getLogger("moxy.accounting.syslog")

SEVERITY_INFO = 6
RETRY = 1.0  # seconds between connection attempts while syslog is unreachable
TIMEOUT = 5.0  # seconds a connect or a send may take before syslog counts as unreachable
MAX_MESSAGE = 64_000  # octets: what a UDP datagram can carry, with room to spare
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def facility_code(name: str) -> int:
    """RFC 3164 facility numbers: kern=0 ... cron=9, authpriv=10, ftp=11, local0-7=16-23."""
    codes = {name: number for number, name in enumerate(SYSLOG_FACILITIES[:10])}
    codes |= {"authpriv": 10, "ftp": 11}
    codes |= {f"local{n}": 16 + n for n in range(8)}
    return codes[name]


def rfc3164_timestamp(when: float) -> str:
    """"Mmm dd hh:mm:ss" in local time, the day padded with a space (RFC 3164 §4.1.2)."""
    t = time.localtime(when)
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


class SyslogSink:
    name = "syslog"

    def __init__(self, settings: SyslogSinkSettings) -> None:
        self.address = settings.address
        self.tag = settings.tag
        self.priority = facility_code(settings.facility) * 8 + SEVERITY_INFO
        self.transport, _, target = settings.address.partition("://")
        if not target:
            self.transport, target = "unix", settings.address
        self.target = target
        # Local syslog daemons add the host name themselves (as glibc's syslog() expects).
        self.hostname = "" if self.transport == "unix" else socket.gethostname().split(".")[0]
        self._sock: trio.socket.SocketType | None = None
        self._stream: trio.SocketStream | None = None
        self._last_attempt = -RETRY
        self._down = False
        self._dropped = 0

    def format(self, event: DeliveryEvent) -> bytes:
        body = event.to_log_line().split(" ", 1)[1]  # without the timestamp
        host = f"{self.hostname} " if self.hostname else ""
        text = (f"<{self.priority}>{rfc3164_timestamp(event.time)} {host}"
                f"{self.tag}[{os.getpid()}]: {body}")
        return text.encode("utf-8", "replace")[:MAX_MESSAGE]

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        if not self._connected():
            if trio.current_time() - self._last_attempt >= RETRY:
                await self._connect()
            if not self._connected():
                self._dropped += len(batch)
                return
        messages = [self.format(event) for event in batch]
        sent = 0
        try:
            with trio.fail_after(TIMEOUT):
                if self._stream is not None:
                    frames = b"".join(b"%d %s" % (len(m), m) for m in messages)
                    await self._stream.send_all(frames)
                    sent = len(messages)
                else:
                    assert self._sock is not None
                    for message in messages:
                        await self._sock.send(message)
                        sent += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError) as exc:
            self._dropped += len(messages) - sent
            await self._lost(exc)
            return
        if self._down:
            self._down = False
            logger.warning("syslog %s is reachable again; %s dropped so far",
                           self.address, plural(self._dropped, "event"))

    async def tick(self) -> None:
        if not self._connected() and trio.current_time() - self._last_attempt >= RETRY:
            await self._connect()

    async def reopen(self) -> None:
        """Syslog daemons restart too: connect afresh (logrotate's SIGUSR1 comes with that)."""
        await self._close()
        await self._connect()

    async def aclose(self) -> None:
        await self._close()

    def stats(self) -> SinkStats:
        return SinkStats(backlog=0, dropped=self._dropped)

    def _connected(self) -> bool:
        return self._sock is not None or self._stream is not None

    async def _connect(self) -> None:
        self._last_attempt = trio.current_time()
        try:
            with trio.fail_after(TIMEOUT):
                if self.transport == "tcp":
                    host, port = host_port(self.target)
                    self._stream = await trio.open_tcp_stream(host, port)
                    return
                if self.transport == "udp":
                    host, port = host_port(self.target)
                    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                    family, kind, proto, _, address = infos[0]
                    sock = trio.socket.socket(family, kind, proto)
                    sockaddr: object = address
                else:
                    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sockaddr = self.target
                try:
                    await sock.connect(sockaddr)
                except BaseException:
                    sock.close()
                    raise
                self._sock = sock
        except (OSError, trio.TooSlowError) as exc:
            await self._lost(exc)

    async def _lost(self, exc: BaseException) -> None:
        await self._close()
        if not self._down:
            self._down = True
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            logger.error("syslog %s is unreachable (%s); dropping events until it is back",
                         self.address, reason)

    async def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)
