"""
Server load: the production server (gunicorn, as the README starts it) under N concurrent HTTP
clients, against the engine's own offline throughput at the same batch, in one run.

    python bench/serve_load.py                                  # GPU: random GPT-2 124M, 64 clients, 256 new tokens
    python bench/serve_load.py --ckpt out/demo/sft --dtype bfloat16
    python bench/serve_load.py --model tiny --clients 8 --duration 20    # CPU, a few minutes

Phases, each a steady state of --duration seconds after --warmup seconds:
1. engine: inference.Engine in this process, --clients rows kept full (a finished request is replaced at
   once); also one step of prompts on the idle engine (one prefill chunk: the newcomer allowance), and,
   unless "loglik" is skipped, the loglik phase's requests on the engine alone, prefix cache on and off.
2. nonstream, stream: --clients threads sending /v1/completions back to back, each on one keep-alive
   loopback connection, to `gunicorn -c gunicorn.conf.py "serve:create_app()"` set by GPT2I_* variables.
3. newcomer: a 16-token request (16-token prompt) every 0.25 s beside --newcomer-streams streams of
   --newcomer-tokens tokens; its time to first token.
4. embeddings, burst: those streams' inter-token p95 alone, then beside --embed-clients clients sending
   /v1/embeddings (16 inputs of 16 tokens) back to back, or beside --burst prompts of --burst-tokens
   random ids (1 new token) arriving at once (after an untimed burst).
5. chat, loglik: on this server and on one with the prefix cache off (unless "cacheoff" is skipped).
   chat: --turns turns (the transcript as raw text), each a ~35-token message and a 48-token reply;
   median first-token time per turn over 3 conversations. loglik: the committed HellaSwag rows as
   lm-evaluation-harness sends them (ids of context + ending, echo, logprobs 1, max_tokens 1, longest
   first; --shots solved examples before each context) by --clients clients: requests/s, and the largest
   loglikelihood difference between cache on and off.
Throughput: completion tokens made inside the window, divided by it (over HTTP, each request's tokens
spread evenly over its lifetime). Prompts are token ids and end-of-text is ignored, so every request
makes exactly --new-tokens tokens. Prints a table; the last line is JSON.
"""

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import inference  # noqa: E402
from bench.prefill import MODELS, random_ids, timed  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from cli import CLIParser, DefaultsFormatter, UserError, bounded, run_cli  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import encode  # noqa: E402

PROBE_EVERY = 0.25  # seconds between newcomer probes
STREAM = {"stream": True, "stream_options": {"include_usage": True}}  # usage: the completion tokens of a stream


def parse_args(argv):
    p = CLIParser(description=__doc__.strip().split("\n\n")[0], formatter_class=DefaultsFormatter)
    count = bounded(int, 1)
    p.add_argument("--model", choices=sorted(MODELS), default="gpt2", help="random-weight model (without --ckpt)")
    p.add_argument("--ckpt", default=None, help="a checkpoint to serve instead of random weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the decode step (engine and server alike)")
    p.add_argument("--clients", type=count, default=64, help="concurrent HTTP clients = the engine's batch")
    p.add_argument("--workers", type=count, default=1, help="gunicorn workers (GPT2I_WORKERS) in front of the engine")
    p.add_argument("--new-tokens", type=count, default=256, help="completion tokens per request")
    p.add_argument("--prompt-tokens", type=count, default=16, help="prompt tokens per request")
    p.add_argument("--duration", type=bounded(float, 0, inclusive=False), default=30.0,
                   help="measured seconds per phase")
    p.add_argument("--warmup", type=bounded(float, 0), default=5.0, help="seconds before each measurement starts")
    p.add_argument("--newcomer-streams", type=count, default=32, help="background streams in the newcomer phase")
    p.add_argument("--newcomer-tokens", type=count, default=512, help="tokens of each background stream")
    p.add_argument("--prefill-chunk", type=int, default=None, help="server and engine (default: per device)")
    p.add_argument("--embed-clients", type=int, default=8, help="embedding clients in the embeddings phase")
    p.add_argument("--embed-format", choices=["base64", "float"], default="base64",
                   help="their encoding_format (base64: what the openai SDK asks for unless told otherwise)")
    p.add_argument("--burst", type=int, default=32, help="prompts sent at once in the burst phase")
    p.add_argument("--burst-tokens", type=int, default=1000)
    p.add_argument("--turns", type=int, default=10, help="chat turns")
    p.add_argument("--rows", type=int, default=200, help="HellaSwag rows (4 requests each)")
    p.add_argument("--shots", type=bounded(int, 0), default=0,
                   help="solved HellaSwag examples before each context (lm-eval's --num_fewshot)")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: engine, nonstream, stream, newcomer, "
                                              "embeddings, burst, chat, loglik, cacheoff")
    args = p.parse_args(argv)
    if args.ckpt and not os.path.exists(args.ckpt):
        raise UserError(f"checkpoint not found: {args.ckpt}")
    return args


def make_random_checkpoint(name, folder):
    torch.manual_seed(0)
    cfg = GPTConfig(**MODELS[name])
    return save_checkpoint(os.path.join(folder, "ckpt.pt"), kind="sft", model_state=GPT(cfg).state_dict(),
                           config=cfg.to_dict(), step=0)


def completions(prompt_tokens, max_tokens, stream):
    """(path, rng -> a body of new random prompt ids) of /v1/completions requests."""
    return "/v1/completions", lambda rng: {"prompt": random_ids(prompt_tokens, rng), "max_tokens": max_tokens,
                                           "ignore_eos": True, **(STREAM if stream else {"stream": False})}


def ms(values, q):
    """q-th percentile (nearest rank) of seconds, in ms; None for no values."""
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))] * 1e3, 2)


def say(message):
    print(message, file=sys.stderr)


# ---------------------------------------------------------------------- phase 1: the engine alone


def engine_offline(args, model, info):
    """tokens/s of inference.Engine with --clients rows kept full, in this process."""
    say(f"engine: {args.clients} rows, {args.new_tokens} new tokens ...")
    engine = inference.Engine(model, max_batch=args.clients, prefill_chunk=args.prefill_chunk, compile=args.compile)
    engine.warmup()  # CUDA graphs captured up front, as the server does before it is healthy
    rng = random.Random(0)
    chunk_ms = prefill_chunk_ms(engine, engine.scheduler.prefill_chunk, rng)
    params = inference.validate_params(max_new_tokens=args.new_tokens, temperature=0.8, ignore_eos=True)
    for _ in range(args.clients):
        engine.add(random_ids(args.prompt_tokens, rng), params)
    start = time.perf_counter() + args.warmup
    tokens = 0
    while True:
        outs = engine.step()
        now = time.perf_counter()
        if now >= start + args.duration:
            break
        for o in outs:
            if now >= start:
                tokens += len(o.token_ids)
            if o.finish_reason is not None:
                engine.add(random_ids(args.prompt_tokens, rng), params)
    return {"tokens_per_s": round(tokens / args.duration, 1), "prefill_chunk_ms": chunk_ms, "device": info["device"],
            "dtype": info["dtype"]}


def engine_loglik(args, model, skip):
    """requests/s of inference.Engine alone on the loglik phase's requests, --clients in flight (a finished one
    replaced at once), prefix cache on and off: what the server's loglik phase could reach."""
    params, out = inference.validate_params(max_new_tokens=1, temperature=0), {}
    for label in ("cache_on", "cache_off")[:1 if "cacheoff" in skip else 2]:
        say(f"loglik, the engine alone, prefix {label} ...")
        engine = inference.Engine(model, max_batch=args.clients, prefill_chunk=args.prefill_chunk,
                                  prefix_cache=label == "cache_on")
        engine.warmup()
        for pairs in (hellaswag_pairs(2, args.shots), hellaswag_pairs(args.rows, args.shots)):  # the first untimed
            queue, running, t0 = pairs[::-1], 0, time.perf_counter()  # pop(): longest first, as sent
            while queue or running:
                while queue and running < args.clients:
                    ctx, end = queue.pop()
                    engine.add(ctx + end, params, logprobs=1, echo=True)
                    running += 1
                running -= sum(o.finish_reason is not None for o in engine.step())
        out[label] = round(len(pairs) / (time.perf_counter() - t0), 2)
        del engine
        torch.cuda.empty_cache()
    return out


def prefill_chunk_ms(engine, n, rng):
    """Median milliseconds from add() to the first tokens of prompts that fill one n-token step on the idle
    engine: one prefill chunk, the newcomer target's allowance."""
    params = inference.validate_params(max_new_tokens=1, temperature=0.8, ignore_eos=True)
    width = min(n, engine.config.block_size - 1)

    def fill():
        for _ in range(min(engine.max_batch, n // width)):
            engine.add(random_ids(width, rng), params)
        while engine.has_work():
            engine.step()

    return round(timed(fill, engine.device, 5) * 1e3, 1)


# ---------------------------------------------------------------------- the server's phases


class Stack:
    """`gunicorn -c gunicorn.conf.py` on 127.0.0.1, alone on its port or (nginx=True) behind nginx as
    `make serve-prod` runs it."""

    def __init__(self, ckpt, folder, nginx=False, env=None, args=()):
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


def request(port, method, path, body=None, headers=None, timeout=30.0):
    """One request on a fresh connection -> (status, headers, body text). OSError when unanswered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def post(conn, path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise ValueError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    return resp


@dataclass
class Record:
    """One request as send() saw it."""
    start: float
    end: float
    tokens: int  # completion tokens (usage)
    ttft: float | None = None  # seconds to the first chunk with text (streams)
    gaps: list = field(default_factory=list)  # [(arrival, seconds since the previous chunk)]
    text: str = ""


class Client(threading.Thread):
    """Sends requests (path, body maker) back to back on one keep-alive connection until told to stop (or
    once); keeps their send() records and the errors."""

    def __init__(self, port, requests, stop, seed, once=False):
        super().__init__(daemon=True)
        (self.path, self.make_body), self.port, self.stop, self.once = requests, port, stop, once
        self.rng = random.Random(seed)
        self.records, self.errors = [], []

    def run(self):
        conn = None
        while not self.stop.is_set():
            try:
                conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                self.records.append(send(conn, self.path, self.make_body(self.rng)))
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.errors.append(f"{type(e).__name__}: {e}")
                conn = None
                time.sleep(0.1)
            if self.once:
                return


def send(conn, path, body):
    """One request -> its Record (a stream's chunks timed as they arrive)."""
    t0 = time.perf_counter()
    resp = post(conn, path, body)
    if not body.get("stream"):
        return Record(t0, time.perf_counter(), json.loads(resp.read())["usage"].get("completion_tokens", 0))
    arrivals, usage, text = [], None, ""
    for line in resp:
        if line.startswith(b"data: {"):
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            if chunk["choices"]:
                arrivals.append(time.perf_counter())
                text += chunk["choices"][0]["text"]
    return Record(t0, time.perf_counter(), usage["completion_tokens"], arrivals[0] - t0 if arrivals else None,
                  [(b, b - a) for a, b in zip(arrivals, arrivals[1:])], text)


def launch(threads):
    for t in threads:
        t.start()
    return threads


def finish(stop, threads):
    stop.set()
    for t in threads:
        t.join(600)
    return [e for t in threads for e in t.errors]


def background(port, args, stop, seed):
    """--newcomer-streams streams of --newcomer-tokens tokens, started."""
    return launch([Client(port, completions(args.prompt_tokens, args.newcomer_tokens, True), stop, seed + i)
                   for i in range(args.newcomer_streams)])


def clients(port, args, stream):
    """--clients clients for warmup + duration seconds: tokens/s in the window, requests ended in it, their
    first-token and inter-token percentiles."""
    say(f"server {'stream' if stream else 'nonstream'}: {args.clients} clients ...")
    stop = threading.Event()
    t0 = time.perf_counter()
    threads = launch([Client(port, completions(args.prompt_tokens, args.new_tokens, stream), stop, i)
                     for i in range(args.clients)])
    time.sleep(args.warmup + args.duration)
    errors = finish(stop, threads)
    start_s, end = t0 + args.warmup, t0 + args.warmup + args.duration
    records = [r for c in threads for r in c.records]
    tokens = sum(r.tokens * max(0.0, min(r.end, end) - max(r.start, start_s)) / max(r.end - r.start, 1e-9)
                 for r in records)
    done = [r for r in records if start_s <= r.end <= end]
    out = {"tokens_per_s": round(tokens / args.duration, 1), "requests": len(done), "errors": errors}
    ttft, gaps = [r.ttft for r in done if r.ttft is not None], [g for r in done for _, g in r.gaps]
    if ttft:
        out.update(ttft_p50_ms=ms(ttft, 50), ttft_p95_ms=ms(ttft, 95))
    if gaps:
        out.update(itl_p50_ms=ms(gaps, 50), itl_p95_ms=ms(gaps, 95))
    return out


def newcomer(port, args):
    """Time to first token of a 16-token request while --newcomer-streams long streams run."""
    say(f"newcomer: {args.newcomer_streams} streams of {args.newcomer_tokens} tokens ...")
    stop = threading.Event()
    streams = background(port, args, stop, 1000)
    time.sleep(args.warmup)
    ttfts, errors, end = [], [], time.perf_counter() + args.duration
    while time.perf_counter() < end:
        probe = Client(port, completions(16, 16, True), stop, len(ttfts), once=True)
        probe.run()
        ttfts += [r.ttft for r in probe.records]
        errors += probe.errors
        time.sleep(PROBE_EVERY)
    errors += finish(stop, streams)
    return {"probes": len(ttfts), "ttft_p50_ms": ms(ttfts, 50), "ttft_p95_ms": ms(ttfts, 95), "errors": errors}


def embeddings(port, args):
    """Inter-token p95 of running streams alone, then while --embed-clients send /v1/embeddings calls."""
    say(f"embeddings: {args.newcomer_streams} streams, then with {args.embed_clients} embedding clients ...")
    out, errors = {}, []
    make_body = lambda rng: {"input": [random_ids(16, rng) for _ in range(16)],  # noqa: E731
                             "encoding_format": args.embed_format}
    for label, n_embed in (("idle", 0), ("burst", args.embed_clients)):
        stop = threading.Event()
        streams = background(port, args, stop, 2000)
        embedders = launch([Client(port, ("/v1/embeddings", make_body), stop, i) for i in range(n_embed)])
        time.sleep(args.warmup + args.duration)
        errors += finish(stop, streams + embedders)
        out[f"itl_p95_ms_{label}"] = ms([g for c in streams for r in c.records for _, g in r.gaps], 95)
        out[f"embedding_calls_{label}"] = sum(len(c.records) for c in embedders)
    return {**out, "errors": errors}


def burst(port, args):
    """Inter-token p95 of --newcomer-streams streams alone, then while --burst prompts of --burst-tokens
    tokens arrive at once (non-streaming, 1 new token: their latency is their first-token time)."""
    say(f"burst: {args.burst} prompts of {args.burst_tokens} tokens ...")
    stop = threading.Event()
    streams = background(port, args, stop, 3000)
    prompts, warm = ([Client(port, completions(args.burst_tokens, 1, False), stop, seed + i, once=True)
                      for i in range(args.burst)] for seed in (4000, 5000))
    for c in launch(warm):  # untimed: a server's first long prompts meet new shapes and an empty prefix pool
        c.join(600)
    time.sleep(args.warmup)
    t_idle = time.perf_counter()
    time.sleep(min(args.duration, 5.0))
    t0 = time.perf_counter()
    for c in launch(prompts):
        c.join(600)
    t1 = time.perf_counter()
    errors = finish(stop, streams + prompts + warm)
    gaps = [gap for c in streams for r in c.records for gap in r.gaps]
    ttft = [r.end - r.start for c in prompts for r in c.records]
    return {"itl_p95_ms_idle": ms([g for t, g in gaps if t_idle <= t < t0], 95),
            "itl_p95_ms_burst": ms([g for t, g in gaps if t0 <= t < t1], 95), "burst_ttft_p50_ms": ms(ttft, 50),
            "burst_ttft_p95_ms": ms(ttft, 95), "prompt_tokens_per_s": round(len(ttft) * args.burst_tokens / (t1 - t0)),
            "errors": errors}


def chat(port, args):
    """Median first-token ms of each turn over 3 conversations (after an untimed one)."""
    say(f"chat: {args.turns} turns ...")
    conn, words = http.client.HTTPConnection("127.0.0.1", port, timeout=600), " the of and to in is was that for on"
    turns = []
    for seed in range(4):
        rng, transcript, ttfts = random.Random(seed), "", []
        for _ in range(args.turns):
            prompt = transcript + "User: " + " ".join(rng.choice(words.split()) for _ in range(32)) + "\nAssistant:"
            r = send(conn, "/v1/completions", {"prompt": prompt, "raw": True, "max_tokens": min(48, args.new_tokens),
                                               "temperature": 0, "ignore_eos": True, **STREAM})
            ttfts.append(r.ttft)
            transcript = prompt + r.text + "\n"
        turns += [ttfts] if seed else []
    per_turn = [ms([t[i] for t in turns], 50) for i in range(args.turns)]
    return {"ttft_ms_per_turn": per_turn, "last_over_first": round(per_turn[-1] / per_turn[0], 2),
            "last_prompt_tokens": len(encode(prompt))}


def hellaswag_pairs(rows, shots=0):
    """(context ids, ending ids) as lm-evaluation-harness splits them, longest first as it sends them. shots:
    its few-shot context (--num_fewshot), solved examples drawn per row from the other committed rows,
    as many as fit 1,000 tokens."""
    with open(os.path.join(ROOT, "tests", "data", "hellaswag_val_200.jsonl"), encoding="utf-8") as f:
        data = [json.loads(line) for line in f]
    rng, pairs = random.Random(1234), []
    for i, r in enumerate(data[:rows]):
        examples = [f"{x['activity_label']}: {x['ctx']} {x['endings'][x['label']]}\n\n"
                    for x in rng.sample(data[:i] + data[i + 1:], min(shots, len(data) - 1))]
        text = f"{r['activity_label']}: {r['ctx']}"
        while len(encode("".join(examples) + text)) > 900:
            examples.pop()
        ctx = encode("".join(examples) + text)
        pairs += [(ctx, encode("".join(examples) + f"{text} {e}")[len(ctx):]) for e in r["endings"]]
    return sorted(pairs, key=lambda p: (-len(p[0] + p[1]), p[0] + p[1]))


def loglik(port, pairs, clients):
    """Every (context, ending) as one echo request, by `clients` threads with a connection each -> requests/s
    and the loglikelihoods (None: failed)."""
    local = threading.local()

    def one(pair):
        ctx, end = pair
        body = {"prompt": ctx + end, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
        try:
            local.conn = getattr(local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            lps = json.loads(post(local.conn, "/v1/completions", body).read())["choices"][0]["logprobs"]
            return sum(lps["token_logprobs"][len(ctx):len(ctx) + len(end)])
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            local.conn = None
            return None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, pairs))
    return {"requests_per_s": round(len(pairs) / (time.perf_counter() - t0), 2), "errors": out.count(None)}, out


def prompt_phases(port, args, skip):
    """chat and loglik on one server -> (results, loglikelihoods)."""
    out, lls = {}, None
    if "chat" not in skip:
        out["chat"] = chat(port, args)
    if "loglik" not in skip:
        say(f"loglik: {args.rows} HellaSwag rows ...")
        loglik(port, hellaswag_pairs(2, args.shots), args.clients)  # untimed: first shapes
        out["loglik"], lls = loglik(port, hellaswag_pairs(args.rows, args.shots), args.clients)
    return out, lls


SERVER_PHASES = {"nonstream": lambda port, args: clients(port, args, False),
                 "stream": lambda port, args: clients(port, args, True),
                 "newcomer": newcomer, "embeddings": embeddings, "burst": burst}


def server(args, ckpt, folder, **env):
    """gunicorn as the README starts it, with an engine row per client."""
    rows = max(args.clients, args.newcomer_streams + 1)
    env = {"GPT2I_WORKERS": str(args.workers), "GPT2I_THREADS": str(rows + 8), "GPT2I_MAX_BATCH": str(rows),
           "GPT2I_MAX_QUEUE": str(rows + 8), "GPT2I_DEVICE": args.device, "GPT2I_DTYPE": args.dtype,
           "GPT2I_COMPILE": "1" if args.compile else "0", "GPT2I_LOG_LEVEL": "warning", **env}
    if args.prefill_chunk:
        env["GPT2I_PREFILL_CHUNK"] = str(args.prefill_chunk)
    return Stack(ckpt, folder, env=env)


def main(argv=None):
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {"config": dict(vars(args))}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as folder:
        ckpt = args.ckpt or make_random_checkpoint(args.model, folder)
        if "engine" not in skip:
            model, info = inference.load_model_from_checkpoint(ckpt, device=args.device, dtype=args.dtype)
            results["engine"] = engine_offline(args, model, info)
            if "loglik" not in skip:
                results["loglik_engine"] = engine_loglik(args, model, skip)
            del model
            torch.cuda.empty_cache()  # the engine's model and cache are gone: the server gets the memory
        with server(args, ckpt, folder) as stack:
            stack.wait_healthy(600)
            for name, phase in SERVER_PHASES.items():
                if name not in skip:
                    r = phase(stack.port, args)
                    results[name] = {**r, "errors": len(r["errors"]), "first_errors": r["errors"][:3]}
            results["cache_on"], lls = prompt_phases(stack.port, args, skip)
            results["prefix_cache"] = json.loads(request(stack.port, "GET", "/health")[2])["prefix_cache"]
        if "cacheoff" not in skip and not {"chat", "loglik"} <= skip:
            with server(args, ckpt, folder, GPT2I_PREFIX_CACHE="0") as stack:
                stack.wait_healthy(600)
                results["cache_off"], lls_off = prompt_phases(stack.port, args, skip)
            if lls:
                results["cache_on"]["loglik"]["max_abs_diff_vs_off"] = max(
                    (abs(a - b) for a, b in zip(lls, lls_off) if a is not None and b is not None), default=None)
    report(results, args)
    return 0


LINES = {  # phase: its report line, formatted with its results and the flags
    "embeddings": "stream inter-token p95: {itl_p95_ms_idle} ms alone, {itl_p95_ms_burst} ms during "
                  "{embedding_calls_burst} embedding calls, {embed_format} (target: within 2x)",
    "engine": "one prefill chunk (a full step of prompts, idle engine): {prefill_chunk_ms} ms; newcomer target: "
              "TTFT p95 <= 50 ms + {prefill_chunk_ms} ms",
    "burst": "stream inter-token p95: {itl_p95_ms_idle} ms alone, {itl_p95_ms_burst} ms while {burst} prompts of "
             "{burst_tokens} tokens arrive (target: within 3x); their first token p50/p95 "
             "{burst_ttft_p50_ms}/{burst_ttft_p95_ms} ms",
    "chat": "chat, prefix {label}: first-token ms per turn {ttft_ms_per_turn} (turn {turns} / turn 1: "
            "{last_over_first}; target with the cache <= 1.5)",
    "loglik": "loglik, {shots}-shot, prefix {label}: {requests_per_s} requests/s, {errors} errors"}


def report(results, args):
    """The table of throughput phases, a line per other phase with its target, then the JSON line."""
    engine_tps = results.get("engine", {}).get("tokens_per_s")
    print(f"\n{'phase':<12} {'tokens/s':>10} {'vs engine':>10} {'requests':>9} {'TTFT p50/p95 ms':>17} "
          f"{'ITL p50/p95 ms':>16} {'errors':>7}")
    for name in ("engine", "nonstream", "stream", "newcomer"):
        if name in results:
            r = results[name]
            tps = r.get("tokens_per_s", "")
            ratio = f"{tps / engine_tps:.0%}" if tps and engine_tps else ""
            ttft = f"{r['ttft_p50_ms']}/{r['ttft_p95_ms']}" if r.get("ttft_p95_ms") is not None else ""
            itl = f"{r['itl_p50_ms']}/{r['itl_p95_ms']}" if r.get("itl_p95_ms") is not None else ""
            print(f"{name:<12} {tps:>10} {ratio:>10} {r.get('requests', r.get('probes', '')):>9} {ttft:>17} "
                  f"{itl:>16} {r.get('errors', 0):>7}")
    for name in ("embeddings", "engine", "burst"):
        if name in results:
            print(LINES[name].format_map({**vars(args), **results[name]}))
    for label in ("cache_on", "cache_off"):
        for name, r in results.get(label, {}).items():
            print(LINES[name].format_map({**vars(args), **r, "label": label}))
    if "loglik_engine" in results:
        print("loglik, the engine alone: " + ", ".join(f"prefix {k} {v} requests/s" for k, v in
                                                       results["loglik_engine"].items()))
    if "loglik" in results.get("cache_off", {}):
        on, off = results["cache_on"]["loglik"], results["cache_off"]["loglik"]
        print(f"loglik cache on / off: {on['requests_per_s'] / off['requests_per_s']:.2f}x (target >= 2.5); largest "
              f"loglikelihood difference {on['max_abs_diff_vs_off']}")
    print(json.dumps(results))


if __name__ == "__main__":
    run_cli(main)
