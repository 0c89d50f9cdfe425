# Bastion: `make serve` installs everything and starts the server; `make test` runs the suite.
SHELL  := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-test node-test-deps system-test-deps serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

# llama-cpp-python compiles llama.cpp for this CPU (-march=native), but without Intel AMX:
# where the CPU reports AMX and the kernel or hypervisor does not enable it, llama.cpp's AMX
# matrix multiply dies of a general-protection fault on the first token. The wheel is built
# once per CPU (the folder's name holds a hash of its flags) and installed from there; pip's
# own wheel cache could not tell a wheel built with these flags from one built without.
LLAMA_VERSION := 0.3.36
CPU_KEY       := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-10)
LLAMA_WHEELS  := $(HOME)/.cache/bastion/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(CPU_KEY)
NO_AMX        := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
# Only the libraries Bastion loads are compiled (deploy/llama-cpp-trim.cmake drops llama.cpp's
# `common`; tools, examples and tests are already off), on every core, with ninja's [n/N]
# progress shown; the whole log is kept next to the wheel.
LLAMA_CMAKE   := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)' \
                 -DCMAKE_PROJECT_INCLUDE=$(CURDIR)/deploy/llama-cpp-trim.cmake

$(LLAMA_WHEELS)/.built: | $(BIN)/python
	mkdir -p $(LLAMA_WHEELS)
	@echo "Compiling llama.cpp for this CPU, once: about 5 minutes on 2 cores (progress below)"
	set -o pipefail; CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/pip wheel -v --no-deps --no-cache-dir -w $(LLAMA_WHEELS) \
	  llama-cpp-python==$(LLAMA_VERSION) 2>&1 | tee $(LLAMA_WHEELS)/build.log \
	  | awk '/^ *\[[0-9]+\/[0-9]+\]/ { f = $$0; \
	      if (match(f, / -c [^ ]+/)) f = substr(f, RSTART + 4, RLENGTH - 4); \
	      else if (match(f, / -o [^ ]+/)) f = substr(f, RSTART + 4, RLENGTH - 4); \
	      sub(/.*vendor\/llama\.cpp\//, "", f); print "  llama.cpp " $$1 " " f; fflush() }'
	$(BIN)/pip install --no-deps --force-reinstall --no-index --find-links $(LLAMA_WHEELS) \
	  llama-cpp-python==$(LLAMA_VERSION)
	touch $@

install: $(BIN)/python $(LLAMA_WHEELS)/.built
	$(BIN)/pip install --find-links $(LLAMA_WHEELS) -e .

install-test: $(BIN)/python system-test-deps $(LLAMA_WHEELS)/.built node-test-deps
	$(BIN)/pip install --find-links $(LLAMA_WHEELS) -e ".[test]"

# The Node.js clients the tests run (the `openai` npm package, pinned in tests/node/package-lock.json)
# go into tests/node/node_modules. Without node/npm those tests are skipped.
node-test-deps:
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix tests/node --no-audit --no-fund; \
	else echo "node/npm are not installed: the Node.js tests will be skipped"; fi

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

bench: $(BIN)/python $(LLAMA_WHEELS)/.built
	$(BIN)/pip install --find-links $(LLAMA_WHEELS) -e ".[bench]"
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) build src/*.egg-info
