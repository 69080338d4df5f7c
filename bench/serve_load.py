"""
Server load: the production server (gunicorn, as the README starts it) under N concurrent HTTP
clients, against the engine's own offline throughput at the same batch, in one run.

    python bench/serve_load.py                                  # GPU: random GPT-2 124M, 64 clients, 256 new tokens
    python bench/serve_load.py --ckpt out/demo/sft --dtype bfloat16
    python bench/serve_load.py --model tiny --clients 8 --duration 20    # CPU, a few minutes

Phases, each a steady state of --duration seconds after --warmup seconds:
1. engine: inference.Engine in this process, --clients rows kept full (a finished request is
   replaced at once) with the same prompt length and new tokens; then the model is freed. Also
   the time of one --prefill-chunk prompt's prefill on the idle engine (the newcomer allowance).
2. server: `gunicorn -c gunicorn.conf.py "serve:create_app()"` configured by GPT2I_* variables,
   --clients threads each sending /v1/completions requests back to back over one keep-alive
   loopback connection (http.client), non-streaming then streaming.
3. newcomer: while --newcomer-streams streams of --newcomer-tokens tokens run, a 16-token request
   (16-token prompt) is sent every --probe-every seconds; its time to first token is recorded.
4. embeddings: the inter-token latency of --newcomer-streams streams alone, then during a burst of
   --embed-clients clients sending /v1/embeddings (16 inputs of --prompt-tokens tokens) back to back.
5. burst: the same streams' inter-token p95 alone, then while --burst prompts of --burst-tokens random ids
   (1 new token each) arrive at once; the burst's first-token times.
6. chat, loglik: on this server and on one with the prefix cache off (unless "cacheoff" is skipped).
   chat: --turns turns of a conversation (/v1/completions, the transcript as raw text, history first),
   each turn a ~35-token message and a 48-token reply (at most --new-tokens), ~900 tokens at turn 10; median first-token time per turn over 3
   conversations. loglik: the committed HellaSwag rows (tests/data), each ending as lm-evaluation-harness
   sends it (token ids of context + ending, echo, logprobs 1, max_tokens 1, longest first) by 8 clients:
   requests/s, and the largest loglikelihood difference between cache on and off.
Throughput: completion tokens made inside the measured window, divided by it (the engine counts
them per step; over HTTP, each request's usage.completion_tokens is spread evenly over its
lifetime and the share inside the window counts). Prompts are token ids, end-of-text ignored, so
every request generates exactly --new-tokens tokens. Prints a table; the last line is JSON.
"""

import argparse
import http.client
import queue
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import inference  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from common import UserError, run_cli  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import encode  # noqa: E402

MODELS = {  # random weights: the speed does not depend on them
    "gpt2": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768),  # GPT-2 124M
    "tiny": dict(block_size=1024, n_layer=2, n_head=4, n_embd=64),  # CPU smoke runs
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2", help="random-weight model (without --ckpt)")
    p.add_argument("--ckpt", default=None, help="a checkpoint to serve instead of random weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (engine and server alike)")
    p.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients = the engine's batch")
    p.add_argument("--new-tokens", type=int, default=256, help="completion tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt tokens per request")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before each measurement starts")
    p.add_argument("--newcomer-streams", type=int, default=32, help="background streams in the newcomer phase")
    p.add_argument("--newcomer-tokens", type=int, default=512, help="tokens of each background stream")
    p.add_argument("--probe-every", type=float, default=0.25, help="seconds between newcomer probes")
    p.add_argument("--prefill-chunk", type=int, default=None, help="server and engine (default: per device)")
    p.add_argument("--embed-clients", type=int, default=8, help="embedding clients in the embeddings phase")
    p.add_argument("--embed-format", choices=["base64", "float"], default="base64",
                   help="their encoding_format (base64: what the openai SDK asks for unless told otherwise)")
    p.add_argument("--burst", type=int, default=32, help="prompts sent at once in the burst phase")
    p.add_argument("--burst-tokens", type=int, default=1000)
    p.add_argument("--turns", type=int, default=10, help="chat turns")
    p.add_argument("--rows", type=int, default=200, help="HellaSwag rows (4 requests each)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: engine, nonstream, stream, newcomer, "
                                              "embeddings, burst, chat, loglik, cacheoff")
    args = p.parse_args(argv)
    for name in ("clients", "new_tokens", "prompt_tokens", "newcomer_streams", "newcomer_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.duration <= 0 or args.warmup < 0:
        raise UserError("--duration must be > 0 and --warmup >= 0")
    if args.ckpt and not os.path.exists(args.ckpt):
        raise UserError(f"checkpoint not found: {args.ckpt}")
    return args


def make_random_checkpoint(name, folder):
    torch.manual_seed(0)
    cfg = GPTConfig(**MODELS[name])
    return save_checkpoint(os.path.join(folder, "ckpt.pt"), kind="sft", model_state=GPT(cfg).state_dict(),
                           config=cfg.to_dict(), step=0)


def prompt_ids(n, rng):
    return [rng.randrange(1000, 50000) for _ in range(n)]


def request_body(prompt_tokens, max_tokens, stream):
    """A /v1/completions body; "prompt" holds the prompt length (each request draws its own ids)."""
    body = {"prompt": prompt_tokens, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
    return {**body, "stream_options": {"include_usage": True}} if stream else body


def pct(values, q):
    """q-th percentile (nearest rank) of a non-empty list."""
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


# ---------------------------------------------------------------------- phase 1: the engine alone


def engine_offline(args, ckpt):
    """tokens/s of inference.Engine with --clients rows kept full, in this process."""
    model, info = inference.load_model_from_checkpoint(ckpt, device=args.device, dtype=args.dtype)
    engine = inference.Engine(model, max_batch=args.clients, prefill_chunk=args.prefill_chunk, compile=args.compile)
    engine.warmup()  # CUDA graphs captured up front, as the server does before it is healthy
    rng = random.Random(0)
    chunk_ms = prefill_chunk_ms(engine, engine.scheduler.prefill_chunk, rng)
    params = inference.validate_params(max_new_tokens=args.new_tokens, temperature=0.8, ignore_eos=True)
    for _ in range(args.clients):
        engine.add(prompt_ids(args.prompt_tokens, rng), params)
    t0 = time.perf_counter()
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    tokens = 0
    while True:
        outs = engine.step()
        now = time.perf_counter()
        if now >= end:
            break
        for o in outs:
            if now >= start:
                tokens += len(o.token_ids)
            if o.finish_reason is not None:
                engine.add(prompt_ids(args.prompt_tokens, rng), params)
    result = {"tokens_per_s": round(tokens / args.duration, 1), "prefill_chunk_ms": chunk_ms, "device": info["device"],
              "dtype": info["dtype"]}
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def prefill_chunk_ms(engine, n, rng, repeats=5):
    """Median milliseconds from add() to the first tokens of prompts that fill one n-token step on the idle
    engine: one prefill chunk, the newcomer target's allowance."""
    params = inference.validate_params(max_new_tokens=1, temperature=0.8, ignore_eos=True)
    times, width = [], min(n, engine.config.block_size - 1)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(min(engine.max_batch, n // width)):
            engine.add(prompt_ids(width, rng), params)
        while engine.has_work():
            engine.step()
        times.append(time.perf_counter() - t0)
    return round(sorted(times)[repeats // 2] * 1e3, 1)


# ---------------------------------------------------------------------- phases 2 and 3: HTTP


class Client(threading.Thread):
    """Sends /v1/completions requests back to back on one keep-alive connection until told to stop.
    Records (start, end, completion tokens, time to first token or None, gaps between chunks)."""

    def __init__(self, port, body, stop, seed, once=False):
        super().__init__(daemon=True)
        self.port, self.body, self.stop, self.once = port, body, stop, once
        self.rng = random.Random(seed)
        self.records, self.errors = [], []

    def run(self):
        conn = None
        while not self.stop.is_set():
            body = {**self.body, "prompt": prompt_ids(self.body["prompt"], self.rng)}
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                self.records.append(self.one(conn, body))
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                conn = None
                time.sleep(0.1)
            if self.once:
                return

    def one(self, conn, body):
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        if not body.get("stream"):
            usage = json.loads(resp.read())["usage"]
            return t0, time.perf_counter(), usage["completion_tokens"], None, []
        first, last, gaps, usage = None, None, [], None
        for line in resp:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"]:
                if first is None:
                    first = now - t0
                else:
                    gaps.append((now, now - last))
                last = now
        return t0, time.perf_counter(), usage["completion_tokens"], first, gaps


def run_clients(port, n, body, args, seed=0):
    """n clients for warmup + duration seconds -> (tokens/s in the window, requests, ttfts, gaps, errors)."""
    stop = threading.Event()
    clients = [Client(port, body, stop, seed + i) for i in range(n)]
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    time.sleep(args.warmup + args.duration)
    stop.set()
    start, end = t0 + args.warmup, t0 + args.warmup + args.duration
    for c in clients:
        c.join(600)
    records = [r for c in clients for r in c.records]
    tokens = sum(n * max(0.0, min(b, end) - max(a, start)) / max(b - a, 1e-9) for a, b, n, _, _ in records)
    done = [r for r in records if start <= r[1] <= end]
    return {"tokens_per_s": round(tokens / args.duration, 1), "requests": len(done),
            "ttft": [r[3] for r in done if r[3] is not None], "gaps": [g for r in done for _, g in r[4]],
            "errors": [e for c in clients for e in c.errors]}


def newcomer(port, args):
    """Time to first token of a 16-token request while --newcomer-streams long streams run."""
    stop = threading.Event()
    background = [Client(port, request_body(args.prompt_tokens, args.newcomer_tokens, True), stop, 1000 + i)
                  for i in range(args.newcomer_streams)]
    for c in background:
        c.start()
    time.sleep(args.warmup)
    ttfts, errors, end = [], [], time.perf_counter() + args.duration
    while time.perf_counter() < end:
        probe = Client(port, request_body(16, 16, True), stop, len(ttfts), once=True)
        probe.run()
        ttfts += [r[3] for r in probe.records]
        errors += probe.errors
        time.sleep(args.probe_every)
    stop.set()
    for c in background:
        c.join(600)
        errors += c.errors
    return {"probes": len(ttfts), "ttft_p50_ms": round(pct(ttfts, 50) * 1e3, 1) if ttfts else None,
            "ttft_p95_ms": round(pct(ttfts, 95) * 1e3, 1) if ttfts else None, "errors": errors}


def embed_loop(port, stop, rng, calls, errors, fmt):
    """POST /v1/embeddings back to back until stopped; counts the calls answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    while not stop.is_set():
        body = json.dumps({"input": [prompt_ids(16, rng) for _ in range(16)], "encoding_format": fmt})
        try:
            conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            calls.append(resp.status) if resp.status == 200 else errors.append(f"HTTP {resp.status}")
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)


def embeddings(port, args):
    """Inter-token p95 of running streams alone, then while --embed-clients send embedding calls."""
    out, errors = {}, []
    for label, n_embed in (("idle", 0), ("burst", args.embed_clients)):
        stop, calls = threading.Event(), []
        streams = [Client(port, request_body(args.prompt_tokens, args.newcomer_tokens, True), stop, 2000 + i)
                   for i in range(args.newcomer_streams)]
        embedders = [threading.Thread(target=embed_loop, daemon=True,
                                      args=(port, stop, random.Random(i), calls, errors, args.embed_format))
                     for i in range(n_embed)]
        for t in streams + embedders:
            t.start()
        time.sleep(args.warmup + args.duration)
        stop.set()
        for t in streams + embedders:
            t.join(600)
        gaps = [g for c in streams for r in c.records for _, g in r[4]]
        errors += [e for c in streams for e in c.errors]
        out[f"itl_p95_ms_{label}"] = round(pct(gaps, 95) * 1e3, 2) if gaps else None
        out[f"embedding_calls_{label}"] = len(calls)
    return {**out, "errors": errors}


def burst(port, args):
    """Inter-token p95 of --newcomer-streams streams alone, then while --burst prompts of --burst-tokens
    tokens arrive at once (non-streaming, 1 new token: their latency is their first-token time)."""
    stop = threading.Event()
    streams = [Client(port, request_body(args.prompt_tokens, args.newcomer_tokens, True), stop, 3000 + i)
               for i in range(args.newcomer_streams)]
    prompts = [Client(port, request_body(args.burst_tokens, 1, False), stop, 4000 + i, once=True)
               for i in range(args.burst)]
    for c in streams:
        c.start()
    time.sleep(args.warmup)
    t_idle = time.perf_counter()
    time.sleep(min(args.duration, 5.0))
    t0 = time.perf_counter()
    for c in prompts:
        c.start()
    for c in prompts:
        c.join(600)
    t1 = time.perf_counter()
    stop.set()
    for c in streams:
        c.join(600)
    gaps = [(t, g) for c in streams for r in c.records for t, g in r[4]]
    idle, during = [g for t, g in gaps if t_idle <= t < t0], [g for t, g in gaps if t0 <= t < t1]
    ttft = [r[1] - r[0] for c in prompts for r in c.records]
    ms = lambda values, q: round(pct(values, q) * 1e3, 2) if values else None  # noqa: E731
    return {"itl_p95_ms_idle": ms(idle, 95), "itl_p95_ms_burst": ms(during, 95), "burst_ttft_p50_ms": ms(ttft, 50),
            "burst_ttft_p95_ms": ms(ttft, 95), "prompt_tokens_per_s": round(len(ttft) * args.burst_tokens / (t1 - t0)),
            "errors": [e for c in streams + prompts for e in c.errors]}


def http_get(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


def post(conn, body):
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise ValueError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    return resp


def chat(port, args):
    """Median first-token ms of each turn over 3 conversations (after an untimed one)."""
    conn, words = http.client.HTTPConnection("127.0.0.1", port, timeout=600), " the of and to in is was that for on"
    turns = []
    for seed in range(4):
        rng, transcript, ttfts = random.Random(seed), "", []
        for _ in range(args.turns):
            prompt = transcript + "User: " + " ".join(rng.choice(words.split()) for _ in range(32)) + "\nAssistant:"
            t0, first, reply = time.perf_counter(), None, ""
            body = {"prompt": prompt, "raw": True, "max_tokens": min(48, args.new_tokens), "temperature": 0,
                    "ignore_eos": True, "stream": True}
            for line in post(conn, body):
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"]:
                    first = first or time.perf_counter() - t0
                    reply += json.loads(line[6:])["choices"][0]["text"]
            ttfts.append(first)
            transcript = prompt + reply + "\n"
        turns += [ttfts] if seed else []
    per_turn = [round(pct([t[i] for t in turns], 50) * 1e3, 2) for i in range(args.turns)]
    return {"ttft_ms_per_turn": per_turn, "last_over_first": round(per_turn[-1] / per_turn[0], 2),
            "last_prompt_tokens": len(encode(prompt))}


def hellaswag_pairs(rows):
    """(context ids, ending ids) as lm-evaluation-harness splits them, longest first as it sends them."""
    with open(os.path.join(ROOT, "tests", "data", "hellaswag_val_200.jsonl"), encoding="utf-8") as f:
        data = [json.loads(line) for line in f][:rows]
    pairs = []
    for r in data:
        ctx = encode(f"{r['activity_label']}: {r['ctx']}")
        pairs += [(ctx, encode(f"{r['activity_label']}: {r['ctx']} {e}")[len(ctx):]) for e in r["endings"]]
    return sorted(pairs, key=lambda p: (-len(p[0] + p[1]), p[0] + p[1]))


def loglik(port, pairs, clients=8):
    """Every (context, ending) as one echo request, by `clients` clients -> requests/s and loglikelihoods."""
    jobs, out, errors = queue.Queue(), [None] * len(pairs), []
    for job in enumerate(pairs):
        jobs.put(job)

    def work():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            try:
                i, (ctx, end) = jobs.get_nowait()
            except queue.Empty:
                return
            body = {"prompt": ctx + end, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
            try:
                lps = json.loads(post(conn, body).read())["choices"][0]["logprobs"]["token_logprobs"]
                out[i] = sum(lps[len(ctx):len(ctx) + len(end)])
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return {"requests_per_s": round(len(pairs) / (time.perf_counter() - t0), 2), "errors": errors}, out


def prompt_phases(port, args, skip):
    """chat and loglik on one server -> (results, loglikelihoods)."""
    out, lls = {}, None
    if "chat" not in skip:
        print(f"chat: {args.turns} turns ...", file=sys.stderr)
        out["chat"] = chat(port, args)
    if "loglik" not in skip:
        print(f"loglik: {args.rows} HellaSwag rows ...", file=sys.stderr)
        loglik(port, hellaswag_pairs(2))  # untimed: first shapes
        out["loglik"], lls = loglik(port, hellaswag_pairs(args.rows))
        out["loglik"]["errors"] = len(out["loglik"]["errors"])
    return out, lls


def start_gunicorn(args, ckpt, log_path, env=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = max(args.clients, args.newcomer_streams + 1)
    env = {**os.environ, "GPT2I_CKPT": ckpt, "GPT2I_BIND": f"127.0.0.1:{port}", "GPT2I_WORKERS": "1",
           "GPT2I_THREADS": str(rows + 8), "GPT2I_MAX_BATCH": str(rows), "GPT2I_MAX_QUEUE": str(rows + 8),
           "GPT2I_RATE_LIMIT": "none", "GPT2I_DEVICE": args.device, "GPT2I_DTYPE": args.dtype,
           "GPT2I_COMPILE": "1" if args.compile else "0", "GPT2I_LOG_LEVEL": "warning", **(env or {})}
    if args.prefill_chunk:
        env["GPT2I_PREFILL_CHUNK"] = str(args.prefill_chunk)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "serve:create_app()"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = open(log_path).read().strip().splitlines()[-5:]
            raise UserError(f"gunicorn exited with {proc.returncode}: " + " | ".join(tail))
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise UserError(f"the server did not become healthy in 600 s; its log: {log_path}")


def main(argv=None):
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    folder = tempfile.mkdtemp(prefix="serve_load_")
    results = {"config": {k: v for k, v in vars(args).items()}}
    try:
        ckpt = args.ckpt or make_random_checkpoint(args.model, folder)
        if "engine" not in skip:
            print(f"engine: {args.clients} rows, {args.new_tokens} new tokens ...", file=sys.stderr)
            results["engine"] = engine_offline(args, ckpt)
        proc, port = start_gunicorn(args, ckpt, os.path.join(folder, "gunicorn.log"))
        try:
            for mode in ("nonstream", "stream"):
                if mode in skip:
                    continue
                print(f"server {mode}: {args.clients} clients ...", file=sys.stderr)
                r = run_clients(port, args.clients, request_body(args.prompt_tokens, args.new_tokens, mode == "stream"),
                                args)
                results[mode] = {"tokens_per_s": r["tokens_per_s"], "requests": r["requests"],
                                 "errors": len(r["errors"]), "first_errors": r["errors"][:3]}
                if r["ttft"]:
                    results[mode].update(ttft_p50_ms=round(pct(r["ttft"], 50) * 1e3, 1),
                                         ttft_p95_ms=round(pct(r["ttft"], 95) * 1e3, 1))
                if r["gaps"]:
                    results[mode].update(itl_p50_ms=round(pct(r["gaps"], 50) * 1e3, 2),
                                         itl_p95_ms=round(pct(r["gaps"], 95) * 1e3, 2))
            if "newcomer" not in skip:
                print(f"newcomer: {args.newcomer_streams} streams of {args.newcomer_tokens} tokens ...",
                      file=sys.stderr)
                r = newcomer(port, args)
                results["newcomer"] = {**r, "errors": len(r["errors"]), "first_errors": r["errors"][:3]}
            if "embeddings" not in skip:
                print(f"embeddings: {args.newcomer_streams} streams, then with {args.embed_clients} embedding "
                      f"clients ...", file=sys.stderr)
                r = embeddings(port, args)
                results["embeddings"] = {**r, "errors": len(r["errors"]), "first_errors": r["errors"][:3]}
            if "burst" not in skip:
                print(f"burst: {args.burst} prompts of {args.burst_tokens} tokens ...", file=sys.stderr)
                r = burst(port, args)
                results["burst"] = {**r, "errors": len(r["errors"]), "first_errors": r["errors"][:3]}
            results["cache_on"], lls = prompt_phases(port, args, skip)
            results["prefix_cache"] = json.loads(http_get(port, "/health"))["prefix_cache"]
        finally:
            proc.terminate()
            proc.wait(120)
        if "cacheoff" not in skip and not {"chat", "loglik"} <= skip:
            proc, port = start_gunicorn(args, ckpt, os.path.join(folder, "off.log"), {"GPT2I_PREFIX_CACHE": "0"})
            try:
                results["cache_off"], lls_off = prompt_phases(port, args, skip)
            finally:
                proc.terminate()
                proc.wait(120)
            if lls:
                results["cache_on"]["loglik"]["max_abs_diff_vs_off"] = max(
                    (abs(a - b) for a, b in zip(lls, lls_off) if a is not None and b is not None), default=None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    engine_tps = results.get("engine", {}).get("tokens_per_s")
    chunk_ms = results.get("engine", {}).get("prefill_chunk_ms")
    print(f"\n{'phase':<12} {'tokens/s':>10} {'vs engine':>10} {'requests':>9} {'TTFT p50/p95 ms':>17} "
          f"{'ITL p50/p95 ms':>16} {'errors':>7}")
    for name in ("engine", "nonstream", "stream", "newcomer"):
        r = results.get(name)
        if r is None:
            continue
        tps = r.get("tokens_per_s")
        ratio = f"{tps / engine_tps:.0%}" if tps and engine_tps else ""
        ttft = f"{r['ttft_p50_ms']}/{r['ttft_p95_ms']}" if r.get("ttft_p95_ms") is not None else ""
        itl = f"{r['itl_p50_ms']}/{r['itl_p95_ms']}" if r.get("itl_p95_ms") is not None else ""
        n = r.get("requests", r.get("probes", ""))
        print(f"{name:<12} {tps if tps is not None else '':>10} {ratio:>10} {n:>9} {ttft:>17} {itl:>16} "
              f"{r.get('errors', 0):>7}")
    if "embeddings" in results:
        r = results["embeddings"]
        print(f"stream inter-token p95: {r['itl_p95_ms_idle']} ms alone, {r['itl_p95_ms_burst']} ms during "
              f"{r['embedding_calls_burst']} embedding calls, {args.embed_format} (target: within 2x)")
    if chunk_ms is not None:
        print(f"one prefill chunk (a full step of prompts, idle engine): {chunk_ms} ms; newcomer target: "
              f"TTFT p95 <= 50 ms + {chunk_ms} ms")
    if "burst" in results:
        r = results["burst"]
        print(f"stream inter-token p95: {r['itl_p95_ms_idle']} ms alone, {r['itl_p95_ms_burst']} ms while {args.burst} "
              f"prompts of {args.burst_tokens} tokens arrive (target: within 3x); their first token p50/p95 "
              f"{r['burst_ttft_p50_ms']}/{r['burst_ttft_p95_ms']} ms")
    for label in ("cache_on", "cache_off"):
        r = results.get(label, {})
        if "chat" in r:
            print(f"chat, prefix {label}: first-token ms per turn {r['chat']['ttft_ms_per_turn']} (turn "
                  f"{args.turns} / turn 1: {r['chat']['last_over_first']}; target with the cache <= 1.5)")
        if "loglik" in r:
            print(f"loglik, prefix {label}: {r['loglik']['requests_per_s']} requests/s, {r['loglik']['errors']} errors")
    if "loglik" in results.get("cache_off", {}):
        on, off = results["cache_on"]["loglik"], results["cache_off"]["loglik"]
        print(f"loglik cache on / off: {on['requests_per_s'] / off['requests_per_s']:.2f}x (target >= 2.5); largest "
              f"loglikelihood difference {on['max_abs_diff_vs_off']}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    run_cli(main)
