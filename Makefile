# The two commands of the README: `make run` and `make test`.
# Debian's python3 is used for .venv because it has dbm.gnu (python3-gdbm).
PYTHON      ?= /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
CONFIG      ?= examples/moxy.toml
# gcc and python3-dev: the native build (setup.py, docs/architecture.md).
RUN_DEBS    := python3 python3-venv python3-gdbm gcc python3-dev
TEST_DEBS   := $(RUN_DEBS) postfix swaks libnet-ssleay-perl libio-socket-ssl-perl redis-server slapd ldap-utils openssl
PYTEST_ARGS ?=

.PHONY: run test lint native check-config cluster bench run-debs test-debs clean

run: run-debs $(VENV)/.run-installed $(VENV)/.native
	$(VENV)/bin/moxy serve --config $(CONFIG)

test: test-debs $(VENV)/.test-installed $(VENV)/.native lint
	MOXY_EXPECT_NATIVE=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/mypy

# Not part of `make test`: Moxy beside direct delivery, nginx's mail proxy and Haraka (from npm,
# when Node.js 20+ is there); rewrites the "make bench" table in docs/benchmarks.md.
BENCH_DEBS  := nginx-light libnginx-mod-mail
bench: test-debs $(VENV)/.test-installed $(VENV)/.native
	@scripts/ensure-debs $(BENCH_DEBS)
	$(VPY) benchmarks/bench_compare.py $(BENCH_ARGS)

# Two nodes, Redis, slapd and two recording servers on loopback, until Ctrl-C (docs/deploying.md).
cluster: test-debs $(VENV)/.run-installed $(VENV)/.native
	$(VPY) scripts/cluster.py

check-config: run-debs $(VENV)/.run-installed $(VENV)/.native
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

# The `native` extra: mypy (mypyc) and what it needs, for the native build below.
$(VENV)/.run-installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[native]'
	@touch $@

# The native build: the hot path's modules (src/moxy/native.py) compiled in place with mypyc,
# again whenever one of them changes. Built .so files sit beside their sources.
NATIVE_SRC := $(shell $(PYTHON) setup.py --native-sources 2>/dev/null)
native: $(VENV)/.native
$(VENV)/.native: setup.py src/moxy/native.py $(NATIVE_SRC) | $(VENV)/.run-installed
	@echo "native build: compiling $(words $(filter-out %.h,$(NATIVE_SRC))) modules (mypyc, and C; about a minute)"
	@rm -f src/*.so src/moxy/*.so src/moxy/*/*.so
	@mkdir -p build
	@MOXY_NATIVE=1 $(VPY) setup.py build_ext --inplace > build/native.log 2>&1 \
	    || { tail -30 build/native.log; echo "native build failed: build/native.log"; exit 1; }
	@touch src/*.so src/moxy/*.so src/moxy/*/*.so $@  # build_ext keeps an unchanged file's old date

$(VENV)/.test-installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e '.[test,native]'
	@touch $@ $(VENV)/.run-installed

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
	rm -f src/*.so src/moxy/*.so src/moxy/*/*.so
