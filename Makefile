# Two commands for a newcomer: `make run` and `make test`. Both work on a fresh machine
# with only Python 3.11 and Node 20 (make test installs redis-server, prometheus and chromium
# with apt-get if absent).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JS_STAMP := tests/js/node_modules/.installed
PYTEST_ARGS ?=
# The benchmark suite has its own venv: the server's pins plus the Flask-SocketIO baseline.
BENCH_VENV := bench/.venv
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

.PHONY: run test test-cluster test-quick test-unit test-integration redis-server prometheus chromium venv js clean lint bench soak

run: $(STAMP)
	$(PY) -m sockudo $(ARGS)

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

$(JS_STAMP): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

js: $(JS_STAMP)

# The suite starts its own throwaway redis-server on a free port; this only makes sure
# the binary exists.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null \
	  || { echo "make: could not install redis-server"; exit 1; }; }

# The observability tests start their own Prometheus (and run promtool); this only makes sure
# Debian's package is there.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing prometheus with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >/dev/null \
	  || { echo "make: could not install prometheus"; exit 1; }; }

# The console's test drives Debian's Chromium through Selenium (chromium-driver); this only makes
# sure both are there.
chromium:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
	  || { echo "make: could not install chromium"; exit 1; }; }

# Everything but the Redis Cluster tests, which `make test-cluster` runs (CI runs both).
test: $(STAMP) $(JS_STAMP) redis-server prometheus chromium
	$(PY) -m pytest -m "not rediscluster" $(PYTEST_ARGS)

# The tests against a real Redis Cluster the suite starts (3 masters; 3 + 3 replicas for failovers).
test-cluster: $(STAMP) $(JS_STAMP) redis-server
	$(PY) -m pytest -m rediscluster $(PYTEST_ARGS)

test-unit: $(STAMP) redis-server
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Everything but the tests marked slow (outages, soaks, kill -9 runs): a few minutes less.
test-quick: $(STAMP) $(JS_STAMP) redis-server prometheus chromium
	$(PY) -m pytest -m "not slow and not rediscluster" $(PYTEST_ARGS)

test-integration: $(STAMP) $(JS_STAMP) redis-server prometheus chromium
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

$(BENCH_STAMP): requirements.txt bench/requirements.txt
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements.txt
	touch $(BENCH_STAMP)

# Several minutes; BENCH_ARGS="--quick" for a ~2 minute smoke run, or name scenarios.
bench: $(BENCH_STAMP) $(JS_STAMP) redis-server
	$(BENCH_VENV)/bin/python -m bench $(BENCH_ARGS)

# Two nodes and Redis under connection, subscription and presence churn plus publishes, then
# checks that every bookkeeping returns to empty and RSS to baseline (tests/soak.py). 30 minutes
# by default; `make test` runs a short variant (tests/integration/test_soak.py, SOAK_CI_SECONDS).
SOAK_SECONDS ?= 1800
soak: $(STAMP) redis-server
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m tests.soak

# ruff (style, imports, bug patterns) and mypy (types), both configured in pyproject.toml and
# pinned in requirements-dev.txt; CI runs this before the tests.
lint: $(STAMP)
	$(PY) -m ruff check sockudo workers bench tests
	$(PY) -m mypy

clean:
	rm -rf $(VENV) $(BENCH_VENV) tests/js/node_modules .pytest_cache .ruff_cache .mypy_cache
