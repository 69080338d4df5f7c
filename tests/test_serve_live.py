"""serve.py on a real socket: clients that hang up are cancelled (streaming or not) and their places
come back; shutdown answers queued requests with 503 and ends running streams with a terminal event;
a dead engine process ends what runs with an error and shows in /health;
`python serve.py` itself: one log line per request, no banner, SIGTERM exits cleanly."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import ROOT
from test_serve_config import (LiveServer, fetch, healthy, make_app, make_checkpoint, metric, sse_events,
                               wait_until)

MAX_NEW = 900  # far more than a cancelled request gets to generate


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_live"), block_size=1024)


@pytest.fixture
def live(ckpt):
    server = LiveServer(make_app(ckpt, max_batch=2, max_queue=4, log_level="warning"))
    yield server
    server.close()


def open_request(port, path, body):
    """Send a request on a raw socket and return it (the test decides when to hang up)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(data), data))
    return sock


def read_events(stream, count):
    """Read the status line, then `count` SSE data lines; returns them."""
    assert stream.readline().split()[1] == b"200"
    events = []
    while len(events) < count:
        line = stream.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: "):
            events.append(line)
    return events


def completion_tokens(live):
    return metric(live.request("GET", "/metrics")[2], 'gpt2i_tokens_total{kind="completion"}') or 0


def idle(live):
    q = live.health()["queue"]
    return q["running"] == q["waiting"] == q["slots_used"] == q["admitted"] == 0


LONG = {"prompt": "Tell a long story.", "max_new_tokens": MAX_NEW, "ignore_eos": True}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_is_cancelled(live, stream):
    before = completion_tokens(live)
    sock = open_request(live.port, "/generate", {**LONG, "stream": stream})
    if stream:
        stream_file = sock.makefile("rb")
        read_events(stream_file, 3)
        stream_file.close()
    else:
        assert wait_until(lambda: completion_tokens(live) > before + 3)
    at_close = completion_tokens(live) - before
    sock.close()
    assert wait_until(lambda: idle(live)), live.health()
    generated = completion_tokens(live) - before
    assert generated < MAX_NEW // 2 and generated - at_close < 200, (at_close, generated)
    cancelled = metric(live.request("GET", "/metrics")[2], "gpt2i_cancelled_total")
    assert cancelled >= 1


def test_abandoned_requests_do_not_hold_new_clients_out(live):
    """More abandoned requests than --max-queue: once they are gone, new clients are served."""
    socks = [open_request(live.port, "/v1/completions", {"prompt": "x", "max_tokens": MAX_NEW, "ignore_eos": True})
             for _ in range(4)]
    assert wait_until(lambda: live.health()["queue"]["admitted"] == 4)
    status, _, text = live.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503 and json.loads(text)["error"]["type"] == "overloaded"
    for sock in socks:
        sock.close()
    assert wait_until(lambda: idle(live)), live.health()
    status, _, text = live.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 200, text


def test_shutdown_refuses_queued_and_ends_running_streams(live):
    # two running streams fill --max-batch 2; the third request waits in the engine's queue
    streams = [open_request(live.port, path, {**body, "stream": True}) for path, body in (
        ("/generate", LONG), ("/v1/completions", {"prompt": "x", "max_tokens": MAX_NEW, "ignore_eos": True}))]
    files = [s.makefile("rb") for s in streams]
    for f in files:
        read_events(f, 1)
    queued = {}
    thread = threading.Thread(target=lambda: queued.update(r=live.request("POST", "/generate", LONG)))
    thread.start()
    assert wait_until(lambda: live.health()["queue"]["waiting"] == 1), live.health()
    live.state.begin_shutdown()
    thread.join(60)
    status, headers, text = queued["r"]
    assert status == 503 and json.loads(text)["error"]["type"] == "shutting_down" and int(headers["Retry-After"]) > 0
    status, _, text = live.request("POST", "/generate", {"prompt": "hi", "max_new_tokens": 1})
    assert status == 503 and json.loads(text)["error"]["type"] == "shutting_down"
    assert live.request("GET", "/health")[0] == 503
    live.state.close(timeout=0)  # the graceful time is up: running streams end with an error event
    native, openai = (sse_events(f.read().decode().lstrip("\n")) for f in files)
    assert json.loads(native[-1])["error"]["type"] == "shutting_down"
    assert openai[-1] == "[DONE]" and json.loads(openai[-2])["error"]["type"] == "shutting_down"


def test_a_killed_engine_process_is_replaced(live):
    stream = open_request(live.port, "/v1/responses", {"input": "x", "max_output_tokens": MAX_NEW, "ignore_eos": True,
                                                       "stream": True})
    f = stream.makefile("rb")
    read_events(f, 1)
    waiting = {}
    thread = threading.Thread(target=lambda: waiting.update(r=live.request("POST", "/generate", LONG)))
    thread.start()
    assert wait_until(lambda: live.health()["queue"]["running"] == 2)
    os.kill(live.state._proc.pid, signal.SIGKILL)  # what an out-of-memory kill or a driver crash would do
    rest = [json.loads(e) for e in sse_events(f.read().decode().lstrip("\n"))]  # error events, not a bare EOF
    assert [e["type"] for e in rest[-2:]] == ["error", "response.failed"] and rest[-2]["code"] == "server_error"
    assert rest[-1]["response"]["status"] == "failed" and rest[-1]["response"]["error"]["code"] == "server_error"
    thread.join(60)
    assert waiting["r"][0] == 500 and json.loads(waiting["r"][2])["error"]["type"] == "server_error"
    status, _, text = live.request("GET", "/health")  # meanwhile /health says what happened
    assert status == 503 and json.loads(text)["status"] == "restarting" and "exit code -9" in json.loads(text)["error"]
    ok = lambda: live.request("POST", "/generate", {"prompt": "hi", "max_new_tokens": 1})[0] == 200  # noqa: E731
    assert wait_until(ok, timeout=10.0), "no new engine process served within 10 s"
    assert live.health()["status"] == "ok" and live.health()["restarts"] == 1


def test_python_serve_py_logs_and_stops_on_sigterm(ckpt):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GPT2I_")}, "GPT2I_MAX_BATCH": "2"}
    proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt", ckpt, "--port", "0", "--threads", "4",
                             "--model-name", "demo"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(line.get("event") == "listening" for line in lines):
            lines.append(json.loads(proc.stderr.readline()))  # every line is JSON (stderr is not a terminal)
        port = int(re.search(r":(\d+)$", lines[-1]["url"]).group(1))
        assert wait_until(lambda: healthy(port)), "server did not become healthy"
        assert json.loads(fetch(port, "GET", "/health")[2])["model"] == "demo"
        status, headers, _ = fetch(port, "POST", "/generate", {"prompt": "hi", "max_new_tokens": 2},
                                  {"X-Request-ID": "cli-1"})
        assert status == 200 and headers["X-Frame-Options"] == "DENY"
        assert fetch(port, "GET", "/health", headers={"Host": "evil.example"})[0] == 400
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "\x1b[" not in rest and "Serving Flask app" not in rest and "development server" not in rest
    lines += [json.loads(line) for line in rest.splitlines()]
    requests = [line for line in lines if line["event"] == "request"]
    assert [r["request_id"] for r in requests if r["path"] == "/generate"] == ["cli-1"]
    assert not [r for r in requests if r["path"] == "/health" and r["status"] == 200]  # debug level


def test_slow_readers_get_their_own_threads_only_up_to_the_cap(ckpt):
    """--threads bounds the request threads, whatever the number of half-open connections."""
    app = make_app(ckpt, log_level="warning")
    server = LiveServer(app, threads=3)
    try:
        before = threading.active_count()
        socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
        for s in socks:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never finish
        assert wait_until(lambda: len(server.httpd.pool._threads) == 3)
        assert threading.active_count() <= before + 3
        for s in socks:
            s.close()
        assert wait_until(lambda: healthy(server.port))
    finally:
        server.close()
