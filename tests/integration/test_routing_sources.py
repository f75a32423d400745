"""Every route source through `moxy serve` as a process: a real redis-server, slapd and GDBM file
route each message to a recording upstream; route changes, backend outages and bad data as the
sender sees them."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from moxy.lookup.redis import RedisSettings, route_set
from peers.moxy import MoxyProcess
from peers.recorder import Recorder
from peers.redis_server import RedisServer
from peers.slapd import ROUTES_BASE, Slapd

from .helpers import Outcome, send_one

MakeRecorder = Callable[..., Recorder]
StartProcess = Callable[..., MoxyProcess]

# Long enough that only an invalidation explains a new destination within a test.
LONG_CACHE = {"ttl": 300.0, "negative_ttl": 300.0}
# Every lookup asks the backend, and nothing stale may stand in while it is down.
NO_CACHE = {"ttl": 0, "negative_ttl": 0, "stale_grace": 0}


def moxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moxy", *args], capture_output=True, text=True, timeout=60
    )


def redis_table(server: RedisServer) -> dict[str, Any]:
    return {"routes.redis": {"url": server.url}}


def ldap_table(server: Slapd) -> dict[str, Any]:
    return {"routes.ldap": {"uri": server.uri, "base": ROUTES_BASE, "timeout": 2.0}}


def node(process: MoxyProcess) -> tuple[str, int]:
    return (process.host, process.port)


async def send(process: MoxyProcess, rcpts: Sequence[str]) -> Outcome:
    return await send_one(node(process), rcpts)


def delivered_to(recorder: Recorder) -> list[list[str]]:
    """The recipients of each message `recorder` accepted."""
    return [message.rcpts for message in recorder.delivered]


async def until_delivered(
    process: MoxyProcess, rcpt: str, recorder: Recorder, timeout: float = 10.0
) -> None:
    """Send to `rcpt` through `process` until a message for it reaches `recorder`: a change
    propagates in well under a second, but the test does not bet on how fast."""
    with trio.move_on_after(timeout):
        while [rcpt] not in delivered_to(recorder):
            await send(process, [rcpt])
            await trio.sleep(0.02)
        return
    raise AssertionError(
        f"no message for {rcpt} reached {recorder.name} within {timeout}s\n{process.stderr()}"
    )


def assert_rcpt_reply(outcome: Outcome, code: int, enhanced: str) -> None:
    [reply] = outcome.rcpt
    assert (reply.code, reply.text.split()[0]) == (code, enhanced), outcome.transcript


# --- each source ---------------------------------------------------------------------------


async def test_redis_routes_set_with_moxy_route_set(
    moxy_process: StartProcess, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    upstream = make_recorder()
    server = moxy_process("", routes={"chain": ["redis"]}, **redis_table(redis_server))
    done = moxy("route", "set", "-c", str(server.config_path), "customer.example", upstream.address)
    assert done.returncode == 0, done.stderr
    outcome = await send(server, ["user@customer.example"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert delivered_to(upstream) == [["user@customer.example"]]


async def test_ldap_routes(
    moxy_process: StartProcess, make_recorder: MakeRecorder, slapd: Slapd
) -> None:
    upstream = make_recorder()
    slapd.add_route("customer.example", upstream.address)
    server = moxy_process("", routes={"chain": ["ldap"]}, **ldap_table(slapd))
    outcome = await send(server, ["user@customer.example"])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert delivered_to(upstream) == [["user@customer.example"]]


async def test_gdbm_routes_and_a_rebuilt_database_is_followed_at_once(
    moxy_process: StartProcess, make_recorder: MakeRecorder, tmp_path: Path
) -> None:
    old, new = make_recorder(), make_recorder()
    routes = tmp_path / "routes"
    routes.write_text(f"customer.example  {old.address}\n")
    assert moxy("makedb", str(routes)).returncode == 0
    server = moxy_process(
        "",
        routes={"chain": ["gdbm"]},
        **{"routes.gdbm": {"path": str(tmp_path / "routes.db"), "reload_interval": 0.1}},
        **{"routes.cache": LONG_CACHE},
    )
    await send(server, ["user@customer.example"])  # every key it tries is now cached
    assert delivered_to(old) == [["user@customer.example"]]

    routes.write_text(f"customer.example  {new.address}\n")
    done = moxy("makedb", str(routes))
    assert (done.returncode, done.stdout) == (0, f"moxy: {routes}.db: 1 routes from {routes}\n")
    await until_delivered(server, "user@customer.example", new)


async def test_an_edited_routes_file_is_followed_at_once(
    moxy_process: StartProcess, make_recorder: MakeRecorder
) -> None:
    old, new = make_recorder(), make_recorder()
    server = moxy_process(
        {"customer.example": old},
        routes={"reload_interval": 0.1},
        **{"routes.cache": LONG_CACHE},
    )
    await send(server, ["user@customer.example"])  # every key it tries is now cached
    assert delivered_to(old) == [["user@customer.example"]]
    (server.config_path.parent / "routes").write_text(f"customer.example  {new.address}\n")
    await until_delivered(server, "user@customer.example", new)


async def test_the_chain_is_asked_key_by_key_in_order(
    moxy_process: StartProcess,
    make_recorder: MakeRecorder,
    redis_server: RedisServer,
    slapd: Slapd,
    tmp_path: Path,
) -> None:
    # Each recipient's most specific key is in a different source; every key is also in a
    # later source, pointing at `shadowed`, which must never be used.
    in_redis, in_ldap, in_gdbm, in_file, shadowed = (make_recorder() for _ in range(5))
    route_set(redis_server.client(), RedisSettings(url=redis_server.url), "chain.example",
              in_redis.address)  # fmt: skip
    slapd.add_route("chain.example", shadowed.address)
    slapd.add_route("boss@chain.example", in_ldap.address)
    (tmp_path / "gdbm-routes").write_text(
        f".chain.example  {in_gdbm.address}\nboss@chain.example  {shadowed.address}\n"
    )
    assert moxy("makedb", str(tmp_path / "gdbm-routes")).returncode == 0
    server = moxy_process(
        {"*": in_file, ".chain.example": shadowed},
        routes={"chain": ["redis", "ldap", "gdbm", "file"]},
        **redis_table(redis_server),
        **ldap_table(slapd),
        **{"routes.gdbm": {"path": str(tmp_path / "gdbm-routes.db")}},
    )
    outcome = await send(
        server,
        ["user@chain.example", "boss@chain.example", "x@sub.chain.example", "x@other.example"],
    )
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert delivered_to(in_redis) == [["user@chain.example"]]
    assert delivered_to(in_ldap) == [["boss@chain.example"]]
    assert delivered_to(in_gdbm) == [["x@sub.chain.example"]]
    assert delivered_to(in_file) == [["x@other.example"]]
    assert shadowed.connections == []
    assert server.stop() == 0, server.stderr()  # closing every backend on the way out
    assert "Traceback" not in server.stderr()


# --- a route change on every node ------------------------------------------------------------


async def test_moxy_route_set_reaches_two_nodes_sharing_one_redis(
    moxy_process: StartProcess, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    old, new = make_recorder(), make_recorder()
    route_set(redis_server.client(), RedisSettings(url=redis_server.url), "customer.example",
              old.address)  # fmt: skip
    sections = {"routes": {"chain": ["redis"]}, "routes.cache": LONG_CACHE}
    nodes = [moxy_process("", **sections, **redis_table(redis_server)) for _ in range(2)]
    for number, server in enumerate(nodes, start=1):
        await send(server, [f"node{number}@customer.example"])  # now cached on that node
    assert sorted(delivered_to(old)) == [["node1@customer.example"], ["node2@customer.example"]]

    done = moxy(
        "route", "set", "-c", str(nodes[0].config_path), "customer.example", new.address
    )
    assert (done.returncode, done.stdout) == (0, f"moxy: customer.example -> {new.address}\n")
    for number, server in enumerate(nodes, start=1):
        await until_delivered(server, f"node{number}@customer.example", new)
    assert len(old.delivered) == 2  # each node's next message went to the new place


# --- backends down, and back -----------------------------------------------------------------


async def test_while_redis_is_down_rcpt_is_451_4_4_3_and_mail_flows_after_its_restart(
    moxy_process: StartProcess, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    upstream = make_recorder()
    route_set(redis_server.client(), RedisSettings(url=redis_server.url), "customer.example",
              upstream.address)  # fmt: skip
    server = moxy_process(
        "", routes={"chain": ["redis"]}, **redis_table(redis_server), **{"routes.cache": NO_CACHE}
    )
    await send(server, ["before@customer.example"])
    redis_server.stop()
    for _ in range(3):
        outcome = await send(server, ["during@customer.example"])
        assert_rcpt_reply(outcome, 451, "4.4.3")
    redis_server.start()  # same port, same data
    await until_delivered(server, "after@customer.example", upstream)
    assert delivered_to(upstream) == [["before@customer.example"], ["after@customer.example"]]
    log = server.stderr()
    assert log.count("route source redis is failing") == 1, log  # once per outage
    assert log.count("route source redis answers again") == 1, log


async def test_while_slapd_is_down_rcpt_is_451_4_4_3_and_mail_flows_after_its_restart(
    moxy_process: StartProcess, make_recorder: MakeRecorder, slapd: Slapd
) -> None:
    upstream = make_recorder()
    slapd.add_route("customer.example", upstream.address)
    server = moxy_process(
        "", routes={"chain": ["ldap"]}, **ldap_table(slapd), **{"routes.cache": NO_CACHE}
    )
    await send(server, ["before@customer.example"])
    slapd.stop()
    outcome = await send(server, ["during@customer.example"])
    assert_rcpt_reply(outcome, 451, "4.4.3")
    slapd.start()
    await until_delivered(server, "after@customer.example", upstream)
    assert delivered_to(upstream) == [["before@customer.example"], ["after@customer.example"]]


async def test_a_reload_while_slapd_is_down_keeps_the_cached_routes_serving(
    moxy_process: StartProcess, make_recorder: MakeRecorder, slapd: Slapd
) -> None:
    """SIGHUP built an empty route cache: during an outage, routes the cache would have served
    for `stale_grace` turned into 451 4.4.3 for everyone at the reload."""
    upstream = make_recorder()
    slapd.add_route("customer.example", upstream.address)
    server = moxy_process("", routes={"chain": ["ldap"]}, **ldap_table(slapd))
    await send(server, ["before@customer.example"])
    slapd.stop()
    server.process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        while "reloaded" not in server.stderr():
            await trio.sleep(0.05)
    outcome = await send(server, ["before@customer.example"])  # its keys are cached
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert delivered_to(upstream) == [["before@customer.example"]] * 2


# --- bad data, hostile addresses ----------------------------------------------------------------


async def test_a_malformed_route_is_451_4_3_0_for_its_recipient_only(
    moxy_process: StartProcess, make_recorder: MakeRecorder, redis_server: RedisServer
) -> None:
    upstream = make_recorder()
    redis_server.client().set("moxy:route:bad.example", "mx.bad.example:0")
    route_set(redis_server.client(), RedisSettings(url=redis_server.url), "good.example",
              upstream.address)  # fmt: skip
    server = moxy_process("", routes={"chain": ["redis"]}, **redis_table(redis_server))
    outcome = await send(server, ["user@bad.example", "user@good.example"])
    bad, good = outcome.rcpt
    assert (bad.code, bad.text.split()[0]) == (451, "4.3.0"), outcome.transcript
    assert good.code == 250, outcome.transcript
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert delivered_to(upstream) == [["user@good.example"]]
    assert "moxy:route:bad.example" in server.stderr()  # the log names source and key


async def test_ldap_filter_metacharacters_in_a_local_part_match_only_literally(
    moxy_process: StartProcess, make_recorder: MakeRecorder, slapd: Slapd
) -> None:
    domain, boss, weird = make_recorder(), make_recorder(), make_recorder()
    slapd.add_route("esc.example", domain.address)
    slapd.add_route("boss@esc.example", boss.address)
    # As the RCPT command spells it: a quoted local part, `\\` a quoted backslash.
    weird_address = '"we(ir)d*\\\\x"@esc.example'
    slapd.add_route(weird_address, weird.address)
    server = moxy_process("", routes={"chain": ["ldap"]}, **ldap_table(slapd))
    # Unescaped in the filter, each of these would match boss@ (a substring filter) or break
    # the filter; escaped, none matches an entry, and the domain's route applies.
    hostile = [
        "b*@esc.example",
        "*@esc.example",
        '"*)(moxyRouteKey=*"@esc.example',
        '"boss)"@esc.example',
        '"(boss"@esc.example',
        '"boss\\\\"@esc.example',
    ]
    outcome = await send(server, [*hostile, weird_address])
    assert outcome.final is not None and outcome.final.code == 250, outcome.transcript
    assert delivered_to(domain) == [hostile]
    assert delivered_to(weird) == [[weird_address]]
    assert boss.connections == []
