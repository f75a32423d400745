"""What `moxystats` shows: rows read from the Redis counters or from a GDBM log.

Reading only; the counters' key schema is moxy.accounting.counters (docs/accounting.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import attrs
import redis

from moxy.accounting.counters import TOTAL, counter_key, minute_period
from moxy.accounting.gdbm import GdbmLogError, Totals, read_log
from moxy.accounting.redis import client_for, describe
from moxy.accounting.settings import RedisSinkSettings

RATE_MINUTES = (1, 5)
# Beyond 2**53 a float score no longer counts by ones: no counter of Moxy's gets there (8 PiB),
# so a larger score, like a negative or infinite one, was written by something else.
MAX_SCORE = 2**53
MAX_STAMP = 253_402_300_799  # 9999-12-31T23:59:59Z: the last time ISO 8601 writes plainly
MAX_TOTAL = 2**63 - 1  # messages or bytes in a GDBM record


class Unavailable(Exception):
    """The counters cannot be read (Redis unreachable, GDBM log unreadable)."""


@attrs.frozen
class Row:
    """One member of a dimension. Redis rows have `refused` and rates (per minute of messages,
    per second of bytes, over the last 1 and 5 minutes); GDBM rows have first and last seen."""

    key: str
    messages: int
    bytes: int
    refused: int | None = None
    messages_per_min_1m: float | None = None
    bytes_per_sec_1m: float | None = None
    messages_per_min_5m: float | None = None
    bytes_per_sec_5m: float | None = None
    first_seen: int | None = None
    last_seen: int | None = None


@attrs.frozen
class Reading:
    """The rows of one read, and the members left out of them because a counter of theirs is
    no count (a score of inf in Redis, a time past year 9999 in a GDBM log): shown as a note,
    not a traceback, and the other rows still shown."""

    rows: list[Row]
    malformed: tuple[str, ...] = ()


def window_weights(now: float, minutes: int) -> list[tuple[str, float]]:
    """The minute buckets that make up the last `minutes` minutes before `now`, each with the
    share of it inside that window: the current minute whole (it holds only the seconds so far),
    the ones before it whole, the oldest in part (sliding-window estimate)."""
    start = now - now % 60
    elapsed = now - start
    weights = [(minute_period(start), 1.0)]
    weights += [(minute_period(start - 60 * i), 1.0) for i in range(1, minutes)]
    weights.append((minute_period(start - 60 * minutes), (60 - elapsed) / 60))
    return weights


class RedisCounters:
    """Reads `[accounting.redis]` counters: top members of a dimension, with rates."""

    def __init__(self, settings: RedisSinkSettings) -> None:
        self.settings = settings
        self.where = describe(settings)
        self._client = client_for(settings)

    def close(self) -> None:
        self._client.close()

    def rows(
        self, by: str, top: int, day: str | None = None, now: float | None = None
    ) -> Reading:
        try:
            return self._rows(by, top, day, time.time() if now is None else now)
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"{self.where} unreachable: {exc}") from None

    def _key(self, period: str, by: str, metric: str) -> str:
        return counter_key(self.settings.key_prefix, period, by, metric)

    def _rows(self, by: str, top: int, day: str | None, now: float) -> Reading:
        period = TOTAL if day is None else f"d:{day}"
        client = self._client
        # Members are bytes (decode_responses is off), given back to ZMSCORE as they came.
        members: list[Any] = list(client.zrevrange(self._key(period, by, "bytes"), 0, top - 1))
        if len(members) < top:  # members with refusals only have no bytes: fill up with them
            refused: list[Any] = list(
                client.zrevrange(self._key(period, by, "refused"), 0, top - 1)
            )
            members += [m for m in refused if m not in set(members)][: top - len(members)]
        if not members:
            return Reading([])
        windows = {n: window_weights(now, n) for n in RATE_MINUTES}
        minutes = sorted({p for weights in windows.values() for p, _ in weights})
        with client.pipeline(transaction=False) as pipe:
            for metric in ("msgs", "bytes", "refused"):
                pipe.zmscore(self._key(period, by, metric), members)
            for minute in minutes:
                pipe.zmscore(self._key(minute, by, "msgs"), members)
                pipe.zmscore(self._key(minute, by, "bytes"), members)
            replies = pipe.execute()
        msgs, size, refused_counts = (_counts(r) for r in replies[:3])
        per_minute = {
            minute: (_counts(replies[3 + 2 * i]), _counts(replies[4 + 2 * i]))
            for i, minute in enumerate(minutes)
        }
        rows, malformed = [], []
        for i, member in enumerate(members):
            key = bytes(member).decode("utf-8", "backslashreplace")
            counts = [msgs[i], size[i], refused_counts[i]]
            counts += [c[i] for pair in per_minute.values() for c in pair]
            if None in counts:
                malformed.append(key)
                continue
            rates: dict[int, tuple[float, float]] = {}
            for n, weights in windows.items():
                m = sum((per_minute[p][0][i] or 0) * w for p, w in weights)
                b = sum((per_minute[p][1][i] or 0) * w for p, w in weights)
                rates[n] = (m / n, b / (60 * n))
            rows.append(Row(
                key=key, messages=msgs[i] or 0, bytes=size[i] or 0, refused=refused_counts[i],
                messages_per_min_1m=rates[1][0], bytes_per_sec_1m=rates[1][1],
                messages_per_min_5m=rates[5][0], bytes_per_sec_5m=rates[5][1],
            ))
        rows.sort(key=lambda r: (-r.bytes, -(r.refused or 0), r.key))
        return Reading(rows, tuple(malformed))


def _counts(scores: list[float | None]) -> list[int | None]:
    """Each score as a count (no score: 0); None for one that is no count."""
    return [_count(s) for s in scores]


def _count(score: float | None) -> int | None:
    if score is None:
        return 0
    if not 0 <= score <= MAX_SCORE:  # also false for NaN
        return None
    return int(score)


GDBM_DIMENSIONS = ("dest", "rcpt")


def gdbm_rows(path: Path, by: str, top: int) -> Reading:
    """The `top` keys of one kind (`dest` or `rcpt`) of a GDBM log, by bytes."""
    try:
        totals = read_log(path)
    except GdbmLogError as exc:
        raise Unavailable(str(exc)) from None
    prefix = f"{by}:"
    rows, malformed = [], []
    for key, t in totals.items():
        if not key.startswith(prefix):
            continue
        if not _sane(t):
            malformed.append(key[len(prefix):])
            continue
        rows.append(Row(key=key[len(prefix):], messages=t.messages, bytes=t.size,
                        first_seen=t.first_seen, last_seen=t.last_seen))
    rows.sort(key=lambda r: (-r.bytes, r.key))
    return Reading(rows[:top], tuple(sorted(malformed)))


def _sane(t: Totals) -> bool:
    """Totals that can be shown: four decimal numbers, but times that a clock could read."""
    return (
        t.messages <= MAX_TOTAL and t.size <= MAX_TOTAL
        and t.first_seen <= MAX_STAMP and t.last_seen <= MAX_STAMP
    )
