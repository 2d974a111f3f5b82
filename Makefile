# Two commands for a newcomer: `make run` and `make test`. Both work on a fresh machine
# with only Python 3.11 and Node 20 (make test installs redis-server with apt-get if absent).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JS_STAMP := tests/js/node_modules/.installed
PYTEST_ARGS ?=

.PHONY: run test test-unit test-integration redis-server venv js clean lint bench

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

test: $(STAMP) $(JS_STAMP) redis-server
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP) $(JS_STAMP) redis-server
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) tests/js/node_modules .pytest_cache
