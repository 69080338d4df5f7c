"""The production stack for real: nginx in front of gunicorn, started as `make serve-prod` starts it
(gunicorn -c gunicorn.conf.py with GPT2I_NGINX_LISTEN), on 127.0.0.1 with a tiny model.

nginx is a Debian package (`apt-get install nginx`; .ci/run installs it). Without it these tests are
skipped, unless CI_REQUIRE_ALL is set (CI), where they fail instead.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import threading
import time

import pytest

from bench.serve_load import Stack, request
from server.app import SECURITY_HEADERS
from test_serve_config import make_checkpoint

PROBE_TIMEOUT = 2.0  # seconds a probe may take to count as answered

GRACEFUL = 12  # gunicorn --graceful-timeout: requests get 7 s of it on a reload (gunicorn.conf.py keeps 5)


def need_nginx():
    assert shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin"), \
        "nginx is not installed (apt-get install nginx)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_nginx()
    folder = tmp_path_factory.mktemp("prod")
    ckpt = make_checkpoint(str(folder), block_size=1024)
    with Stack(ckpt, str(folder), nginx=True, args=["--graceful-timeout", str(GRACEFUL)]) as s:
        s.wait_healthy()
        yield s


def stream(port, body, timeout=120.0, on_event=None):
    """POST /generate with stream: true -> (status, [(monotonic arrival, event dict), ...])."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    events = []
    try:
        conn.request("POST", "/generate", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, [(time.monotonic(), json.loads(resp.read() or b"{}"))]
        for line in resp:
            if line.startswith(b"data: "):
                events.append((time.monotonic(), json.loads(line[6:])))
                if on_event:
                    on_event(events[-1][1])
        return resp.status, events
    finally:
        conn.close()


def terminal(events):  # the stream's last event is done or an error
    return bool(events) and ("done" in events[-1][1] or "error" in events[-1][1])


def probe_once(port, timeout=PROBE_TIMEOUT):
    """[status of GET /health, of a small POST /generate]: each a number, or "timeout", "ConnectionRefusedError"..."""
    out = []
    for method, path, body in (("GET", "/health", None), ("POST", "/generate", {"prompt": "Hi", "max_new_tokens": 2})):
        try:
            out.append(request(port, method, path, body, timeout=timeout)[0])
        except OSError as e:
            out.append("timeout" if isinstance(e, socket.timeout) else type(e).__name__)
    return out


def slowloris(port, n, hold):
    """n half-requests held for `hold` s while probing once a second -> result dict."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % 2:  # a header that never ends
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        else:  # a whole header, half the body
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 200\r\n\r\n{\"prompt\": ")
        socks.append(s)
    probes, end = [], time.monotonic() + hold
    while time.monotonic() < end:
        started = time.monotonic()
        probes.append(probe_once(port))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    replied = 0  # slow connections that got any bytes back (an answer to half a request)
    for s in socks:
        s.setblocking(False)
        try:
            replied += bool(s.recv(1))
        except (BlockingIOError, ConnectionError):
            pass
        s.close()
    return {"probes": len(probes), "health_ok": sum(p[0] == 200 for p in probes),
            "generate_ok": sum(p[1] == 200 for p in probes), "slow_replied": replied,
            "failures": sorted({str(x) for p in probes for x in p if x != 200})}


def reload(stack, streams, max_new_tokens, timeout=120.0):
    """SIGHUP with `streams` streams running; probe (waiting up to `timeout`) until the old worker is gone
    -> result dict."""
    results, started = [None] * streams, [threading.Event() for _ in range(streams)]

    def run(i):
        body = {"prompt": f"Story {i}:", "max_new_tokens": max_new_tokens, "ignore_eos": True}
        try:
            results[i] = stream(stack.port, body, on_event=lambda _: started[i].set())
        except OSError as e:
            results[i] = (type(e).__name__, [])
        started[i].set()  # one that failed before its first event

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for event in started:
        event.wait()
    before = stack.log().count("Worker exiting")
    os.kill(stack.proc.pid, signal.SIGHUP)
    probes, t0 = [], time.monotonic()
    while time.monotonic() < t0 + timeout:  # until the new worker answered and the old one exited
        done = stack.log().count("Worker exiting") > before
        probes.append(probe_once(stack.port, timeout))
        if done and probes[-1] == [200, 200]:
            break
        time.sleep(0.1)
    for t in threads:
        t.join(timeout)
    log, flat = stack.log(), [s for p in probes for s in p]
    return {"streams_ended": sum(r is not None and r[0] == 200 and terminal(r[1]) for r in results),
            "probes": len(flat), "probes_503": flat.count(503), "probes_unanswered": sum(type(x) is str for x in flat),
            "worker_signalled": sum(s in log for s in ("was sent SIG", "terminate called", "WORKER TIMEOUT")),
            "failures": sorted({str(x) for x in flat if x != 200})}


def app_security_headers(headers):
    """nginx's own answers carry the very headers the app sends."""
    return all(headers.get(k.lower()) == v for k, v in SECURITY_HEADERS.items())


def security_headers_ok(headers):
    return ("frame-ancestors 'none'" in headers.get("content-security-policy", "")
            and headers.get("x-content-type-options") == "nosniff" and "referrer-policy" in headers)


def test_headers_hosts_and_content_types_through_nginx(stack):
    status, headers, body = request(stack.port, "GET", "/", timeout=30)
    assert status == 200 and headers["content-type"].startswith("text/html") and security_headers_ok(headers)
    status, headers, body = request(stack.port, "GET", "/health", timeout=30)
    assert status == 200 and json.loads(body)["status"] == "ok" and security_headers_ok(headers)
    # a page asset comes from nginx itself, locked down as well
    status, headers, body = request(stack.port, "GET", "/app.js", timeout=30)
    assert status == 200 and "javascript" in headers["content-type"] and security_headers_ok(headers)
    assert headers.get("x-request-id") is None  # nginx answered, not the app

    status, headers, body = request(stack.port, "GET", "/health", headers={"Host": "evil.example"}, timeout=30)
    assert status == 400 and "error" in json.loads(body)
    status, _, body = request(stack.port, "POST", "/generate", body=json.dumps({"prompt": "Hi", "max_new_tokens": 1}),
                              headers={"Content-Type": "text/plain"}, timeout=30)
    assert status == 415 and "error" in json.loads(body)

    # a body over nginx's ceiling is refused from its Content-Length, before any of it is read
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n")
        reply = s.recv(65536).decode()
    head, body = reply.split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 413") and json.loads(body)["error"]["type"] == "request_too_large"
    assert app_security_headers({k.lower(): v for k, v in (line.split(": ", 1) for line in head.split("\r\n")[1:])})


def test_stream_arrives_as_it_is_generated(stack):
    status, events = stream(stack.port, {"prompt": "Once", "max_new_tokens": 200, "ignore_eos": True})
    assert status == 200 and "done" in events[-1][1], events[-1]
    tokens = [t for t, e in events if "token" in e]
    timings = events[-1][1]["timings"]
    generating = (timings["total_ms"] - timings["first_token_ms"]) / 1000  # the server's own span
    assert len(tokens) > 10 and generating > 0
    # Buffered by nginx, every event would arrive in one burst at the end (a span near 0): here the
    # first token arrives while the rest is still being generated.
    assert tokens[-1] - tokens[0] > 0.5 * generating, (tokens[-1] - tokens[0], generating)


def test_slow_clients_hold_nothing(stack):
    # 200 connections each send half a request (half a header, or a header and half a body) and
    # hold it; meanwhile /health and a small /generate are answered, each within 2 s.
    result = slowloris(stack.port, n=200, hold=3.0)
    assert result["probes"] >= 2, result
    assert result["health_ok"] == result["generate_ok"] == result["probes"], result
    assert result["slow_replied"] == 0, result  # half a request gets no answer


def test_reload_under_streams_without_503_or_signals(stack):
    # SIGHUP while streams run: the new worker accepts only once loaded, the old one serves until
    # then, lets its streams run for the graceful time, then ends them with an error event and
    # exits by itself.
    result = reload(stack, streams=3, max_new_tokens=900)
    assert result["streams_ended"] == 3, result  # each with "done" or an error event
    assert result["probes_503"] == 0 and result["probes_unanswered"] == 0, result
    assert result["worker_signalled"] == 0, stack.log()[-3000:]
    assert "Traceback" not in stack.log(), stack.log()[-3000:]
    # the old worker took requests until the new one had loaded its model, and only then stopped
    log = stack.log().splitlines()
    hup = max(i for i, line in enumerate(log) if "Handling signal: hup" in line)
    events = [(i, json.loads(line)) for i, line in enumerate(log) if i > hup and line.startswith("{")]
    new_loaded, new_pid = next((i, e["pid"]) for i, e in events if e.get("event") == "model_loaded")
    old_served = [i for i, e in events if e.get("event") == "request" and not e.get("stream")  # a probe, not a stream
                  and e["pid"] != new_pid and i < new_loaded]
    old_exit = next(i for i, line in enumerate(log) if i > hup and "Worker exiting" in line)
    assert old_served and new_loaded < old_exit, "\n".join(log[hup:])[-3000:]


def test_drain_is_a_json_503_then_stop_takes_nginx_down_too(stack):
    # SIGTERM while a stream runs: gunicorn stops listening and drains; nginx stays up meanwhile
    # and answers new requests itself, a JSON 503 with Retry-After (not a 502).
    running, ended = threading.Event(), []
    long = {"prompt": "Once", "max_new_tokens": 900, "ignore_eos": True}
    drained = threading.Thread(target=lambda: ended.append(stream(stack.port, long, on_event=lambda _: running.set())))
    drained.start()
    assert running.wait(60)
    with open(os.path.join(stack.run_dir, "nginx.pid")) as f:
        nginx_pid = int(f.read())
    stack.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while (answer := request(stack.port, "GET", "/health", timeout=10))[0] != 503:
        assert answer[0] == 200 and time.monotonic() < deadline, answer  # at most until the socket closes
        time.sleep(0.05)
    status, headers, body = answer
    assert json.loads(body)["error"]["type"] == "server_unavailable" and headers["retry-after"] == "5"
    assert app_security_headers(headers) and headers["content-type"].startswith("application/json")
    drained.join(60)
    assert ended and terminal(ended[0][1])  # the running stream ended with done or an error event
    assert stack.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(nginx_pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.port), timeout=5).close()


def test_a_model_that_fails_to_load_stops_the_stack(tmp_path):
    need_nginx()
    with open(make_checkpoint(str(tmp_path), block_size=64), "r+b") as f:
        f.truncate(1000)  # a checkpoint cut short
    with Stack(str(tmp_path / "ckpt.pt"), str(tmp_path), nginx=True) as s:
        assert s.proc.wait(120) == 2  # the master stopped instead of respawning it
        log = s.log()
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: model load failed: ") and "Traceback" not in log, \
        log[-3000:]  # one line says why
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()  # nginx went with it

