"""serve.py configuration (flags, GPT2I_* environment variables), fail-fast startup, and the helpers
the other test_serve_* files share: a tiny random checkpoint, free ports, a live server, SSE parsing."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, tiny_config
from model import GPT

import serve
from checkpoint import save_checkpoint
from common import UserError
from server.config import allowed_hosts, limit_enabled
from server.options import OPTIONS, env_name

# ---------------------------------------------------------------------- shared helpers


def make_checkpoint(folder, **overrides):
    """A tiny GPT with random weights saved as an sft checkpoint; returns the ckpt.pt path."""
    torch.manual_seed(0)
    cfg = tiny_config(**overrides)
    return save_checkpoint(os.path.join(folder, "ckpt.pt"), kind="sft", model_state=GPT(cfg).state_dict(),
                           config=cfg.to_dict(), step=0)


def make_app(ckpt, **overrides):
    """create_app with its model loaded (rate limiting off unless asked); close with close_app."""
    app = serve.create_app({"ckpt": ckpt, "rate_limit": "none", **overrides})
    assert serve.state(app).wait_ready(120)
    return app


def close_app(app):
    serve.state(app).close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """An app served on 127.0.0.1:<free port> by the server `python serve.py` runs (bounded thread pool)."""

    def __init__(self, app, threads=8):
        self.app, self.state = app, serve.state(app)
        self.httpd = serve.PooledServer("127.0.0.1", 0, app, threads)
        self.port = self.httpd.port
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def request(self, method, path, body=None, headers=None):
        return fetch(self.port, method, path, body, headers)

    def health(self):
        return json.loads(self.request("GET", "/health")[2])

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        close_app(self.app)


def fetch(port, method, path, body=None, headers=None):
    """One request on its own connection -> (status, headers, text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def healthy(port):
    try:
        return fetch(port, "GET", "/health")[0] == 200
    except OSError:
        return False


def wait_until(predicate, timeout=120.0):
    """Poll until predicate() is true (a bound on a hang, never an assertion about speed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def sse_events(text):
    """Parse an SSE body into the list of its data payloads (str), checking the framing."""
    assert text.endswith("\n\n"), text[-80:]
    out = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(line.startswith(("data: ", "event: ", ":")) for line in lines), block
        data = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        if data:
            out.append("\n".join(data))
    return out


def metric(text, name):
    """The value of a Prometheus sample given in full (`name{labels}`), or None."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


# ---------------------------------------------------------------------- configuration


def test_config_from_env_and_dict_types(tmp_path):
    env = {"GPT2I_CKPT": str(tmp_path), "GPT2I_PORT": "8080", "GPT2I_CORS_ORIGINS": "http://a.example, http://b.example",
           "GPT2I_MAX_QUEUE": "3", "GPT2I_RATE_LIMIT": "none", "GPT2I_API_KEY": "k", "GPT2I_COMPILE": "0",
           "GPT2I_ALLOWED_HOSTS": "example.com"}
    cfg = serve.make_config(environ=env)
    assert (cfg.port, cfg.max_queue, cfg.api_key, cfg.compile) == (8080, 3, "k", False)
    assert cfg.cors_origins == ["http://a.example", "http://b.example"] and not limit_enabled(cfg.rate_limit)
    assert allowed_hosts(cfg) == {"example.com"}
    cfg = serve.make_config({"port": "9000", "max_queue": 5}, environ=env)  # explicit values win
    assert (cfg.port, cfg.max_queue, cfg.ckpt) == (9000, 5, str(tmp_path))
    assert serve.make_config({"ckpt": "gpt2"}).model_name == "gpt2-instruct"  # a dict alone ignores the env
    hosts = allowed_hosts(serve.make_config({"ckpt": "gpt2", "host": "10.0.0.5"}))
    assert hosts == {"localhost", "127.0.0.1", "[::1]", "10.0.0.5"}
    assert allowed_hosts(serve.make_config({"ckpt": "gpt2", "allowed_hosts": "*"})) is None


@pytest.mark.parametrize("values, env, needle", [
    ({}, {}, "no checkpoint"),
    ({"ckpt": "no/such/ckpt.pt"}, {}, "checkpoint not found"),
    ({"ckpt": "gpt2"}, {"GPT2I_PORT": "abc"}, "GPT2I_PORT"),
    ({"ckpt": "gpt2", "rate_limit": "lots"}, {}, "--rate-limit"),
    ({"ckpt": "gpt2", "rate_limit_storage": "redis"}, {}, "rate-limit-storage"),
    ({"ckpt": "gpt2", "max_queue": 0}, {}, "max-queue"),
    ({"ckpt": "gpt2", "colour": "red"}, {}, "unknown serve option"),
    ({"ckpt": "gpt2", "log_level": "loud"}, {}, "log-level"),
    ({"ckpt": "gpt2", "quantize": "int4"}, {}, "--quantize must be one of none, int8"),
    ({"ckpt": "gpt2", "dtype": "float8"}, {}, "--dtype"),
    ({"ckpt": "gpt2", "device": "tpu"}, {}, "--device"),
    ({"ckpt": "gpt2", "quantize": "int8", "dtype": "bfloat16"}, {}, "int8 runs on CPU in float32"),
])
def test_config_errors_are_one_line_user_errors(values, env, needle):
    with pytest.raises(UserError, match=needle):
        serve.make_config(values, environ=env)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for an absent CUDA")
def test_unusable_device_fails_fast():
    with pytest.raises(UserError, match="CUDA is not available"):
        serve.make_config({"ckpt": "gpt2", "device": "cuda"})


def test_help_lists_flags_and_env_vars(capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in OPTIONS:
        assert "--" + name.replace("_", "-") in out and env_name(name) in out, name


@pytest.mark.parametrize("args, message", [
    ([], "error: no checkpoint: pass --ckpt PATH or set GPT2I_CKPT"),
    (["--ckpt", "missing/ckpt.pt"], "error: checkpoint not found: missing/ckpt.pt"),
    (["--ckpt", "gpt2", "--quantize", "int4"], "error: --quantize must be one of none, int8, got 'int4'"),
    (["--ckpt", "gpt2", "--max-batch", "many"], "error: --max-batch must be an integer, got 'many'"),
    (["--ckpt", "gpt2", "--colour", "red"], "error: unrecognized arguments: --colour red"),
])
def test_cli_fails_fast_in_one_line_before_binding(args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2I_")}
    port = free_port()
    proc = subprocess.run([sys.executable, "serve.py", "--port", str(port), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr


def test_cli_refuses_a_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = subprocess.run([sys.executable, "serve.py", "--ckpt", str(tmp_path), "--port",
                               str(s.getsockname()[1])], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot listen on 127.0.0.1:"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--port" in proc.stderr  # names the fix


def test_cli_with_a_checkpoint_that_cannot_load_exits_2(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint" * 64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPT2I_")}
    proc = subprocess.run([sys.executable, "serve.py", "--ckpt", str(bad), "--port", "0", "--log-level", "warning"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: model load failed: "), proc.stderr
