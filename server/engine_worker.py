"""The engine's process and the typed messages of its pipe: the server sends Add / Cancel / Embed / Stop; the
engine answers Ready or LoadFailed once, then a Step per engine step (or Failed when a step raised)."""

import multiprocessing
import signal
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common import freeze_heap
from engine.llm_engine import Engine
from engine.loader import load_model_from_checkpoint
from engine.sampling_params import SamplingParams
from grammar import ConstraintError, compile_constraint


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
    info: dict  # what /health shows: device, dtype, quantize, context_length, graphs_captured
    stats: dict


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


def engine_process(conn, cfg):
    """The engine's process: load the model, then serve the pipe until Stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the server decides
    try:
        model, info = load_model_from_checkpoint(cfg.ckpt, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
        engine = Engine(model, max_batch=cfg.max_batch, prefill_chunk=cfg.prefill_chunk, compile=cfg.compile,
                        prefix_cache=cfg.prefix_cache, prefix_cache_mb=cfg.prefix_cache_mb)
        graphs = engine.warmup()  # CUDA: no request waits for a capture
    except Exception as e:
        conn.send(LoadFailed((str(e).splitlines() or [type(e).__name__])[0]))
        return
    conn.send(Ready({"device": info["device"], "dtype": info["dtype"], "quantize": info["quantize"],
                     "context_length": int(model.config.block_size), "graphs_captured": graphs}, engine.stats()))
    freeze_heap()  # the model, torch and the captures live as long as the process
    try:
        engine_loop(conn, engine)
    except (EOFError, OSError):
        return  # the server is gone


def engine_loop(conn, engine):
    requests = {}  # id -> engine Request, until it is done
    # a new grammar compiles on a thread (up to grammar.COMPILE_TIMEOUT), never in the loop: running
    # streams keep stepping; the request joins once its grammar is ready (engine.add then hits the cache)
    compiling, pool = {}, ThreadPoolExecutor(1, "grammar")  # id -> (Add, Future)
    while True:
        while conn.poll(0 if engine.has_work() else 0.002 if compiling else 1.0):
            match conn.recv():
                case Add(params=SamplingParams(constraint=c)) as m if c is not None:
                    compiling[m.request_id] = (m, pool.submit(compile_constraint, c))
                case Add() as m:
                    requests[m.request_id] = admit(engine, m)
                case Cancel(request_id) if request_id in requests:
                    engine.cancel(requests[request_id])
                case Cancel(request_id):
                    compiling.pop(request_id, None)
                case Embed(job_id, inputs):
                    engine.add_embedding(job_id, inputs)
                case Stop():
                    return
        for rid in [rid for rid, (_, f) in compiling.items() if f.done()]:
            m, f = compiling.pop(rid)
            try:
                f.result()
                requests[rid] = admit(engine, m)
            except ConstraintError as e:  # the server's compile passed; this one may still time out
                conn.send(Failed([rid], str(e)))
        if not engine.has_work():
            continue
        try:
            outputs = engine.step()
        except Exception as e:  # a bug or a device error: fail what runs, keep serving
            traceback.print_exc()
            for r in requests.values():
                engine.cancel(r)
            conn.send(Failed(list(requests), type(e).__name__))
            requests.clear()
            continue
        for o in outputs:
            if o.finish_reason is not None and o.request_id in requests and requests[o.request_id].done:
                del requests[o.request_id]
        embedded, engine.embedded = engine.embedded, []
        conn.send(Step(outputs, embedded, engine.stats()))


def admit(engine, m):
    return engine.add(m.ids, m.params, m.n, m.logprobs, m.echo, m.request_id, m.group)


def spawn_engine(config):
    """Start an engine process for this config -> (the server's end of its pipe, the process)."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA and threads do not survive fork
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=engine_process, args=(child, config), name="gpt2i-engine", daemon=True)
    proc.start()
    child.close()
    return conn, proc
