# Two commands for a fresh machine: `make setup`, then `make demo`. `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test

setup: $(BIN)/.installed

$(BIN)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.txt -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest
