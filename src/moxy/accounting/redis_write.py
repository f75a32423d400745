"""Writing the Redis sink's summed counters: one Lua script call per `batch_size` counters.

A counter is a member's score in a sorted set (the key schema is in counters.py), and Redis
adds to one score per ZINCRBY. Sent as a pipeline, every ZINCRBY costs redis-py some 4-5 µs
of Python on the client (queueing, packing, parsing and converting its reply); traffic from
many senders to many recipients makes a couple of dozen new counters per message, so the
accounting process spent more on that than on everything else together. The script takes a
whole chunk as one command (packed by hiredis) and answers once: under 1 µs per counter on the
client, and Redis does the same ZINCRBYs. A chunk runs as one script, so a chunk is added
whole or not at all: a connection lost before the answer leaves nothing half written.

A Redis that refuses scripts (an ACL without `@scripting`, or EVAL renamed away) gets the
same commands as a pipeline instead, from then on; that is logged once.

Either way a counter whose key Redis refuses (another program's key of another type under
`key_prefix`) is skipped and reported, not retried: retrying the chunk would count the rest
of it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import redis
from hiredis import pack_command  # redis[hiredis] (pyproject.toml)
from redis.exceptions import BusyLoadingError, NoScriptError, OutOfMemoryError, ReadOnlyError

from moxy.logsetup import plural

log = logging.getLogger("moxy.accounting")

# Per key, per member: what to add to the member's score.
Chunk = Mapping[str, Mapping[str, int]]

# KEYS: each counter's key (a key's counters one after the other), then the keys to expire;
# ARGV: the number of counters n, the most members a key keeps (0: no limit), the n amounts,
# the n members, then each expiring key's EXPIREAT time. Returns how many counters Redis
# refused and the first refusal; fails whole (an error reply) when Redis refuses writes at all
# (OOM, READONLY, ...), which it decides once, before a script's first write: then nothing
# was written.
ADD_SCRIPT = """
local n, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
local refused, first, written = 0, '', 0
for i = 1, n do
  local r = redis.pcall('ZINCRBY', KEYS[i], ARGV[2 + i], ARGV[2 + n + i])
  if type(r) == 'table' and r.err then
    if written == 0 and string.sub(r.err, 1, 9) ~= 'WRONGTYPE' then
      return r
    end
    refused = refused + 1
    if first == '' then first = r.err end
  else
    written = written + 1
  end
end
if keep > 0 then
  for i = 1, n do
    if KEYS[i] ~= KEYS[i - 1] then
      redis.pcall('ZREMRANGEBYRANK', KEYS[i], 0, -keep - 1)
    end
  end
end
for i = n + 1, #KEYS do
  redis.pcall('EXPIREAT', KEYS[i], ARGV[n + i + 2])
end
return {refused, first}
"""


class CounterWriter:
    """Adds chunks of counters to Redis, by script while Redis runs them."""

    def __init__(self, client: redis.Redis, where: str, keep: int = 0) -> None:
        self._client = client
        self._where = where
        self._keep = keep  # max_members: the most members a sorted set keeps (0: no limit)
        self._script = client.register_script(ADD_SCRIPT)  # knows its SHA1
        self.scripted = True  # False once Redis refused the script
        self._refusing = False  # a chunk had refused counters: logged until one has none

    def add(self, chunk: Chunk, expiring: Mapping[str, int]) -> None:
        """Add `chunk` and set `expiring`'s keys to expire (EXPIREAT). Raises redis-py's
        errors when Redis cannot be reached: then nothing of the chunk was added (by script)
        or possibly a part (a pipeline cut off in the middle)."""
        if self.scripted:
            keys: list[Any] = []
            args: list[Any] = [0, self._keep]
            members: list[Any] = []
            for key, scores in chunk.items():
                keys += [key] * len(scores)
                args += scores.values()
                members += scores
            args[0] = len(keys)
            keys += expiring
            args += members
            args += expiring.values()
            try:
                refused, first = self._run(keys, args)
            except redis.ResponseError as exc:
                if not _no_scripts(exc):
                    raise
                self.scripted = False
                log.warning("accounting: %s does not run scripts (%s); writing counters as "
                            "pipelined commands instead", self._where, exc)
            else:
                self._refused(int(refused), first)
                return
        self._pipelined(chunk, expiring)

    def _run(self, keys: list[Any], args: list[Any]) -> Any:
        """EVALSHA, loading the script first where Redis does not know it (a new or
        restarted server); NOSCRIPT means that it did not run."""
        command = pack_command(("EVALSHA", self._script.sha, len(keys), *keys, *args))
        try:
            return self._call(command)
        except NoScriptError:
            self._script.sha = self._client.script_load(ADD_SCRIPT)
            return self._call(command)

    def _call(self, command: bytes) -> Any:
        """One command packed by hiredis, on a connection of the client's pool: redis-py's
        own packing looks at every argument in Python, about 1 µs per counter."""
        pool = self._client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([command])  # type: ignore[no-untyped-call]
            return connection.read_response()
        finally:
            pool.release(connection)

    def _pipelined(self, chunk: Chunk, expiring: Mapping[str, int]) -> None:
        with self._client.pipeline(transaction=False) as pipe:
            for key, scores in chunk.items():
                for member, amount in scores.items():
                    pipe.zincrby(key, amount, member)
            counters = len(pipe)
            if self._keep:
                for key in chunk:
                    pipe.zremrangebyrank(key, 0, -self._keep - 1)
            for key, expiry in expiring.items():
                pipe.expireat(key, expiry)
            replies = pipe.execute(raise_on_error=False)
        errors = [r for r in replies[:counters] if isinstance(r, redis.ResponseError)]
        if len(errors) == counters and not str(errors[0]).startswith("WRONGTYPE"):
            raise errors[0]  # Redis refuses writes at all (OOM, READONLY): none was made
        self._refused(len(errors), str(errors[0]) if errors else "")

    def _refused(self, count: int, first: str | bytes) -> None:
        if count and not self._refusing:
            self._refusing = True
            text = first.decode(errors="replace") if isinstance(first, bytes) else first
            log.error("accounting: %s refused %s of a write and they are lost "
                      "(first: %s); is another program using keys under the key prefix?",
                      self._where, plural(count, "counter"), text)
        elif not count and self._refusing:
            self._refusing = False
            log.warning("accounting: %s takes every counter again", self._where)


def _no_scripts(exc: redis.ResponseError) -> bool:
    """Redis will not run scripts for us at all ("NOPERM ... 'evalsha' command", "unknown
    command 'evalsha'", the same for SCRIPT LOAD), as opposed to a refusal of the moment
    (OOM, READONLY, BUSY), after which the chunk is kept and tried again."""
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError, BusyLoadingError)):
        return False
    text = str(exc).lower()
    if text.startswith(("busy", "masterdown")):
        return False
    return "evalsha" in text or "script" in text
