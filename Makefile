# Ferry developer entry points. `make help` lists them.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help deps venv test test-chaos unit lint demo bench bench-fleet testbed-up testbed-down testbed-status install clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

deps:  ## install the Debian packages the tests and testbed need (root)
	@bash tests/testbed/install-deps.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)  ## create .venv with ferry and its dev tools

unit: venv  ## unit tests only (no root, no testbed)
	$(BIN)/python -m pytest -m 'not testbed and not e2e' $(PYTEST_ARGS)

test: deps venv  ## the whole suite: unit + real Docker/CRIU testbed end-to-end (root)
	@$(BIN)/python -m tests.testbed up --hosts 3
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	  if [ -z "$$KEEP_TESTBED" ]; then $(BIN)/python -m tests.testbed down; fi; exit $$rc

test-chaos: deps venv  ## the chaos suite alone: faults and hostile inputs on the testbed (root)
	@$(BIN)/python -m tests.testbed up --hosts 3
	@rc=0; $(BIN)/python -m pytest -m chaos tests/chaos $(PYTEST_ARGS) || rc=$$?; \
	  if [ -z "$$KEEP_TESTBED" ]; then $(BIN)/python -m tests.testbed down; fi; exit $$rc

lint: venv  ## ruff + mypy
	$(BIN)/ruff check agent tests examples
	$(BIN)/ruff format --check agent tests examples
	$(BIN)/mypy
	$(BIN)/mypy examples/ferry-http-probe/src

testbed-up: deps venv  ## start the namespaced Docker+CRIU hosts (HOSTS=N, default 2)
	$(BIN)/python -m tests.testbed up $(if $(HOSTS),--hosts $(HOSTS))

testbed-down: venv  ## stop the testbed and remove everything it made
	$(BIN)/python -m tests.testbed down

testbed-status: venv  ## JSON description of each testbed host
	$(BIN)/python -m tests.testbed status

demo: deps venv  ## two hosts, two agents: drain host 1 and watch a counter move to host 2
	$(BIN)/python -m tests.demo

bench: deps venv  ## side-by-side benchmarks on the testbed (ratios, idle cost)
	$(BIN)/python -m tests.bench

bench-fleet: venv  ## 200 simulated agents against a local etcd: requests/s, reservation latency, CPU
	$(BIN)/python -m tests.bench_fleet

install:  ## install ferry system-wide with its systemd unit (root; DEPS=system: offline, from distribution packages)
	DEPS=$(or $(DEPS),index) bash systemd/install.sh

clean:  ## remove the virtualenv and caches (not the testbed rootfs cache)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
