"""Production setup: `gunicorn -c gunicorn.conf.py "serve:create_app()"` with two gthread workers
sharing one rate limit through a real redis-server, and a non-streaming client hanging up under gunicorn.

redis-server is a Debian package (`apt-get install redis-server`; .ci/run installs it).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from conftest import ROOT
from test_serve_config import fetch, free_port, healthy, make_checkpoint, wait_until

REDIS_SERVER = shutil.which("redis-server")
LIMIT = 5  # requests per minute per client


@pytest.fixture(scope="module")
def redis_port():
    assert REDIS_SERVER, "redis-server is not installed (apt-get install redis-server)"
    port = free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)

        def up():
            try:
                return client.ping()
            except redis.exceptions.ConnectionError:
                return False

        assert wait_until(up, 30), "redis-server did not start"
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory, redis_port):
    """Two gthread workers; rate limit storage in redis when available (else memory://)."""
    folder = tmp_path_factory.mktemp("serve_gunicorn")
    ckpt = make_checkpoint(folder, block_size=1024)
    port = free_port()
    log_path = folder / "gunicorn.log"
    env = {**os.environ, "GPT2I_CKPT": ckpt, "GPT2I_BIND": f"127.0.0.1:{port}", "GPT2I_WORKERS": "2",
           "GPT2I_THREADS": "8", "GPT2I_RATE_LIMIT": f"{LIMIT}/minute", "GPT2I_TRUST_PROXY": "1",
           "GPT2I_RATE_LIMIT_STORAGE": f"redis://127.0.0.1:{redis_port}",
           "GPT2I_LOG_LEVEL": "info"}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "serve:create_app()"],
                                cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # each worker connects to the engine once it has loaded the model: wait for both
        def loaded_pids():
            return {json.loads(line)["pid"] for line in log_path.read_text().splitlines()
                    if line.startswith('{"event": "model_loaded"')}

        assert wait_until(lambda: len(loaded_pids()) == 2, 120), log_path.read_text()[-3000:]
        assert healthy(port)
        yield port, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def request_log(log_path):
    """request_id -> the serve.py JSON log line of that request."""
    out = {}
    for line in log_path.read_text().splitlines():
        if line.startswith('{"event": "request"'):
            entry = json.loads(line)
            out[entry["request_id"]] = entry
    return out


def test_two_workers_share_one_rate_limit_through_redis(gunicorn, redis_port):
    port, log_path = gunicorn
    client = {"X-Forwarded-For": "7.7.7.7"}  # gunicorn trusts one proxy hop here (GPT2I_TRUST_PROXY=1)
    body = {"prompt": "hi", "max_new_tokens": 1}
    results = {}

    def one(rid):
        results[rid] = fetch(port, "POST", "/generate", body, {**client, "X-Request-ID": rid})

    first = [f"ok-{uuid.uuid4().hex[:8]}" for _ in range(LIMIT)]
    threads = [threading.Thread(target=one, args=(rid,)) for rid in first]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[rid][0] for rid in first] == [200] * LIMIT, [results[rid][2] for rid in first]

    # Every later request is refused, whichever worker takes it. The limit is shared when a worker
    # that itself let fewer than LIMIT requests through refuses one: send waves of requests on fresh
    # connections until that is seen in the log (each line names the worker's pid).
    def ok_per_worker(log):
        pids = [log[rid]["pid"] for rid in first]
        return {pid: pids.count(pid) for pid in set(pids)}

    assert wait_until(lambda: all(rid in request_log(log_path) for rid in first), 10)
    refused, proven = [], False
    for _ in range(30):
        wave = [f"no-{uuid.uuid4().hex[:8]}" for _ in range(4)]
        threads = [threading.Thread(target=one, args=(rid,)) for rid in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for rid in wave:
            status, headers, text = results[rid]
            assert status == 429, text
            assert json.loads(text)["error"]["type"] == "rate_limit_exceeded"
            assert 0 < int(headers["Retry-After"]) <= 60
        refused += wave
        assert wait_until(lambda: all(rid in request_log(log_path) for rid in refused), 10)
        log = request_log(log_path)
        allowed = ok_per_worker(log)
        if any(allowed.get(log[rid]["pid"], 0) < LIMIT for rid in refused):
            proven = True
            break
    assert proven, f"only a worker that had allowed {LIMIT} requests itself refused ({allowed})"
    import redis

    assert redis.Redis(port=redis_port).keys("*gpt2i*"), "no rate-limit counters in redis"


def test_a_non_streaming_client_that_hangs_up_is_cancelled_under_gunicorn(gunicorn):
    port, log_path = gunicorn
    rid = f"disc-{uuid.uuid4().hex[:8]}"
    max_new = 900
    body = json.dumps({"prompt": "Tell a long story.", "max_new_tokens": max_new, "ignore_eos": True}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"X-Forwarded-For: 8.8.8.8\r\nX-Request-ID: %s\r\nContent-Length: %d\r\n\r\n%s"
                 % (rid.encode(), len(body), body))

    def generating():  # either worker took it: one of them reports a running request
        return any(json.loads(fetch(port, "GET", "/health")[2])["queue"]["running"] for _ in range(4))

    assert wait_until(generating, 60)
    sock.close()
    assert wait_until(lambda: rid in request_log(log_path), 60), log_path.read_text()[-3000:]
    entry = request_log(log_path)[rid]
    assert entry["finish_reason"] == "cancelled" and entry["stream"] is False
    assert entry["completion_tokens"] < max_new // 2, entry


@pytest.mark.parametrize("problem", ["corrupt", "missing", "bad option"])
def test_a_checkpoint_that_cannot_load_is_one_line_and_exit_2(tmp_path, problem):
    bad = tmp_path / "ckpt.pt"
    if problem != "missing":
        bad.write_bytes(b"not a checkpoint" * 64)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GPT2I_")}, "GPT2I_CKPT": str(bad),
           "GPT2I_BIND": f"127.0.0.1:{free_port()}", **({"GPT2I_MAX_BATCH": "0"} if problem == "bad option" else {})}
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "gunicorn"), "-c", "gunicorn.conf.py",
                           "serve:create_app()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith({"corrupt": "error: model load failed:", "missing": "error: checkpoint not found: ",
                                 "bad option": "error: --max-batch must be >= 1"}[problem]), proc.stderr
    assert problem == "bad option" or str(bad) in errors[0], proc.stderr
    assert "Booting worker" not in proc.stderr  # the engine checked the configuration before any worker started


def test_the_workers_share_one_engine_process_and_a_killed_one_is_replaced(gunicorn):
    port, log_path = gunicorn
    client = {"X-Forwarded-For": "198.51.100.7"}  # its own rate-limit budget

    def health():
        return json.loads(fetch(port, "GET", "/health")[2])

    engines = {health()["engine_pid"] for _ in range(8)}  # whichever worker answers
    assert len(engines) == 1
    waiting = {}
    long = {"prompt": "Once", "max_new_tokens": 900, "ignore_eos": True}
    thread = threading.Thread(target=lambda: waiting.update(r=fetch(port, "POST", "/generate", long, client)))
    thread.start()
    assert wait_until(lambda: any(health()["queue"]["running"] for _ in range(4)), 60)
    os.kill(engines.pop(), signal.SIGKILL)  # what an out-of-memory kill or a driver crash would do
    thread.join(60)
    assert waiting["r"][0] == 500 and json.loads(waiting["r"][2])["error"]["type"] == "server_error", waiting
    probes = (f"198.51.101.{i}" for i in range(1, 255))  # one address per probe: none meets the rate limit
    ok = lambda: fetch(port, "POST", "/generate", {"prompt": "hi", "max_new_tokens": 1},  # noqa: E731
                       {"X-Forwarded-For": next(probes)})[0] == 200
    assert wait_until(ok, timeout=10.0), "no new engine process served within 10 s\n" + log_path.read_text()[-3000:]
    assert "the engine process" in log_path.read_text() and "Traceback" not in log_path.read_text()
