"""`[server] gil_switch_interval` reaches both of Moxy's processes: the serving one (set by
`moxy serve` before it serves; workers inherit it) and the accounting one (set once it has
read its configuration). Each is run as its own process, stopped at the point where it would
start serving, and says what `sys.getswitchinterval()` is there."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from moxy.accounting import pipe
from moxy.config import load_config

WriteConfig = Callable[..., Path]

SERVING = """
import sys
from moxy import daemon
from moxy.config import load_config

def probe(*args, **kwargs):
    print(sys.getswitchinterval())
    return 0

daemon._serve_here = probe
sys.exit(daemon.run(load_config(sys.argv[1])))
"""

ACCOUNTING = """
import sys
from moxy.accounting import host
from moxy.config import ConfigError

def probe(config):
    print(sys.getswitchinterval(), file=sys.stderr)
    raise ConfigError(["stopped by the test"], config.path)

host.Accounting.from_config = probe
sys.exit(host.main())
"""


def test_moxy_serve_sets_it_before_serving(write_config: WriteConfig) -> None:
    path = write_config({}, server={"gil_switch_interval": 0.003})
    done = subprocess.run([sys.executable, "-c", SERVING, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(0.003)  # Python keeps whole microseconds
    default = write_config({})
    done = subprocess.run([sys.executable, "-c", SERVING, str(default)], capture_output=True,
                          text=True, timeout=60)
    assert float(done.stdout) == pytest.approx(0.0001)  # not Python's 0.005


def test_the_accounting_process_sets_it_from_its_configuration(
    write_config: WriteConfig,
) -> None:
    config = load_config(write_config({}, server={"gil_switch_interval": 0.002}))
    done = subprocess.run([sys.executable, "-c", ACCOUNTING],
                          input=pipe.frame(pipe.CONFIG, pickle.dumps(config)),
                          capture_output=True, timeout=60)
    assert done.returncode == 2  # the probe's ConfigError, as for a sink that cannot be made
    first = done.stderr.decode().splitlines()[0]
    assert float(first) == pytest.approx(0.002)
