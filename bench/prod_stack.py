"""Slow clients and a reload against the production stack (nginx in front of gunicorn) or gunicorn alone.

    python bench/prod_stack.py --ckpt out/demo/sft                    # nginx + gunicorn (make serve-prod)
    python bench/prod_stack.py --ckpt out/demo/sft --stack gunicorn   # gunicorn alone on its port

slowloris: --slow half-requests held while GET /health and a small POST /generate are probed each second.
reload: SIGHUP while --streams streams run, probing until the old worker has exited; steady: the same for
10 s without a reload (the probes' baseline latency). A table, then one JSON line.
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import CLIParser, UserError, bounded, run_cli  # noqa: E402

PROBE_TIMEOUT = 2.0  # seconds a probe may take to count as answered


class Stack:
    """`gunicorn -c gunicorn.conf.py` as `make serve-prod` runs it (nginx=True) or alone, on 127.0.0.1."""

    def __init__(self, ckpt, folder, nginx=True, env=None, args=()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log_path, self.run_dir = os.path.join(folder, "gunicorn.log"), os.path.join(folder, "run")
        env = {**os.environ, "GPT2I_CKPT": ckpt, "GPT2I_RATE_LIMIT": "none", **(env or {})}
        if nginx:
            env.update(GPT2I_NGINX_LISTEN=f"127.0.0.1:{self.port}", GPT2I_RUN_DIR=self.run_dir)
        else:
            env["GPT2I_BIND"] = f"127.0.0.1:{self.port}"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "serve:create_app()"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_healthy(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the stack exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                if request(self.port, "GET", "/health", timeout=5)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"not healthy after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, timeout=60):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def request(port, method, path, body=None, headers=None, timeout=PROBE_TIMEOUT):
    """One request on a fresh connection -> (status, headers, body text). OSError when unanswered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


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
    """(GET /health, small POST /generate): each (status or "timeout"/"refused"/..., seconds it took)."""
    out = []
    for method, path, body in (("GET", "/health", None), ("POST", "/generate", {"prompt": "Hi", "max_new_tokens": 2})):
        sent = time.monotonic()
        try:
            status = request(port, method, path, body, timeout=timeout)[0]
        except OSError as e:
            status = "timeout" if isinstance(e, socket.timeout) else type(e).__name__
        out.append((status, time.monotonic() - sent))
    return out


def slowloris(port, n=200, hold=5.0):
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
        probes.append([status for status, _ in probe_once(port)])
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    replied = 0  # slow connections that got any bytes back (an answer to half a request)
    for s in socks:
        s.setblocking(False)
        try:
            replied += bool(s.recv(1))
        except (BlockingIOError, ConnectionError):
            pass
        s.close()
    ok = lambda i: sum(p[i] == 200 for p in probes)  # noqa: E731
    return {"slow_connections": n, "probes": len(probes), "health_ok": ok(0), "generate_ok": ok(1),
            "slow_replied": replied, "failures": sorted({str(x) for p in probes for x in p if x != 200})}


def reload(stack, streams=4, max_new_tokens=400, timeout=120.0, hup=True, steady_s=10.0):
    """SIGHUP with `streams` streams running; probe (waiting up to `timeout`) until the old worker is gone
    -> result dict. hup=False: the same for steady_s seconds without a reload (the baseline)."""
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
    if hup:
        os.kill(stack.proc.pid, signal.SIGHUP)
    probes, t0 = [], time.monotonic()
    # until the new worker answered and the old one exited (or for steady_s without a reload)
    while time.monotonic() < t0 + (timeout if hup else steady_s):
        done = stack.log().count("Worker exiting") > before
        probes.append(probe_once(stack.port, timeout))
        if hup and done and [s for s, _ in probes[-1]] == [200, 200]:
            break
        time.sleep(0.1)
    for t in threads:
        t.join(timeout)
    results = [r or ("unfinished", []) for r in results]  # a stream still open after `timeout`
    log = stack.log()
    flat, latency = [s for p in probes for s, _ in p], sorted(d for p in probes for _, d in p)
    ended = [r[1] for r in results if r[0] == 200 and terminal(r[1])]
    return {"streams": streams, "streams_ended": len(ended), "streams_cut": sum("error" in e[-1][1] for e in ended),
            "probes": len(flat), "probes_503": flat.count(503), "probes_unanswered": sum(type(x) is str for x in flat),
            "latency_p50_s": round(latency[len(latency) // 2], 3), "latency_max_s": round(latency[-1], 3),
            "worker_signalled": sum(s in log for s in ("was sent SIG", "terminate called", "WORKER TIMEOUT")),
            "failures": sorted({str(x) for x in flat if x != 200})}


def main(argv=None):
    parser = CLIParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint to serve (file or folder)")
    parser.add_argument("--stack", choices=("nginx", "gunicorn"), default="nginx",
                        help="nginx in front of gunicorn (make serve-prod), or gunicorn alone")
    parser.add_argument("--slow", type=bounded(int, 0), default=200, help="slow connections held open (0: reload only)")
    parser.add_argument("--hold", type=bounded(float, 0, inclusive=False), default=20.0,
                        help="seconds they are held while probing")
    parser.add_argument("--streams", type=bounded(int, 1), default=4, help="streams running during the reload")
    parser.add_argument("--max-new-tokens", type=bounded(int, 1), default=400, help="tokens per reload stream")
    args = parser.parse_args(argv)
    if not os.path.exists(args.ckpt):
        raise UserError(f"--ckpt: no such file or folder: {args.ckpt}")
    rows = {}
    with tempfile.TemporaryDirectory() as folder, \
            Stack(os.path.abspath(args.ckpt), folder, nginx=args.stack == "nginx") as stack:
        stack.wait_healthy()
        if args.slow:
            rows["slowloris"] = slowloris(stack.port, args.slow, args.hold)
        rows["steady"] = reload(stack, args.streams, args.max_new_tokens, hup=False)
        rows["reload"] = reload(stack, args.streams, args.max_new_tokens)
    print(f"stack: {args.stack}")
    for name, row in rows.items():
        print(f"{name:10s} " + "  ".join(f"{k}={v}" for k, v in row.items()))
    print(json.dumps({"stack": args.stack, **rows}))


if __name__ == "__main__":
    run_cli(main)
