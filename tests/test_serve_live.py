"""serve.py on a real socket (127.0.0.1, free port): the official `openai` client, a client that hangs
up mid-stream, a burst of concurrent requests, and `python serve.py` as a subprocess."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from conftest import ROOT
from test_serve_config import LiveServer, free_port, make_app, make_checkpoint, metric


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # a long context, so that a generation can run long enough to be interrupted
    return make_checkpoint(tmp_path_factory.mktemp("serve_live"), block_size=1024)


@pytest.fixture(scope="module")
def live(ckpt):
    server = LiveServer(make_app(ckpt, model_name="tiny-live", api_key="sk-test", max_queue=8, max_batch=4))
    yield server
    server.close()


def client_for(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="sk-test", max_retries=0, timeout=60)


def get(url, path, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_openai_client_completions(live):
    client = client_for(live)
    assert [m.id for m in client.models.list().data] == ["tiny-live"]
    done = client.completions.create(model="tiny-live", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.model == "tiny-live"
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens <= 8
    pieces, finish = [], None
    for chunk in client.completions.create(model="tiny-live", prompt="Once upon a time", max_tokens=8,
                                           temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == done.choices[0].text and finish == done.choices[0].finish_reason


def test_openai_client_chat(live):
    client = client_for(live)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    done = client.chat.completions.create(model="tiny-live", messages=messages, max_tokens=8, temperature=0, seed=3)
    msg = done.choices[0].message
    assert done.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny-live", messages=messages, max_tokens=8, temperature=0,
                                            seed=3, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    # errors surface as the client's exception types, with our JSON body
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny-live", messages=messages, temperature=9)
    assert e.value.param == "temperature" and e.value.type == "invalid_parameter"
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-live", messages=messages)


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_mid_stream_stops_generation(live):
    engine = live.app.extensions["gpt2i"].engine
    auth = {"Authorization": "Bearer sk-test"}
    before = get(live.url, "/metrics", auth)[1]
    host, port = live.url.removeprefix("http://").split(":")
    max_new = 900
    body = json.dumps({"prompt": "Tell a long story.", "max_new_tokens": max_new, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer sk-test\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    stream = sock.makefile("rb")
    assert stream.readline().split()[1] == b"200"
    events = 0
    while events < 3:  # read three token events, then hang up
        line = stream.readline()
        assert line, "stream ended early"
        if line.startswith(b"data: "):
            assert "token" in json.loads(line[6:])
            events += 1
    stream.close()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assert wait_until(lambda: engine.admitted() == 0 and engine.running() == 0), "generation did not stop"
    after = get(live.url, "/metrics", auth)[1]
    generated = metric(after, "gpt2i_generated_tokens_total") - (metric(before, "gpt2i_generated_tokens_total") or 0)
    assert metric(after, "gpt2i_cancelled_total") == (metric(before, "gpt2i_cancelled_total") or 0) + 1
    assert 3 <= generated < max_new // 2, generated  # stopped a few tokens after the hang-up, not at 900


def test_concurrent_burst_never_500(ckpt):
    server = LiveServer(make_app(ckpt, rate_limit="25/minute", max_queue=6, max_batch=4))
    try:
        statuses, lock = [], threading.Lock()
        host, port = server.url.removeprefix("http://").split(":")

        def one(i):
            path, body = [("/generate", {"prompt": f"n{i}", "max_new_tokens": 4, "stream": i % 3 == 0}),
                          ("/v1/completions", {"prompt": f"n{i}", "max_tokens": 4}),
                          ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"n{i}"}],
                                                    "max_tokens": 4, "stream": i % 2 == 0})][i % 3]
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            try:
                conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                with lock:
                    statuses.append(resp.status)
            finally:
                conn.close()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert len(statuses) == 50
        assert set(statuses) <= {200, 429, 503}, sorted(statuses)
        assert 1 <= statuses.count(200) <= 25 and statuses.count(429) >= 25
        status, body = get(server.url, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        text = get(server.url, "/metrics")[1]
        assert 'status="500"' not in text
        # concurrent requests were decoded together: more rows than batches
        assert metric(text, "gpt2i_engine_batch_rows_total") > metric(text, "gpt2i_engine_batches_total")
        engine = server.app.extensions["gpt2i"].engine
        assert wait_until(lambda: engine.admitted() == 0)
    finally:
        server.close()


def test_serve_py_subprocess_flags_and_env(ckpt):
    port = free_port()
    env = {**os.environ, "GPT2I_MODEL_NAME": "from-env", "GPT2I_MAX_QUEUE": "3", "GPT2I_RATE_LIMIT": "none"}
    proc = subprocess.Popen([sys.executable, "serve.py", "--ckpt", ckpt, "--port", str(port),
                             "--model-name", "from-flag", "--device", "cpu"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            try:
                return get(url, "/health")[0] == 200
            except OSError:
                return False

        assert wait_until(ready, 120), "server did not become ready"
        health = json.loads(get(url, "/health")[1])
        assert health["model"] == "from-flag" and health["queue"]["max_queue"] == 3  # flag > env; env > default
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/generate", body=json.dumps({"prompt": "hi", "max_new_tokens": 2}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] <= 2
        conn.close()
        # the request is logged (then counted) once its response is closed
        assert wait_until(lambda: metric(get(url, "/metrics")[1],
                                         'gpt2i_requests_total{endpoint="/generate",status="200"}') == 1)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    log_lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"event": "request"')]
    assert any(line["endpoint"] == "/generate" and line["status"] == 200 for line in log_lines), out[-2000:]
