"""The server's half of the pipe to the engine's process (server/engine_worker.py): admission, the one reader
thread, a dead engine process replaced, and the Prometheus metrics."""

import itertools
import os
import threading
import time
from concurrent import futures

import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common import UserError
from server.config import SHUTTING_DOWN, ApiError, invalid, unavailable
from server.engine_worker import (Add, Cancel, Embed, Failed, LoadFailed, Step, Stop, exit_note, open_engine,
                                  stop_engine)
from server.reply import POLL_S, Handle, Reply
from server.respond import log

PREFIX_CACHE = {"hits": (CounterMetricFamily, "Prompts that reused a cached prefix."),
                "misses": (CounterMetricFamily, "Prompts that found none."),
                "hit_tokens": (CounterMetricFamily, "Prompt tokens not prefilled thanks to the cache."),
                "evicted_blocks": (CounterMetricFamily, "Blocks recycled for newer prefixes."),
                "blocks_used": (GaugeMetricFamily, "Pool blocks holding a prefix. (16 tokens a block)"),
                "blocks_total": (GaugeMetricFamily, "Pool blocks. (16 tokens a block)")}
EMBED_TIMEOUT_S = 120.0  # how long an embeddings call waits for the engine


class Metrics:
    """An app's Prometheus metrics; the gauges and prefix-cache series are read off the client when scraped."""

    def __init__(self, client):
        prom.disable_created_metrics()  # no *_created samples: they double the exposition for nothing
        r = self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("gpt2i_requests", "HTTP requests by endpoint and status.",
                                     ["endpoint", "status"], registry=r)
        self.latency = prom.Histogram("gpt2i_request_latency_seconds", "Request latency (streams: to the end).",
                                      ["endpoint"], registry=r,
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = prom.Counter("gpt2i_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"],
                                   registry=r)
        self.cancelled = prom.Counter("gpt2i_cancelled", "Generations cancelled (client gone or shutdown).", registry=r)
        self.ttft = prom.Histogram("gpt2i_time_to_first_token_seconds", "Admission to first output.", registry=r,
                                   buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = prom.Histogram("gpt2i_inter_token_latency_seconds", "Time between tokens of one choice.",
                                  registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.restarts = prom.Counter("gpt2i_engine_restarts", "Engine processes replaced after they died.", registry=r)
        for name, help_, value in (
                ("gpt2i_requests_waiting", "Requests waiting for the engine.", lambda: client.stats["waiting"]),
                ("gpt2i_requests_running", "Requests being decoded.", lambda: client.stats["running"]),
                ("gpt2i_kv_slots_used", "KV-cache slots in use.", lambda: client.stats["slots_used"]),
                ("gpt2i_kv_slots_total", "KV-cache slots.", lambda: client.stats["slots_total"]),
                ("gpt2i_requests_admitted", "Generations held against --max-queue.", client.admitted),
                ("gpt2i_model_loaded", "1 when the model is loaded.", lambda: int(client.status == "ok"))):
            prom.Gauge(name, help_, registry=r).set_function(value)
        self.client = client
        r.register(self)  # collect() below

    def collect(self):
        """gpt2i_prefix_cache_*: the engine's counters as of its last step, and the pool's use."""
        stats = self.client.stats.get("prefix_cache") or {}
        for key, (family, help_) in PREFIX_CACHE.items():
            yield family(f"gpt2i_prefix_cache_{key}", help_, value=stats.get(key, 0))


class EngineClient:
    """create_app builds one; serve.state(app) is it."""

    def __init__(self, config):
        self.config, self.model_name = config, config.model_name
        self.status, self.error, self.restarts = "loading", None, 0
        self.info, self.context_length = {}, None  # info: what /health shows, from the engine process
        self.stats = {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 0}  # as of the last step
        self.created, self.accepting = int(time.time()), True
        self._replies = set()  # admitted and not released
        self._handles = {}  # engine request id -> Handle, until every choice has finished
        self._embeds = {}  # embedding job id -> Future of its vectors (cancelled if the engine process dies)
        self._ids = itertools.count()
        self._lock, self._send_lock = threading.Lock(), threading.Lock()  # a pipe takes one sender at a time
        self._ready, self._closed, self._conn, self._proc = threading.Event(), False, None, None
        self._thread = threading.Thread(target=self._run, name="gpt2i-reader", daemon=True)
        self.metrics = Metrics(self)

    def admitted(self):
        return sum(r.size for r in self._replies)

    def start(self):
        """Start the thread that opens the engine (engine_worker.open_engine) and reads it."""
        self._thread.start()

    def wait_ready(self, timeout=None):
        """True when the model is loaded, False on timeout; a failed load raises UserError."""
        self._ready.wait(timeout)
        if self.status == "error":
            raise UserError(f"model load failed: {self.error}")
        return self.status == "ok"

    def begin_shutdown(self):
        """Stop admission: new requests and those still queued get 503 shutting_down."""
        with self._lock:
            self.accepting = False
            for r in [r for r in self._replies if not r.started and r.ended is None]:
                self._end(r, unavailable("shutting_down", SHUTTING_DOWN, 5))

    def close(self, timeout=0.0):
        """Shut down: running streams get `timeout` seconds to finish, then end with an error event;
        the engine process and the reader thread stop. Idempotent."""
        self.begin_shutdown()
        for wait in (timeout, 2.0):  # running streams finish; then they end and write their last event
            deadline = time.monotonic() + wait
            while self._replies and time.monotonic() < deadline:
                time.sleep(POLL_S / 2)
            self._fail_all(unavailable("shutting_down", "the server shut down before this generation finished", 5))
        self._closed = True
        if self._proc is not None:
            self._send(Stop())
        stop_engine(self._conn, self._proc)  # no lock held: request threads still send their Cancels
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(10.0)

    def _send(self, message):
        """One message to the engine process; False when it is gone."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):
            return False

    def _end(self, reply, error):
        """End a reply with an error (under self._lock): its engine requests are cancelled."""
        reply.ended = error
        reply.queue.put(error)
        for handle in reply.handles:
            self._send(Cancel(handle.id))

    def _fail_all(self, error):
        with self._lock:
            for r in [r for r in self._replies if r.ended is None]:
                self._end(r, error)

    def _run(self):
        """Per engine process: its load result, then its messages until it stops; a dead one is replaced."""
        while not self._closed:
            self._conn, self._proc = open_engine(self.config, lambda: self._closed)
            if self._closed:
                return
            try:
                first = self._conn.recv()
            except (EOFError, OSError):
                if self._proc is None:
                    continue  # the master's engine died as this worker connected: the next one
                first = LoadFailed(f"the engine process exited while loading ({exit_note(self._proc)})")
            if isinstance(first, LoadFailed):  # reported by /health and wait_ready, never a crash
                self.status, self.error = "error", first.error
                self._ready.set()
                return
            self.info, self.context_length, self.stats = first.info, first.info["context_length"], first.stats
            self._ids = itertools.count(first.id_base)
            self.status = "ok"
            self._ready.set()
            log.info({"event": "model_loaded", "model": self.model_name, **self.info, "pid": os.getpid()})
            self._read()
            if self._closed:
                return
            # the engine process died: end what ran with an error; the next turn starts or finds a new one
            self.status, self.restarts = "restarting", self.restarts + 1
            self.error = f"the engine process exited ({exit_note(self._proc)}); a new one is loading"
            self.metrics.restarts.inc()
            log.error({"event": "engine_exited", "error": self.error, "restarts": self.restarts})
            self._fail_all(ApiError(500, "server_error", "generation failed: the engine process exited"))
            with self._lock:
                self._handles.clear()
            for call in list(self._embeds.values()):
                call.cancel()

    def _read(self):
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                return
            match message:
                case Step(outputs, embedded, stats):
                    now = time.perf_counter()
                    with self._lock:
                        for out in outputs:
                            handle = self._handles.get(out.request_id)
                            if handle is not None and handle.reply.deliver(handle, out, now, self.metrics):
                                del self._handles[handle.id]
                    self.stats = stats
                    for job_id, vectors in embedded:
                        if (call := self._embeds.get(job_id)) is not None:  # None: the caller gave up
                            call.set_result(vectors)
                case Failed(request_ids, error):
                    with self._lock:
                        for rid in request_ids:
                            handle = self._handles.pop(rid, None)
                            if handle is not None and handle.reply.ended is None:
                                self._end(handle.reply, ApiError(500, "server_error", f"generation failed: {error}"))

    def require_ready(self):
        if self.status != "ok" or not self.accepting:
            raise unavailable(*{"loading": ("model_loading", "the model is still loading; retry shortly", 2),
                                "restarting": ("engine_restarting", f"{self.error}; retry shortly", 2),
                                "error": ("model_error", f"the model failed to load: {self.error}", 60),
                                }.get(self.status, ("shutting_down", SHUTTING_DOWN, 5)))

    def prompt_limit(self):
        return min(self.config.max_prompt_tokens or self.context_length - 1, self.context_length - 1)

    def admit(self, prompts, stream, n=1, logprobs=None, echo=False):
        """Queue one engine request per prompt [(ids, fitted SamplingParams)] with n choices each -> a
        Reply. Each prompt x n counts against --max-queue: 503 when full, 400 when it never fits."""
        self.require_ready()
        size, cap = len(prompts) * n, self.config.max_queue
        if size > cap:
            raise invalid("n" if len(prompts) == 1 else "prompt", f"this request asks for {size} generations "
                          f"(prompts x n); the server admits at most {cap} at once (--max-queue)")
        reply = Reply(size, stream)
        with self._lock:
            if not self.accepting:
                raise unavailable("shutting_down", SHUTTING_DOWN, 5)
            if self.admitted() + size > cap:
                raise unavailable("overloaded", f"the server is busy ({cap} generations in progress); retry shortly", 1)
            self._replies.add(reply)
            group = next(self._ids)
            for i, (ids, _) in enumerate(prompts):
                handle = Handle(next(self._ids), n, reply, i * n)
                self._handles[handle.id] = handle
                reply.handles.append(handle)
                reply.prompt_tokens += len(ids)
        for handle, (ids, p) in zip(reply.handles, prompts):
            if not self._send(Add(handle.id, ids, p, n, logprobs, echo, group)):
                self.release(reply)
                raise ApiError(500, "server_error", "generation failed: the engine stopped")
        self.metrics.tokens.labels("prompt").inc(reply.prompt_tokens)
        return reply

    def release(self, reply):
        """The HTTP side is done with a reply (idempotent): cancel what still runs, free its place."""
        for handle in reply.handles:
            if not handle.done:
                self._send(Cancel(handle.id))
        reply.t_end = reply.t_end or time.perf_counter()
        with self._lock:
            self._replies.discard(reply)

    def embed(self, inputs):
        """Embeddings of id lists (checked), computed by the engine a slice per step."""
        self.require_ready()
        job = next(self._ids)
        call = self._embeds[job] = futures.Future()
        try:
            if self._send(Embed(job, inputs)):
                return call.result(EMBED_TIMEOUT_S)
        except (futures.TimeoutError, futures.CancelledError):
            pass
        finally:
            del self._embeds[job]
        raise ApiError(500, "server_error", "embedding failed: the engine did not answer")
