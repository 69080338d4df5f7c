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

.PHONY: demo demo-smoke

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
