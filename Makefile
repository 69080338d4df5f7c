# Two commands for a fresh machine: `make setup`, then `make demo`. `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test demo demo-smoke

setup: $(BIN)/.installed

# Linux without a GPU (no nvidia-smi): torch's CPU wheel (+cpu), a few hundred MB where PyPI's Linux
# torch is the multi-GB CUDA build. The pin holds: torch==2.13.0 matches 2.13.0+cpu. An unreachable
# index costs TORCH_TIMEOUT seconds, then pip's other sources serve the pin. Override: TORCH_INDEX=
TORCH_INDEX ?= $(shell [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null 2>&1 \
	&& echo https://download.pytorch.org/whl/cpu)
TORCH_TIMEOUT ?= 10
PIP := $(BIN)/pip install --disable-pip-version-check --progress-bar on

# What the programs need (requirements.txt): `make demo`, training, serving.
$(BIN)/.installed: requirements.txt
	@echo "[setup 1/3] virtualenv in $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "[setup 2/3] torch ($(if $(TORCH_INDEX),CPU wheel from $(TORCH_INDEX),the configured index))"
	$(PIP) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --timeout $(TORCH_TIMEOUT) --retries 0) \
		"$$(grep -E '^torch==' requirements.txt | cut -d' ' -f1)"
	@echo "[setup 3/3] the other pinned requirements"
	$(PIP) -r requirements.txt
	@touch $@
	@echo "[setup] done. Enter the environment with:  . $(VENV)/bin/activate"

# The test stack (requirements-dev.txt: pytest, the reference implementations and real clients the
# tests drive), added the first time `make test` runs.
$(BIN)/.installed-dev: $(BIN)/.installed requirements-dev.txt
	@echo "[test setup] the test stack (requirements-dev.txt)"
	$(PIP) -r requirements-dev.txt
	@touch $@

test: $(BIN)/.installed-dev
	$(BIN)/python -m pytest

# The bundled demo (demo.py): tokenize, pretrain a tiny GPT on CPU, instruction-tune, serve the chat page.
# A second run reuses finished stages. Extra flags: make demo DEMO_ARGS="--port 8000" (python demo.py --help).
demo: setup
	$(BIN)/python demo.py $(DEMO_ARGS)

# A few steps per stage, one POST /generate against the served model, then shut down (what CI can run).
demo-smoke: setup
	$(BIN)/python demo.py --smoke $(DEMO_ARGS)

.PHONY: serve-prod

# Production: nginx on ADDRESS:PORT in front of gunicorn (gunicorn.conf.py starts and stops it; nginx.conf).
# make serve-prod CKPT=out/dolly PORT=8000 [ADDRESS=0.0.0.0]; run files in out/prod. README "Production".
PORT ?= 8000
ADDRESS ?= 127.0.0.1
serve-prod: setup
	@test -n "$(CKPT)" || { echo "error: name the checkpoint: make serve-prod CKPT=out/dolly PORT=8000" >&2; exit 2; }
	GPT2I_CKPT="$(CKPT)" GPT2I_NGINX_LISTEN="$(ADDRESS):$(PORT)" exec $(BIN)/gunicorn -c gunicorn.conf.py "serve:create_app()"
