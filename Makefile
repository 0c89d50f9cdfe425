# Bastion: `make serve` installs everything and starts the server; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-test system-test-deps serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e .

install-test: $(BIN)/python system-test-deps
	$(BIN)/pip install -e ".[test]"

# The tests start their own redis-server and PostgreSQL and drive the dashboard in Debian's
# chromium (through Playwright, never `playwright install`); install them where we may (root
# with apt-get). Without them those tests are skipped and the PostgreSQL pass does not run.
system-test-deps:
	@if command -v redis-server >/dev/null 2>&1 && [ -n "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ] \
	  && [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql chromium >/dev/null; } \
	    || echo "could not install redis-server/PostgreSQL/chromium: their tests will be skipped"; \
	else echo "redis-server/PostgreSQL/chromium are not installed: their tests will be skipped"; fi

serve: install
	$(BIN)/bastion serve

# The whole suite runs twice: on SQLite, then on PostgreSQL where it is installed.
test: install-test
	$(BIN)/python -m pytest
	@if [ -n "$$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null)" ]; then \
	  echo "--- the same suite on PostgreSQL ---"; BASTION_TEST_DB=postgres $(BIN)/python -m pytest; \
	else echo "PostgreSQL is not installed: the PostgreSQL pass is skipped"; fi

bench: $(BIN)/python
	$(BIN)/pip install -e ".[bench]"
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) build src/*.egg-info
