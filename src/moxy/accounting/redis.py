"""The Redis accounting sink: counters shared by every node of a cluster, in sorted sets.

Increments are summed in memory and written (ZINCRBY, and EXPIREAT on bucket keys; one script
call per `batch_size` counters, see redis_write.py) every `flush_interval`, or sooner when
`batch_size` counters are pending. While Redis is down they stay summed in memory, up to
`backlog` distinct counters.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from typing import Any, cast

import redis
import trio

from moxy.accounting.base import SinkStats
from moxy.accounting.counters import (
    DIMENSIONS,
    METRICS,
    TOTAL,
    Tally,
    bucket_expiry,
    counted,
    counter_key,
    day_period,
    minute_period,
    sum_known,
    tally,
)
from moxy.accounting.events import DeliveryEvent
from moxy.accounting.redis_write import CounterWriter
from moxy.accounting.settings import RedisSinkSettings
from moxy.logsetup import plural
from moxy.lookup.redis import connect, where
from moxy.lookup.settings import RedisSettings

try:  # the native build's loop over events whose sum exists (C): the same sums, a fraction
    from moxy.accounting._speedups import sum_known as _sum_known
except ImportError:  # pure Python
    _sum_known = sum_known

log = logging.getLogger("moxy.accounting")

_Sum = tuple[int, str, str, str]  # (minute since the epoch, dimension, member, metric)
# Events summed per minute and tally (counters.tally, flattened): [events, bytes, what one
# event of them counts for (counters.counted)].
_Key = tuple[int, str, str, tuple[str, ...], str, str, str]
_Entry = list[Any]
_Keys = dict[tuple[str, str], str]  # (dimension, metric) -> the key of one bucket


def client_for(settings: RedisSinkSettings) -> redis.Redis:
    """A redis-py client as `[routes.redis]` gets one (same URL forms, Sentinel, timeouts).

    No automatic retry of a command: ZINCRBY is not idempotent, and a pipeline resent after
    its replies were lost would count twice. A dead pooled connection is found by a PING first.
    """
    return connect(_connection_settings(settings), retries=0)


def describe(settings: RedisSinkSettings) -> str:
    """Where Redis is, for messages (without the password)."""
    return where(_connection_settings(settings))


def _connection_settings(settings: RedisSinkSettings) -> RedisSettings:
    return RedisSettings(
        url=settings.url,
        timeout=settings.timeout,
        sentinel_master=settings.sentinel_master,
        sentinels=settings.sentinels,
    )


class RedisSink:
    """A `Sink` adding delivered and refused copies to cluster-wide counters.

    An outage is logged once when it starts and once when it ends; write() then only sums in
    memory (it never waits on Redis), and tick() retries, backing off from `flush_interval` to
    30 seconds. An event whose new counters do not fit into `backlog` is dropped whole and
    counted in `stats().dropped`, so the dimensions stay consistent with each other.
    """

    name = "redis"

    def __init__(self, settings: RedisSinkSettings, *, client: redis.Redis | None = None) -> None:
        self.settings = settings
        # Counters reach Redis every flush_interval: the dispatcher may let events gather
        # for a twentieth of it (see dispatch._feed), which delays nothing one can see.
        self.gather = settings.flush_interval / 20
        self._client = client if client is not None else client_for(settings)
        self._where = describe(settings)
        self._writer = CounterWriter(self._client, self._where, settings.max_members)
        self._limiter = trio.CapacityLimiter(1)
        # Touched by the flushing thread too, but never at the same time as by the event loop:
        # the dispatcher never calls a sink concurrently, and a flush is awaited to its end.
        # Events are summed per minute of event time and per tally first (one addition per
        # event when its sender, recipients, destination, client and node were seen this
        # flush interval), and spread over their counters and buckets (total, day, minute)
        # only before a flush.
        self._sums: dict[_Key, _Entry] = {}
        # The distinct (minute, dimension, member, metric) of all _sums: each spreads over at
        # most 3 buckets. Distinct, so that tallies sharing counters (one sender writing to
        # many recipients) do not bring a flush forward as if they did not.
        self._summed: set[_Sum] = set()
        # Per Redis key, per member: what a flush writes; `_count` counts the members.
        self._pending: dict[str, dict[str, int]] = {}
        self._count = 0
        self._expiry: dict[str, int | None] = {}
        self._dropped = 0  # events this sink dropped (no room in `backlog`)
        self._upstream = 0  # events the dispatcher dropped for it (its queue full)
        self._down = False
        self._failures = 0
        self._dropped_reported = 0  # self._dropped when the last drops were logged
        self._reported = 0  # self._dropped + self._upstream at the last good flush
        self._next_flush: float | None = None
        # Per minute of event time: the buckets' keys and expiries (see _periods).
        self._buckets: dict[int, list[tuple[_Keys, dict[str, int | None], int | None]]] = {}

    # --- the Sink interface ---------------------------------------------------------------

    async def write(self, batch: Sequence[DeliveryEvent]) -> None:
        threshold = min(self.settings.batch_size, self.settings.backlog)
        sums = self._sums  # only ever cleared, never replaced
        i, n = 0, len(batch)
        while i < n:
            # Every event whose sum exists, in one call (C in the native build); then the
            # one that needs a new sum (or that the C leaves to Python), here.
            i = _sum_known(batch, sums, i)
            if i >= n:
                break
            event = batch[i]
            i += 1
            what = tally(event)
            if what is None:
                continue  # counts nothing (C can leave such an event to Python)
            key = (int(event.time // 60), *what)
            entry = sums.get(key)
            if entry is not None:
                entry[0] += 1
                entry[1] += event.size
                continue
            entry = self._new_sum(key, drop=self._down)
            if entry is None and not self._down:
                # `backlog` is full while Redis is up: write what is held, not drop the event.
                await self._flush()
                entry = self._new_sum(key, drop=True)
            if entry is None:
                continue
            entry[0] += 1
            entry[1] += event.size
            if self._held_at_most() >= threshold and not self._down:
                await self._flush()

    async def tick(self) -> None:
        now = trio.current_time()
        if self._next_flush is None:
            self._next_flush = now + self.settings.flush_interval
        if (self._pending or self._sums) and now >= self._next_flush:
            await self._flush()

    async def reopen(self) -> None:
        """Nothing to reopen: Redis connections are not files."""

    async def aclose(self) -> None:
        with trio.move_on_after(self.settings.timeout * 2) as deadline:
            if self._pending or self._sums:
                await self._flush(abandon_on_cancel=True)
        if self._pending:
            what = "no answer in time" if deadline.cancelled_caught else "unreachable"
            log.error(
                "accounting: redis %s at shutdown, %s not written: %s",
                what, plural(self._count, "counter"), self._where,
            )
        with trio.move_on_after(self.settings.timeout):
            await trio.to_thread.run_sync(self._client.close, abandon_on_cancel=True)

    def stats(self) -> SinkStats:
        return SinkStats(backlog=self._held(time.time()), dropped=self._dropped)

    # --- summing --------------------------------------------------------------------------

    def lost(self, count: int) -> None:
        """The dispatcher dropped `count` events for this sink (its queue was full while a
        flush waited on a hung Redis): reported with the outage's own drops."""
        self._upstream += count

    def _new_sum(self, key: _Key, *, drop: bool = True) -> _Entry | None:
        """A new entry of `_sums`, or None when its counters do not fit into `backlog`: the
        event is dropped (whole, so the dimensions stay consistent with each other) and
        counted, unless not `drop` (the caller flushes and asks again)."""
        minute, *what = key
        triples = counted(cast(Tally, tuple(what)))
        if self._held_at_most() + 3 * len(triples) > self.settings.backlog:
            # Only near the bound is it worth counting exactly which counters would be new.
            now = time.time()
            extra = [(minute, dimension, member, metric) for dimension, member, metric in triples]
            if self._held(now, extra) > self.settings.backlog:
                if not drop:
                    return None
                self._dropped += 1
                if self._dropped == self._dropped_reported + 1:
                    if self._down:
                        log.error(
                            "accounting: redis backlog full (%s), dropping events until "
                            "%s is back", plural(self._held(now), "counter"), self._where,
                        )
                    else:  # an event with more counters than `backlog` holds
                        log.error(
                            "accounting: redis backlog full (%s, at most %d), dropping "
                            "events: %s", plural(self._held(now), "counter"),
                            self.settings.backlog, self._where,
                        )
                return None
        entry = self._sums[key] = [0, 0, triples]
        self._summed.update([(minute, dimension, member, metric)
                             for dimension, member, metric in triples])
        return entry

    def _held_at_most(self) -> int:
        """An upper bound of `_held()`, cheap: each sum spreads over at most 3 buckets."""
        return self._count + 3 * len(self._summed)

    def _held(self, now: float, extra: Sequence[_Sum] = ()) -> int:
        """Distinct counters held (pending and summed, plus `extra`): what `backlog` bounds."""
        pending = self._pending
        new: set[tuple[str, str]] = set()
        for minute, dimension, member, metric in (*self._summed, *extra):
            for keys, _expiries in self._periods(minute, now):
                bucket = keys[dimension, metric]
                if member not in pending.get(bucket, ()):
                    new.add((bucket, member))
        return self._count + len(new)

    def _spread(self, now: float) -> None:
        """Move the summed events into the per-key counters a flush writes."""
        pending, expiry = self._pending, self._expiry
        count = self._count
        made: dict[int, dict[tuple[str, str], list[tuple[str, int | None]]]] = {}
        for key, (events, size, triples) in self._sums.items():
            targets = made.get(key[0])
            if targets is None:
                targets = made[key[0]] = self._targets(key[0], now)
            for dimension, member, metric in triples:
                amount = size if metric == "bytes" else events
                for bucket, expires in targets[dimension, metric]:
                    members = pending.get(bucket)
                    if members is None:
                        members = pending[bucket] = {}
                        expiry[bucket] = expires
                    if member in members:
                        members[member] += amount
                    else:
                        members[member] = amount
                        count += 1
        self._count = count
        self._sums.clear()
        self._summed.clear()

    def _periods(self, minute: int, now: float) -> list[tuple[_Keys, dict[str, int | None]]]:
        """The buckets an event of `minute` (minutes since the epoch) counts in, each as its
        keys by (dimension, metric) and their expiry; a bucket already expired is left out.
        Made once per minute, not once per event."""
        made = self._buckets.get(minute)
        if made is None:
            if len(self._buckets) > 16:
                self._buckets.clear()
            when = minute * 60.0
            made = self._buckets[minute] = [
                self._bucket(period) for period in (TOTAL, day_period(when), minute_period(when))
            ]
        return [
            (keys, expiries) for keys, expiries, expiry in made if expiry is None or expiry > now
        ]

    def _targets(self, minute: int, now: float) -> dict[tuple[str, str],
                                                        list[tuple[str, int | None]]]:
        """`_periods` by (dimension, metric): the keys a counter of `minute` adds to, with
        their expiry."""
        periods = self._periods(minute, now)
        return {pair: [(keys[pair], expiries[keys[pair]]) for keys, expiries in periods]
                for pair in periods[0][0]}  # the totals: never expired

    def _bucket(self, period: str) -> tuple[_Keys, dict[str, int | None], int | None]:
        expiry = bucket_expiry(
            period,
            retention_days=self.settings.retention_days,
            minute_retention=self.settings.minute_retention,
        )
        keys = {
            (dimension, metric): counter_key(self.settings.key_prefix, period, dimension, metric)
            for dimension in DIMENSIONS
            for metric in METRICS
        }
        return keys, dict.fromkeys(keys.values(), expiry), expiry

    # --- writing --------------------------------------------------------------------------

    async def _flush(self, *, abandon_on_cancel: bool = False) -> None:
        self._next_flush = trio.current_time() + self.settings.flush_interval
        now = time.time()
        self._spread(now)
        self._forget_expired(now)
        if not self._pending:
            return
        held = self._count
        error = await trio.to_thread.run_sync(
            self._send, limiter=self._limiter, abandon_on_cancel=abandon_on_cancel
        )
        if error is not None:
            # Retry later and later (up to 30 s): a hung Redis costs a timeout per attempt.
            self._failures += 1
            backoff = min(self.settings.flush_interval * 2 ** min(self._failures, 5), 30.0)
            self._next_flush = trio.current_time() + backoff
            if not self._down:
                self._down = True
                log.error(
                    "accounting: redis unreachable, keeping %s (at most %d): %s: %s",
                    plural(self._count, "counter"), self.settings.backlog, self._where, error,
                )
            return
        self._failures = 0
        # Every event dropped since the last good flush, whatever the reason: no room in
        # `backlog`, or the dispatcher's queue full while a flush waited on a hung Redis.
        total = self._dropped + self._upstream
        if self._down:
            self._down = False
            log.warning(
                "accounting: redis reachable again, %s written, %s dropped during the "
                "outage: %s", plural(held, "counter"), plural(total - self._reported, "event"),
                self._where,
            )
        elif self._dropped > self._dropped_reported:
            log.warning("accounting: redis backlog has room again, %s dropped: %s",
                        plural(self._dropped - self._dropped_reported, "event"), self._where)
        self._reported, self._dropped_reported = total, self._dropped
        self._expiry = {key: self._expiry[key] for key in self._pending}

    def _forget_expired(self, now: float) -> None:
        """Counters of buckets that expired while Redis was down would be deleted on arrival."""
        gone = [key for key, when in self._expiry.items() if when is not None and when <= now]
        for key in gone:
            self._count -= len(self._pending.pop(key, ()))
            del self._expiry[key]

    def _send(self) -> str | None:
        """In the worker thread: write the pending counters in chunks of `batch_size`; each
        chunk written is taken off `_pending`. Returns the error that stopped it."""
        try:
            try:
                self._client.ping()
            except redis.ConnectionError:
                self._client.ping()  # the pool dropped a dead connection: try a fresh one
            pending, expiry = self._pending, self._expiry
            size = self.settings.batch_size
            while pending:
                chunk: dict[str, dict[str, int]] = {}
                expiring: dict[str, int] = {}
                room = size
                for key, members in pending.items():
                    if len(members) > room:  # the rest in the next chunk
                        members = dict(itertools.islice(members.items(), room))
                    chunk[key] = members
                    when = expiry.get(key)
                    if when is not None:
                        expiring[key] = when
                    room -= len(members)
                    if not room:
                        break
                self._writer.add(chunk, expiring)
                for key, members in chunk.items():
                    left = pending[key]
                    if members is left:
                        del pending[key]
                    else:
                        for member in members:
                            del left[member]
                    self._count -= len(members)
        except (redis.RedisError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None
