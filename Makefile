# Bastion: `make serve` installs everything and starts the server; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install install-test serve test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e .

install-test: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

serve: install
	$(BIN)/bastion serve

test: install-test
	$(BIN)/python -m pytest

bench: $(BIN)/python
	$(BIN)/pip install -e ".[bench]"
	$(BIN)/python bench/serving.py

clean:
	rm -rf $(VENV) build src/*.egg-info
