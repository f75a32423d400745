"""Blocking lookups in worker threads (moxy.lookup.blocking): a lookup that timed out waiting
for a thread is not blamed on its source."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from moxy.config import load_config
from moxy.lookup.base import LookupFailed
from moxy.lookup.blocking import run_blocking


async def test_a_lookup_that_never_got_a_thread_says_so() -> None:
    limiter = trio.CapacityLimiter(1)
    release = threading.Event()
    slow_started = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def slow() -> str:
        trio.from_thread.run_sync(slow_started.set, trio_token=token)
        release.wait(5)
        return "late"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_blocking(slow, limiter=limiter, timeout=5, what="src"))
        await slow_started.wait()
        with pytest.raises(LookupFailed, match=r"src: not asked within 0.2s: all 1 lookups "
                                               r"at once were busy"):
            await run_blocking(lambda: "quick", limiter=limiter, timeout=0.2, what="src")
        release.set()


async def test_a_source_that_does_not_answer_in_time_is_named() -> None:
    release = threading.Event()
    with pytest.raises(LookupFailed, match=r"^src: no answer within 0.2s$"):
        await run_blocking(lambda: release.wait(5), limiter=trio.CapacityLimiter(1),
                           timeout=0.2, what="src")
    release.set()


def test_lookups_are_configured_per_source(tmp_path: Path) -> None:
    path = tmp_path / "moxy.toml"
    path.write_text('[routes]\nchain = ["redis", "ldap"]\n[routes.redis]\nlookups = 3\n'
                    '[routes.ldap]\nuri = "ldap://127.0.0.1:1"\nbase = "dc=x"\nlookups = 2\n')
    config = load_config(path)
    assert config.routes.redis is not None and config.routes.redis.lookups == 3
    assert config.routes.ldap is not None and config.routes.ldap.lookups == 2
    from moxy.lookup.redis import RedisSource

    assert RedisSource(config.routes.redis)._limiter.total_tokens == 3
    path.write_text('[routes]\nchain = ["redis"]\n[routes.redis]\nlookups = 0\n')
    with pytest.raises(Exception, match="lookups"):
        load_config(path)
