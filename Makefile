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

# The replica tests start their own redis-server; install it where we may (root with apt-get).
system-test-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else echo "redis-server is not installed: the Redis tests will be skipped"; fi; }

serve: install
	$(BIN)/bastion serve

test: install-test
	$(BIN)/python -m pytest

bench: $(BIN)/python
	$(BIN)/pip install -e ".[bench]"
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) build src/*.egg-info
