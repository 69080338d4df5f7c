"""serve.py configuration (flags, GPT2I_* environment variables, gunicorn.conf.py) and the helpers
the other test_serve_* files share: a tiny random checkpoint, free ports, a live server, SSE parsing."""

import json
import os
import runpy
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, tiny_config
from model import GPT

import serve
from checkpoint import save_checkpoint
from common import UserError

# ---------------------------------------------------------------------- shared helpers


def make_checkpoint(folder, **overrides):
    """A tiny GPT with random weights saved as an sft checkpoint; returns the ckpt.pt path."""
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    model = GPT(cfg)
    return save_checkpoint(os.path.join(folder, "ckpt.pt"), kind="sft", model_state=model.state_dict(),
                           config=cfg.to_dict(), step=0)


def make_app(ckpt, **overrides):
    """create_app with a loaded model (rate limiting off unless asked); close with close_app."""
    config = {"ckpt": ckpt, "rate_limit": "none", "log_level": "info", **overrides}
    app = serve.create_app(config)
    assert app.extensions["gpt2i"].engine.wait_ready(120), app.extensions["gpt2i"].engine.error
    return app


def close_app(app):
    app.extensions["gpt2i"].close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app on 127.0.0.1:<free port> in a thread (werkzeug's threaded server, as `python serve.py`)."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.app = app
        self.server = make_server("127.0.0.1", free_port(), app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        close_app(self.app)


def sse_events(text):
    """Parse an SSE body into the list of its data payloads (str), checking the framing."""
    assert text.endswith("\n\n"), text[-80:]
    out = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(line.startswith(("data: ", ":")) for line in lines), block
        data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        if data:
            out.append("\n".join(data))
    return out


def metric(text, name):
    """The value of an unlabelled Prometheus sample, or of `name{labels}` given in full."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


# ---------------------------------------------------------------------- configuration


def test_config_from_env_and_dict_types():
    env = {"GPT2I_CKPT": "x/ckpt.pt", "GPT2I_PORT": "8080", "GPT2I_CORS_ORIGINS": "http://a.example, http://b.example",
           "GPT2I_MAX_QUEUE": "3", "GPT2I_RATE_LIMIT": "none", "GPT2I_API_KEY": "k", "GPT2I_TRUST_PROXY": "1"}
    cfg = serve.make_config(environ=env)
    assert (cfg.ckpt, cfg.port, cfg.max_queue, cfg.api_key, cfg.trust_proxy) == ("x/ckpt.pt", 8080, 3, "k", 1)
    assert cfg.cors_origins == ["http://a.example", "http://b.example"]
    assert not serve.rate_limit_enabled(cfg)
    # explicit values win over the environment
    cfg = serve.make_config({"port": "9000", "max_queue": 5}, environ=env)
    assert (cfg.port, cfg.max_queue, cfg.ckpt) == (9000, 5, "x/ckpt.pt")
    # a dict config alone ignores the environment
    assert serve.make_config({"ckpt": "y"}).max_queue == serve.ServeConfig().max_queue


@pytest.mark.parametrize("values, env, needle", [
    ({}, {}, "no checkpoint"),
    ({"ckpt": "x"}, {"GPT2I_PORT": "abc"}, "GPT2I_PORT"),
    ({"ckpt": "x", "rate_limit": "lots"}, {}, "invalid rate limit"),
    ({"ckpt": "x", "rate_limit_storage": "redis"}, {}, "rate-limit-storage"),
    ({"ckpt": "x", "max_queue": 0}, {}, "max-queue"),
    ({"ckpt": "x", "colour": "red"}, {}, "unknown serve config key"),
    ({"ckpt": "x", "log_level": "loud"}, {}, "log-level"),
])
def test_config_errors_are_one_line_user_errors(values, env, needle):
    with pytest.raises(UserError, match=needle):
        serve.make_config(values, environ=env)


def test_help_lists_flags_and_env_vars(capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag, env in (("--rate-limit", "GPT2I_RATE_LIMIT"), ("--rate-limit-storage", "GPT2I_RATE_LIMIT_STORAGE"),
                      ("--cors-origins", "GPT2I_CORS_ORIGINS"), ("--api-key", "GPT2I_API_KEY"),
                      ("--max-queue", "GPT2I_MAX_QUEUE"), ("--trust-proxy", "GPT2I_TRUST_PROXY"),
                      ("--quantize", "GPT2I_QUANTIZE"), ("--ckpt", "GPT2I_CKPT")):
        assert flag in out and env in out


def test_cli_without_checkpoint_fails_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2I_")}
    proc = subprocess.run([sys.executable, "serve.py", "--port", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: no checkpoint: pass --ckpt PATH or set GPT2I_CKPT"]


def test_gunicorn_conf_reads_environment(monkeypatch):
    monkeypatch.setenv("GPT2I_BIND", "127.0.0.1:7001")
    monkeypatch.setenv("GPT2I_WORKERS", "2")
    monkeypatch.setenv("GPT2I_THREADS", "4")
    conf = runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))
    assert conf["bind"] == ["127.0.0.1:7001"]
    assert (conf["workers"], conf["threads"], conf["worker_class"]) == (2, 4, "gthread")
    assert conf["timeout"] >= 60 and conf["graceful_timeout"] >= 30
    monkeypatch.delenv("GPT2I_BIND")
    monkeypatch.setenv("GPT2I_HOST", "0.0.0.0")
    monkeypatch.setenv("GPT2I_PORT", "8000")
    assert runpy.run_path(os.path.join(ROOT, "gunicorn.conf.py"))["bind"] == ["0.0.0.0:8000"]


def test_docstring_documents_every_flag():
    """The README table (serve.py's docstring) has a row for every flag and env var."""
    doc = serve.__doc__
    for name in serve._HELP:
        if name in serve._INTERNAL_ONLY:
            continue
        assert "--" + name.replace("_", "-") in doc, name
        assert serve.env_name(name) in doc, name
    json.dumps(serve.ServeConfig().__dict__)  # plain values only
