# The two commands of the README: `make run` and `make test`.
# Debian's python3 is used for .venv because it has dbm.gnu (python3-gdbm).
PYTHON      ?= /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
CONFIG      ?= examples/moxy.toml
RUN_DEBS    := python3 python3-venv python3-gdbm
TEST_DEBS   := $(RUN_DEBS) postfix swaks libnet-ssleay-perl libio-socket-ssl-perl redis-server slapd ldap-utils openssl
PYTEST_ARGS ?=

.PHONY: run test lint check-config cluster bench run-debs test-debs clean

run: run-debs $(VENV)/.run-installed
	$(VENV)/bin/moxy serve --config $(CONFIG)

test: test-debs $(VENV)/.test-installed lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

# Not part of `make test`: Moxy beside direct delivery, nginx's mail proxy and Haraka (from npm,
# when Node.js 20+ is there); rewrites the "make bench" table in docs/benchmarks.md.
BENCH_DEBS  := nginx-light libnginx-mod-mail
bench: test-debs $(VENV)/.test-installed
	@scripts/ensure-debs $(BENCH_DEBS)
	$(VPY) benchmarks/bench_compare.py $(BENCH_ARGS)

# Two nodes, Redis, slapd and two recording servers on loopback, until Ctrl-C (docs/deploying.md).
cluster: test-debs $(VENV)/.run-installed
	$(VPY) scripts/cluster.py

check-config: run-debs $(VENV)/.run-installed
	$(VENV)/bin/moxy check-config --config $(CONFIG)

# Cheap when nothing is missing (one dpkg-query per package).
run-debs:
	@scripts/ensure-debs $(RUN_DEBS)

test-debs:
	@scripts/ensure-debs $(TEST_DEBS)

$(VPY):
	@scripts/ensure-debs $(RUN_DEBS)
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
	@touch $@

$(VENV)/.test-installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@ $(VENV)/.run-installed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
