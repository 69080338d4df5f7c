"""The engine's process and the typed messages of its pipe: the server sends Add / Cancel / Embed / Stop; the
engine answers Ready or LoadFailed once, then a Step per engine step (or Failed when a step raised). Either a
server's own process (python serve.py: engine_process) or, under gunicorn, one the master starts (main) and
every worker connects to over a unix socket, with the same messages."""

import contextlib
import itertools
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener, wait

from common import UserError, freeze_heap
from engine.llm_engine import Engine
from engine.loader import load_model_from_checkpoint
from engine.sampling_params import SamplingParams
from grammar import ConstraintError, compile_constraint
from server.config import make_config


@dataclass
class Add:
    request_id: int
    ids: list
    params: SamplingParams
    n: int
    logprobs: int  # or None
    echo: bool
    group: int  # the HTTP request: the scheduler's fairness turn


@dataclass
class Cancel:
    request_id: int


@dataclass
class Embed:
    job_id: int
    inputs: list


@dataclass
class Stop:
    pass


@dataclass
class Ready:
    info: dict  # what /health shows: device, dtype, quantize, context_length, graphs_captured, engine_pid
    stats: dict
    id_base: int = 0  # the shared engine's: this connection's request ids start here


@dataclass
class LoadFailed:
    error: str


@dataclass
class Step:
    outputs: list  # engine Outputs
    embedded: list  # (job id, float32 array (inputs, C))
    stats: dict


@dataclass
class Failed:
    request_ids: list
    error: str


def load(cfg):
    """The model and its engine for a server config -> (engine, its Ready); a failed load raises."""
    model, info = load_model_from_checkpoint(cfg.ckpt, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
    engine = Engine(model, max_batch=cfg.max_batch, prefill_chunk=cfg.prefill_chunk, compile=cfg.compile,
                    prefix_cache=cfg.prefix_cache, prefix_cache_mb=cfg.prefix_cache_mb)
    graphs = engine.warmup()  # CUDA: no request waits for a capture
    return engine, Ready({"device": info["device"], "dtype": info["dtype"], "quantize": info["quantize"],
                          "context_length": int(model.config.block_size), "graphs_captured": graphs,
                          "engine_pid": os.getpid()}, engine.stats())


def first_line(error):
    return (str(error).splitlines() or [type(error).__name__])[0]


def engine_process(conn, cfg):
    """A server's own engine process (python serve.py): load the model, then serve the pipe until Stop or
    the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the server decides
    try:
        engine, ready = load(cfg)
    except Exception as e:
        conn.send(LoadFailed(first_line(e)))
        return
    conn.send(ready)
    freeze_heap()  # the model, torch and the captures live as long as the process
    engine_loop(conn, engine)


def main(argv=None):
    """The engine process gunicorn's master starts (gunicorn.conf.py) and every worker connects to:
    GPT2I_* configure it, and it listens on GPT2I_ENGINE_SOCKET once the model is loaded. SIGUSR1 retires
    it: it exits once its workers have gone.
    A model that cannot load is a UserError: one line, exit 2 (run_cli)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the master stops it, after its workers
    retired = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: retired.set())
    cfg = make_config(None, environ=os.environ)
    try:
        engine, ready = load(cfg)
    except Exception as e:
        raise UserError(f"model load failed: {first_line(e)}") from None
    listener = Listener(os.environ["GPT2I_ENGINE_SOCKET"], "AF_UNIX", backlog=64)
    freeze_heap()
    engine_loop(None, engine, Links(listener, ready, retired))


class Links:
    """The shared engine's connections: one per gunicorn worker, accepted on a thread. Each gets a Ready
    whose id_base keeps its request ids apart from the other workers'."""

    def __init__(self, listener, ready, retired):
        self.listener, self.ready, self.retired = listener, ready, retired
        self.joined, self.bases = queue.SimpleQueue(), itertools.count(1)
        threading.Thread(target=self._accept, name="gpt2i-accept", daemon=True).start()

    def _accept(self):
        while not self.retired.is_set():
            try:
                self.joined.put(self.listener.accept())
            except OSError:
                time.sleep(0.1)  # a client that gave up mid-handshake; or closed: retired

    def new(self, engine):
        """Connections accepted since the last call, each told the model and its id base."""
        while not self.joined.empty():
            conn = self.joined.get()
            try:
                conn.send(Ready(self.ready.info, engine.stats(), next(self.bases) << 40))
                yield conn
            except OSError:
                conn.close()

    def done(self, conns):
        """Retired, with every worker gone: the listener closes at once, the process exits after."""
        if self.retired.is_set() and self.listener is not None:
            self.listener.close()
            self.listener = None
        return self.retired.is_set() and not conns


def engine_loop(conn, engine, links=None):
    """Serve the server's pipe (conn), or the shared engine's connections (links), until Stop, or until the
    server has gone (links: retired and every worker gone). A connection that closes cancels its requests."""
    conns, owner = ([conn] if conn is not None else []), {}  # owner: request or embedding id -> its conn
    requests = {}  # id -> engine Request, until it is done
    # a new grammar compiles on a thread (up to grammar.COMPILE_TIMEOUT), never in the loop: running
    # streams keep stepping; the request joins once its grammar is ready (engine.add then hits the cache)
    compiling, pool = {}, ThreadPoolExecutor(1, "grammar")  # id -> (Add, Future)
    while conns or links is not None and not links.done(conns):
        if links is not None:
            conns += links.new(engine)
        idle = 0 if engine.has_work() else 0.002 if compiling else 0.1 if links is not None else 1.0
        for c, message in receive(conns, idle):
            match message:
                case Add(params=SamplingParams(constraint=c_)) as m if c_ is not None:
                    owner[m.request_id] = c
                    compiling[m.request_id] = (m, pool.submit(compile_constraint, c_))
                case Add() as m:
                    owner[m.request_id], requests[m.request_id] = c, admit(engine, m)
                case Cancel(request_id) if request_id in requests:
                    engine.cancel(requests[request_id])
                case Cancel(request_id):
                    compiling.pop(request_id, None)
                case Embed(job_id, inputs):
                    owner[job_id] = c
                    engine.add_embedding(job_id, inputs)
                case Stop():
                    return
                case None:  # the connection closed: its server is gone
                    for rid in [rid for rid, o in owner.items() if o is c]:
                        del owner[rid]
                        compiling.pop(rid, None)
                        if rid in requests:
                            engine.cancel(requests.pop(rid))
        for rid in [rid for rid, (_, f) in compiling.items() if f.done()]:
            m, f = compiling.pop(rid)
            try:
                f.result()
                requests[rid] = admit(engine, m)
            except ConstraintError as e:  # the server's compile passed; this one may still time out
                send(owner.pop(rid), Failed([rid], str(e)))
        if engine.has_work():
            step(engine, conns, owner, requests)


def receive(conns, timeout):
    """(conn, message) for each message waiting, the first within timeout; (conn, None) for a closed one."""
    ready = wait(conns, timeout)
    while ready:
        for c in ready:
            try:
                yield c, c.recv()
            except (EOFError, OSError):
                conns.remove(c)
                yield c, None
        ready = wait(conns, 0)


def step(engine, conns, owner, requests):
    """One engine step; each connection gets a Step with its outputs (a step that raised: a Failed)."""
    try:
        outputs = engine.step()
    except Exception as e:  # a bug or a device error: fail what runs, keep serving
        traceback.print_exc()
        for rid, r in requests.items():
            engine.cancel(r)
            send(owner.pop(rid), Failed([rid], type(e).__name__))
        requests.clear()
        return
    mine = {c: ([], []) for c in conns}
    for o in outputs:
        if (c := owner.get(o.request_id)) in mine:
            mine[c][0].append(o)
    for o in outputs:  # a request's outputs all went to its connection above: now forget the finished
        if o.finish_reason is not None and o.request_id in requests and requests[o.request_id].done:
            del requests[o.request_id], owner[o.request_id]
    for job_id, vectors in engine.embedded:
        if (c := owner.pop(job_id, None)) in mine:
            mine[c][1].append((job_id, vectors))
    engine.embedded = []
    stats = engine.stats()
    for c, (outs, embedded) in mine.items():
        send(c, Step(outs, embedded, stats))


def send(conn, message):
    with contextlib.suppress(OSError):  # closed: the loop's next receive sees it
        conn.send(message)


def admit(engine, m):
    return engine.add(m.ids, m.params, m.n, m.logprobs, m.echo, m.request_id, m.group)


def open_engine(config, closed):
    """A new engine process of the server's own -> (its pipe, the process); or, with GPT2I_ENGINE_SOCKET set
    (a gunicorn worker), a connection to the master's engine as soon as it listens -> (conn, None); (None,
    None) once closed() is true."""
    address = os.environ.get("GPT2I_ENGINE_SOCKET")
    if not address:
        return spawn_engine(config)
    while not closed():
        try:
            return Client(address, "AF_UNIX"), None
        except OSError:  # not listening yet: loading, or replacing one that died
            time.sleep(0.05)
    return None, None


def exit_note(proc):
    """How an engine process ended, for /health."""
    if proc is None:
        return "gunicorn's master replaces it"
    proc.join(1.0)
    return f"exit code {proc.exitcode}"


def stop_engine(conn, proc):
    """The server is done with its engine (its own was sent Stop): that process stops (killed after 10 s), or
    the master's sees this connection close and cancels what it left."""
    if proc is None and conn is not None:
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.shutdown(socket.SHUT_RDWR)  # the server's reader thread wakes to EOF
    elif proc is not None:
        proc.join(10.0)
        if proc.is_alive():
            proc.kill()
            proc.join(5.0)


def spawn_engine(config):
    """Start an engine process for this config -> (the server's end of its pipe, the process)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA and threads do not survive fork
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=engine_process, args=(child, config), name="gpt2i-engine", daemon=True)
    proc.start()
    child.close()
    return conn, proc
