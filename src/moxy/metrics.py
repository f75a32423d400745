"""Prometheus metrics: what Moxy counts, and the hooks the server, sessions, legs and the route
cache call to count it (docs/metrics.md). The HTTP side is in metrics_http.py.

With `[metrics]` off the server gets the base class `Metrics`, whose hooks do nothing.
`Prometheus` binds every labelled child once, so a hook on the hot path is a method call and
an increment. With `[server] workers` the values live in files shared with the master
(prometheus_client's multiprocess mode, switched on by `start_multiprocess` before the fork).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from moxy.accounting import events
from moxy.accounting.base import SinkStats
from moxy.config import Config, ListenAddress
from moxy.lookup.cache import CachedRouter
from moxy.smtp.replies import Reply
from moxy.smtp.server import TOO_MANY_RECIPIENTS

# Label values: reply classes, the upstream stages whose reply time is measured, and the
# reasons of refusals (the accounting events' own words).
RESULTS = {2: "2xx", 4: "4xx", 5: "5xx"}
STAGES = ("mail", "rcpt", "data", "end-of-data")
CONNECTION_REASONS = (
    events.CONNECTION_LIMIT,
    events.PROTOCOL_ERRORS,
    events.CLIENT_TIMEOUT,
    events.CONNECTIONS_PER_IP,
    events.CONNECTION_RATE,
    events.MESSAGE_RATE,
)
RECIPIENT_REASONS = (
    events.RELAY_DENIED,
    events.LOOKUP_FAILED,
    events.DESTINATION_REFUSED,
    events.DESTINATION_UNAVAILABLE,
    events.POLICY,
)
FAILED = "failed"  # a leg's result when it ended without a final reply

# Seconds. Upstreams on a LAN answer in a millisecond, remote ones in tens; a slow disk or
# content filter behind a destination can take a minute at end of data.
UPSTREAM_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
LOOKUP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
)  # fmt: skip

_multiprocess_dir: str | None = None


def start_multiprocess() -> str:
    """In the master of several workers, before the fork: metric values from now on live in
    files of a private directory, which the master's collector sums. Returns the directory."""
    global _multiprocess_dir
    _multiprocess_dir = tempfile.mkdtemp(prefix="moxy-metrics-")
    # prometheus_client reads the variable when a metric is made, and picks the value class when
    # it is imported: both must say "multiprocess" before a worker makes its metrics.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _multiprocess_dir
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return _multiprocess_dir


def for_config(config: Config) -> Metrics:
    """The metrics of one server: no-ops while `[metrics] listen` is unset."""
    if config.metrics.listen is None:
        return Metrics()
    # A worker only counts; its master serves /metrics for all of them.
    endpoint = config.metrics.listen if _multiprocess_dir is None else None
    return Prometheus(config.metrics.per_destination, endpoint)


class UpstreamStats:
    """The metrics of one destination (of all of them without `per_destination`): no-ops.

    `active` is False for these no-ops: the hot path then skips the calls (and the clock
    readings for `replied`) altogether."""

    active = False

    def connected(self, seconds: float) -> None:
        """A TCP connection was made in `seconds`."""

    def replied(self, stage: str, seconds: float) -> None:
        """A reply came `seconds` after the command (or pipelined group) was sent."""

    def sent(self, octets: int) -> None:
        """Message data written to the destination."""

    def finished(self, code: int) -> None:
        """The final reply to a message (0: the leg failed without one)."""


_NO_UPSTREAM = UpstreamStats()


class Metrics:
    """The hooks, doing nothing: what the server calls with metrics off."""

    registry: CollectorRegistry | None = None
    endpoint: ListenAddress | None = None  # where this process serves /metrics

    # -- client connections (server.py, session.py) ---------------------------------------

    def connection_accepted(self) -> None: ...

    def connection_refused(self, reason: str) -> None: ...

    def session_started(self) -> None: ...

    def session_ended(self) -> None: ...

    def invalid(self, reply: Reply) -> None:
        """The protocol core refused a command (a 421 closes the connection)."""

    # -- messages and recipients (session.py, transaction.py) -----------------------------

    def received(self, octets: int) -> None:
        """Message data read from a client."""

    def message(self, code: int) -> None:
        """The final reply to a client's message (after DATA or end of data)."""

    def recipient(self, code: int) -> None:
        """The reply to a RCPT."""

    def recipient_refused(self, reason: str) -> None: ...

    # -- destinations (connection.py) -------------------------------------------------------

    def upstream(self, destination: object) -> UpstreamStats:
        return _NO_UPSTREAM

    # -- the dead set and the caps (destinations.py) --------------------------------------

    def destinations_down(self, count: int) -> None:
        """How many addresses the dead set holds now."""

    def destination_marked_down(self) -> None:
        """An address failed to connect or greet, and is skipped for a while."""

    def destination_skipped(self, stage: str) -> None:
        """A leg did not try an address: "down" (dead set), "busy" (at its cap) or "limit"
        (the process at `limits.upstream_connections`)."""

    def upstream_connections(self, open_: int, idle: int) -> None:
        """About once a second: upstream connections open in this process (pooled ones
        included) and, of those, idle in the pool."""

    # -- the route cache (lookup/cache.py: a CacheObserver) -------------------------------

    def observe_router(self, router: object) -> None:
        """Have a CachedRouter report its hits, misses and lookup times here."""

    def cache_hit(self) -> None: ...

    def cache_miss(self) -> None: ...

    def route_lookup(self, seconds: float) -> None: ...

    # -- accounting sinks -----------------------------------------------------------------

    def observe_sinks(self, stats: Mapping[str, SinkStats]) -> None:
        """The accounting dispatcher's report, about once a second: backlog and drops so far
        per sink."""


class _Upstream(UpstreamStats):
    active = True

    def __init__(self, m: Prometheus, labels: tuple[str, ...]) -> None:
        self._connect = m.upstream_connect.labels(*labels) if labels else m.upstream_connect
        self._replies = {stage: m.upstream_reply.labels(stage, *labels) for stage in STAGES}
        self._sent = m.bytes_sent.labels(*labels) if labels else m.bytes_sent
        self._results = {
            klass: m.upstream_messages.labels(result, *labels) for klass, result in RESULTS.items()
        }
        self._failed = m.upstream_messages.labels(FAILED, *labels)

    def connected(self, seconds: float) -> None:
        self._connect.observe(seconds)

    def replied(self, stage: str, seconds: float) -> None:
        histogram = self._replies.get(stage)
        if histogram is not None:
            histogram.observe(seconds)

    def sent(self, octets: int) -> None:
        self._sent.inc(octets)

    def finished(self, code: int) -> None:
        self._results.get(code // 100, self._failed).inc()


class Prometheus(Metrics):
    """The metrics themselves, in a registry of their own (so that several servers in one
    process, as in the tests, do not mix)."""

    def __init__(self, per_destination: bool = False, endpoint: ListenAddress | None = None):
        self.endpoint = endpoint
        self.registry = r = CollectorRegistry()
        dest = ("destination",) if per_destination else ()
        self.per_destination = per_destination
        self.connections_open = Gauge(
            "moxy_connections_open", "Client connections being served",
            registry=r, multiprocess_mode="livesum",
        )
        self.connections = Counter(
            "moxy_connections", "Client connections accepted (refused ones included)",
            registry=r,
        )
        self.connections_refused = Counter(
            "moxy_connections_refused", "Client connections refused or dropped by Moxy",
            ["reason"], registry=r,
        )
        self.messages = Counter(
            "moxy_messages", "Messages by the class of the final reply the client got",
            ["result"], registry=r,
        )
        self.recipients = Counter(
            "moxy_recipients", "RCPT commands by the class of the reply", ["result"], registry=r
        )
        self.recipients_refused = Counter(
            "moxy_recipients_refused", "Recipients refused, by reason", ["reason"], registry=r
        )
        self.bytes_received = Counter(
            "moxy_received_bytes", "Message data received from clients (octets)", registry=r
        )
        self.bytes_sent = Counter(
            "moxy_sent_bytes", "Message data sent to destinations (octets, each copy counted)",
            dest, registry=r,
        )
        self.upstream_messages = Counter(
            "moxy_upstream_messages", "Message copies by a destination's final reply class",
            ["result", *dest], registry=r,
        )
        self.upstream_connect = Histogram(
            "moxy_upstream_connect_seconds", "Time to open a TCP connection to a destination",
            dest, registry=r, buckets=UPSTREAM_BUCKETS,
        )
        self.upstream_reply = Histogram(
            "moxy_upstream_reply_seconds", "Time from a command to a destination's reply",
            ["stage", *dest], registry=r, buckets=UPSTREAM_BUCKETS,
        )
        self.route_lookups = Histogram(
            "moxy_route_lookup_seconds", "Time the route sources took to answer a cache miss",
            registry=r, buckets=LOOKUP_BUCKETS,
        )
        self.cache_hits = Counter(
            "moxy_route_cache_hits", "Route lookups answered from the cache", registry=r
        )
        self.cache_misses = Counter(
            "moxy_route_cache_misses", "Route lookups that asked the route sources", registry=r
        )
        self.down_count = Gauge(
            "moxy_destinations_down", "Destination addresses in the dead set",
            registry=r, multiprocess_mode="livesum",
        )
        self.upstream_open = Gauge(
            "moxy_upstream_connections", "Upstream connections open (in use, connecting, or "
            "idle in the pool)", registry=r, multiprocess_mode="livesum",
        )
        self.upstream_idle = Gauge(
            "moxy_upstream_connections_idle", "Upstream connections idle in the pool",
            registry=r, multiprocess_mode="livesum",
        )
        self.marked_down = Counter(
            "moxy_destination_marked_down", "Destination addresses marked down (failed to "
            "connect or greet)", registry=r,
        )
        self.skipped = Counter(
            "moxy_destination_skipped", "Connection attempts not made: address down, or at its "
            "concurrency cap", ["reason"], registry=r,
        )
        self.sink_backlog = Gauge(
            "moxy_accounting_backlog", "Accounting events held by a sink (backend slow or down)",
            ["sink"], registry=r, multiprocess_mode="livesum",
        )
        self.sink_dropped = Counter(
            "moxy_accounting_dropped", "Accounting events a sink gave up", ["sink"], registry=r
        )
        # Children bound once: the hooks below only increment.
        self._refused = {x: self.connections_refused.labels(x) for x in CONNECTION_REASONS}
        self._messages = {k: self.messages.labels(v) for k, v in RESULTS.items()}
        self._recipients = {k: self.recipients.labels(v) for k, v in RESULTS.items()}
        self._rcpt_refused = {x: self.recipients_refused.labels(x) for x in RECIPIENT_REASONS}
        self._skipped = {x: self.skipped.labels(x) for x in ("down", "busy", "limit")}
        self._upstreams: dict[str, UpstreamStats] = {}
        self._all_upstreams = _Upstream(self, ()) if not per_destination else None
        self._sinks: dict[str, _Sink] = {}

    def connection_accepted(self) -> None:
        self.connections.inc()

    def connection_refused(self, reason: str) -> None:
        self._refused[reason].inc()

    def session_started(self) -> None:
        self.connections_open.inc()

    def session_ended(self) -> None:
        self.connections_open.dec()

    def invalid(self, reply: Reply) -> None:
        # The refusal's reason is counted where the session logs it (recipient_refused).
        if reply == TOO_MANY_RECIPIENTS:
            self.recipient(reply.code)

    def received(self, octets: int) -> None:
        self.bytes_received.inc(octets)

    def message(self, code: int) -> None:
        child = self._messages.get(code // 100)
        if child is not None:
            child.inc()

    def recipient(self, code: int) -> None:
        child = self._recipients.get(code // 100)
        if child is not None:
            child.inc()

    def recipient_refused(self, reason: str) -> None:
        self._rcpt_refused[reason].inc()

    def destinations_down(self, count: int) -> None:
        self.down_count.set(count)

    def destination_marked_down(self) -> None:
        self.marked_down.inc()

    def upstream_connections(self, open_: int, idle: int) -> None:
        self.upstream_open.set(open_)
        self.upstream_idle.set(idle)

    def destination_skipped(self, stage: str) -> None:
        self._skipped[stage].inc()

    def upstream(self, destination: object) -> UpstreamStats:
        """Called once per upstream connection, which keeps what it gets."""
        if self._all_upstreams is not None:
            return self._all_upstreams
        name = str(destination)
        stats = self._upstreams.get(name)
        if stats is None:
            stats = self._upstreams[name] = _Upstream(self, (name,))
        return stats

    def observe_router(self, router: object) -> None:
        if isinstance(router, CachedRouter):
            router.observer = self

    def cache_hit(self) -> None:
        self.cache_hits.inc()

    def cache_miss(self) -> None:
        self.cache_misses.inc()

    def route_lookup(self, seconds: float) -> None:
        self.route_lookups.observe(seconds)

    def observe_sinks(self, stats: Mapping[str, SinkStats]) -> None:
        for name, now in stats.items():
            sink = self._sinks.get(name)
            if sink is None:
                sink = self._sinks[name] = _Sink(self, name)
            sink.observe(now)


class _Sink:
    """One accounting sink's children; SinkStats.dropped is a running total, the counter gets
    the increase."""

    def __init__(self, m: Prometheus, name: str) -> None:
        self.backlog = m.sink_backlog.labels(name)
        self.dropped = m.sink_dropped.labels(name)
        self.last_dropped = 0

    def observe(self, stats: SinkStats) -> None:
        self.backlog.set(stats.backlog)
        # A smaller total means a new sink object (restarted): all of its drops are new.
        increase = stats.dropped - self.last_dropped
        if increase < 0:
            increase = stats.dropped
        if increase:
            self.dropped.inc(increase)
        self.last_dropped = stats.dropped
