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
from moxy.accounting.gdbm import GdbmLogError, read_log
from moxy.accounting.redis import client_for, describe
from moxy.accounting.settings import RedisSinkSettings

RATE_MINUTES = (1, 5)


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
    ) -> list[Row]:
        try:
            return self._rows(by, top, day, time.time() if now is None else now)
        except (redis.RedisError, OSError) as exc:
            raise Unavailable(f"{self.where} unreachable: {exc}") from None

    def _key(self, period: str, by: str, metric: str) -> str:
        return counter_key(self.settings.key_prefix, period, by, metric)

    def _rows(self, by: str, top: int, day: str | None, now: float) -> list[Row]:
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
            return []
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
        rows = []
        for i, member in enumerate(members):
            rates: dict[int, tuple[float, float]] = {}
            for n, weights in windows.items():
                m = sum(per_minute[p][0][i] * w for p, w in weights)
                b = sum(per_minute[p][1][i] * w for p, w in weights)
                rates[n] = (m / n, b / (60 * n))
            rows.append(Row(
                key=bytes(member).decode("utf-8", "backslashreplace"),
                messages=msgs[i], bytes=size[i], refused=refused_counts[i],
                messages_per_min_1m=rates[1][0], bytes_per_sec_1m=rates[1][1],
                messages_per_min_5m=rates[5][0], bytes_per_sec_5m=rates[5][1],
            ))
        rows.sort(key=lambda r: (-r.bytes, -(r.refused or 0), r.key))
        return rows


def _counts(scores: list[float | None]) -> list[int]:
    return [int(s or 0) for s in scores]


GDBM_DIMENSIONS = ("dest", "rcpt")


def gdbm_rows(path: Path, by: str, top: int) -> list[Row]:
    """The `top` keys of one kind (`dest` or `rcpt`) of a GDBM log, by bytes."""
    try:
        totals = read_log(path)
    except GdbmLogError as exc:
        raise Unavailable(str(exc)) from None
    prefix = f"{by}:"
    rows = [
        Row(key=key[len(prefix):], messages=t.messages, bytes=t.size,
            first_seen=t.first_seen, last_seen=t.last_seen)
        for key, t in totals.items()
        if key.startswith(prefix)
    ]
    rows.sort(key=lambda r: (-r.bytes, r.key))
    return rows[:top]
