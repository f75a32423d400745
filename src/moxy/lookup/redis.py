"""Redis routes (redis-py): `<prefix>route:<key>` holds the destinations in routes-file syntax.

Besides the source, this module holds the operator's side (set, delete, list, import, each change
announced on a pub/sub channel) and the listener that turns those announcements into cache
invalidations on every node, so a route change is obeyed cluster-wide at once.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from moxy.lookup.base import MAX_VALUE as MAX_VALUE  # re-exported: the cap, checked at each GET
from moxy.lookup.base import (
    BadRouteData,
    DestinationGroup,
    LookupFailed,
    parse_destinations,
)
from moxy.lookup.blocking import run_blocking
from moxy.lookup.file import FileSource, parse_key
from moxy.lookup.settings import RedisSettings as RedisSettings  # re-exported with its source
from moxy.lookup.settings import host_port

log = logging.getLogger("moxy.lookup")

_IMPORT_BATCH = 1000


def connect(settings: RedisSettings, *, retries: int = 1) -> redis.Redis:
    """A redis-py client for `settings` (its connection pool is thread-safe; no I/O yet).

    `retries` is how often a command is retried on a fresh connection after a connection error:
    once covers a pooled connection that died with a restarted server, without making callers
    wait through a long backoff while Redis is really down.
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "retry": Retry(NoBackoff(), retries),
    }
    if not settings.sentinel_master:
        return redis.Redis.from_url(settings.url, **options)
    from redis.connection import SSLConnection, parse_url

    url_options = parse_url(settings.url)  # type: ignore[no-untyped-call]
    url_options.pop("host", None)
    url_options.pop("port", None)
    if url_options.pop("connection_class", None) is SSLConnection:
        url_options["ssl"] = True
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        [host_port(a) for a in settings.sentinels],
        sentinel_kwargs={k: v for k, v in options.items() if k.startswith("socket_")},
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.sentinel_master, **url_options, **options
    )
    return client


def where(settings: RedisSettings) -> str:
    """Where Redis is, for messages: the URL without its password."""
    if settings.sentinel_master:
        return f"Redis master {settings.sentinel_master!r} via {', '.join(settings.sentinels)}"
    scheme, sep, rest = settings.url.partition("://")
    _credentials, at, location = rest.rpartition("@")
    return f"Redis {scheme}{sep}{location}" if at else f"Redis {settings.url}"


# --- the source ------------------------------------------------------------------------------


class RedisSource:
    """A `RouteSource` reading `<key_prefix>route:<key>` with GET, in worker threads."""

    def __init__(
        self,
        settings: RedisSettings,
        *,
        name: str = "redis",
        client: redis.Redis | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.client = client if client is not None else connect(settings)
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(settings.lookups)
        self._where = where(settings)

    async def lookup(self, key: str) -> tuple[DestinationGroup, ...] | None:
        return await run_blocking(
            functools.partial(self._get_groups, key),
            limiter=self._limiter,
            # The thread's socket timeout covers connect and read; a retry may double that.
            timeout=self.settings.timeout * 2,
            what=self._where,
        )

    def _get_groups(self, key: str) -> tuple[DestinationGroup, ...] | None:
        """In the worker thread, parsing included: a value of 64 KiB takes milliseconds to
        parse, which the event loop's sessions would wait."""
        raw = self._get(key)
        if raw is None:
            return None
        if len(raw) > MAX_VALUE:
            raise BadRouteData(f"{self.settings.route_key(key)} holds {len(raw)} octets, more "
                               f"than a route may ({MAX_VALUE})")
        try:
            return parse_destinations(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            shown = repr(raw) if len(raw) <= 200 else f"{raw[:200]!r}..."
            raise BadRouteData(f"{self.settings.route_key(key)} = {shown}: {exc}") from None

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self.client.close)

    def _get(self, key: str) -> bytes | None:
        try:
            value = self.client.get(self.settings.route_key(key))
        except redis.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):
                raise BadRouteData(f"{self.settings.route_key(key)} is not a string") from None
            raise LookupFailed(f"{self._where}: {exc}") from None
        except redis.RedisError as exc:
            raise LookupFailed(f"{self._where}: {exc}") from None
        assert value is None or isinstance(value, bytes)  # decode_responses is off
        return value


# --- the operator's side: every change is published, so every node forgets the key ----------


def _key(text: str) -> str:
    """A key as a routes file would have it (lower case, no trailing dot); ValueError if bad."""
    if not text.strip():
        raise ValueError("empty key")
    return parse_key(text.strip())


def _canonical(groups: tuple[DestinationGroup, ...]) -> str:
    return " ".join(str(g) for g in groups)


def route_set(
    client: redis.Redis, settings: RedisSettings, key: str, destinations: str
) -> tuple[DestinationGroup, ...]:
    """Store `destinations` (routes-file syntax, validated) for `key` and announce the change.

    Raises ValueError for a bad key or destination, before anything is written. The key is
    normalised as in a routes file (lower case, no trailing dot). The value is
    stored in canonical form; set and announcement go in one MULTI/EXEC.
    """
    key = _key(key)
    groups = parse_destinations(destinations)
    with client.pipeline(transaction=True) as pipe:
        pipe.set(settings.route_key(key), _canonical(groups))
        pipe.publish(settings.channel, key)
        pipe.execute()
    return groups


def route_del(client: redis.Redis, settings: RedisSettings, key: str) -> bool:
    """Delete the route for `key` and announce it; False if there was none."""
    key = _key(key)
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(settings.route_key(key))
        pipe.publish(settings.channel, key)
        deleted, _ = pipe.execute()
    return bool(deleted)


def route_list(
    client: redis.Redis, settings: RedisSettings, pattern: str = "*"
) -> Iterator[tuple[str, str]]:
    """Yield (key, stored value) for every route whose key matches the glob `pattern`.

    Uses SCAN (never KEYS, which would stall Redis on a large database), so the order is
    arbitrary, and a key changed during the scan may be missed or seen twice.
    """
    prefix = settings.route_key("")
    match = _glob_escape(prefix) + pattern
    batch: list[bytes] = []
    for name in client.scan_iter(match=match, count=1000):
        batch.append(name)
        if len(batch) >= _IMPORT_BATCH:
            yield from _fetch_values(client, prefix, batch)
            batch = []
    yield from _fetch_values(client, prefix, batch)


def _fetch_values(
    client: redis.Redis, prefix: str, names: list[bytes]
) -> Iterator[tuple[str, str]]:
    if not names:
        return
    for name, value in zip(names, client.mget(names), strict=True):
        if value is None:  # deleted since the scan saw it
            continue
        key = name.decode("utf-8", "backslashreplace")[len(prefix) :]
        text = value if isinstance(value, str) else value.decode("utf-8", "backslashreplace")
        yield key, text


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def route_import(
    client: redis.Redis, settings: RedisSettings, routes_file: str | os.PathLike[str]
) -> int:
    """Store every route of a routes file, announcing each key; return how many.

    The whole file is read and validated first (`RoutesFileError` naming every bad line, or an
    unreadable file; nothing is written then). Keys in Redis that
    the file does not mention are left alone. Writes are pipelined in batches.
    """
    routes = list(FileSource.open(Path(routes_file)).routes.items())
    for start in range(0, len(routes), _IMPORT_BATCH):
        with client.pipeline(transaction=False) as pipe:
            for key, groups in routes[start : start + _IMPORT_BATCH]:
                pipe.set(settings.route_key(key), _canonical(groups))
                pipe.publish(settings.channel, key)
            pipe.execute()
    return len(routes)


# --- every node: route changes become cache invalidations ------------------------------------


async def listen_for_changes(
    settings: RedisSettings,
    on_change: Callable[[str], object],
    on_resync: Callable[[], object],
    *,
    retry_interval: float = 1.0,
    poll_interval: float = 1.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Call `on_change(key)` for every key announced on `settings.channel`, forever.

    Each time the subscription is (re)established, `on_resync()` is called first: announcements
    made while this node was not subscribed are lost, so everything cached must be forgotten.
    A lost connection is logged once, retried every `retry_interval` seconds, and its recovery
    logged. Reports started after the first subscription attempt, successful or not, so a node
    whose Redis is down still starts.

    The subscriber blocks in a worker thread for at most `poll_interval` per call, and returns
    as soon as a message arrives; on cancellation that thread is abandoned and ends by itself.
    """
    client = connect(settings, retries=0)
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]
    limiter = trio.CapacityLimiter(1)  # its own: never competes with lookups for threads
    location = where(settings)

    async def in_thread(call: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(call, limiter=limiter, abandon_on_cancel=True)

    started = False
    failing = False
    try:
        while True:
            try:
                if not pubsub.subscribed:
                    await in_thread(functools.partial(pubsub.subscribe, settings.channel))
                message = await in_thread(
                    functools.partial(pubsub.get_message, timeout=poll_interval)
                )
            except redis.RedisError as exc:
                if not failing:
                    log.error(
                        "route change channel on %s unavailable, retrying every %gs: %s",
                        location,
                        retry_interval,
                        exc,
                    )
                    failing = True
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(retry_interval)
                continue
            if message is None:
                continue
            if message["type"] == "subscribe":
                # A first subscription, or redis-py's resubscription after reconnecting.
                on_resync()
                if failing:
                    log.warning("route change channel on %s is back; route cache cleared", location)
                    failing = False
                if not started:
                    task_status.started()
                    started = True
            elif message["type"] == "message":
                on_change(message["data"].decode("utf-8", "backslashreplace"))
    finally:
        # Not through `limiter`: an abandoned get_message may still hold it for a moment.
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await trio.to_thread.run_sync(pubsub.close, abandon_on_cancel=True)
            await trio.to_thread.run_sync(client.close, abandon_on_cancel=True)
