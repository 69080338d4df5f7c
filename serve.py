"""Serve a gpt2-instruct checkpoint over HTTP: a native API, an OpenAI-compatible API and the chat page.

Run it
------
    python serve.py --ckpt out/dolly/ckpt.pt                 # werkzeug, http://127.0.0.1:5000
    GPT2I_CKPT=out/dolly/ckpt.pt gunicorn -c gunicorn.conf.py "serve:create_app()"   # production

The model loads in a background thread: `GET /health` answers 503 `{"status": "loading"}` until
it is ready, then 200 `{"status": "ok", "model": ..., "device": ...}`; a failed load answers 503
`{"status": "error", "error": "<message>"}`.

Configuration (a flag wins over its environment variable, which wins over the default)
-------------------------------------------------------------------------------------
| flag | environment variable | default | meaning |
|---|---|---|---|
| `--ckpt PATH` | `GPT2I_CKPT` | (required) | checkpoint file or folder, HF GPT-2 folder, or `gpt2`… name |
| `--host` | `GPT2I_HOST` | `127.0.0.1` | address to bind (`python serve.py`; gunicorn: see gunicorn.conf.py) |
| `--port` | `GPT2I_PORT` | `5000` | port to bind |
| `--rate-limit` | `GPT2I_RATE_LIMIT` | `30/minute;5/second` | per-client limit on the generation endpoints (flask-limiter syntax; `none` turns it off) |
| `--rate-limit-storage` | `GPT2I_RATE_LIMIT_STORAGE` | `memory://` | `memory://` (per process) or `redis://host:port` (shared by gunicorn workers) |
| `--trust-proxy N` | `GPT2I_TRUST_PROXY` | `0` | number of reverse proxies in front; only then is `X-Forwarded-For` used for the client address |
| `--cors-origins` | `GPT2I_CORS_ORIGINS` | (none) | comma-separated origins allowed cross-origin, or `*`; none by default (the page is same-origin) |
| `--api-key` | `GPT2I_API_KEY` | (none) | when set, every endpoint but `/health`, `/params`, `/` and static files needs `Authorization: Bearer KEY` |
| `--max-queue N` | `GPT2I_MAX_QUEUE` | `32` | generation requests admitted at once (running + waiting); past it: 503 + Retry-After |
| `--max-batch N` | `GPT2I_MAX_BATCH` | `8` | requests the engine decodes together in one batch |
| `--max-body-bytes N` | `GPT2I_MAX_BODY_BYTES` | `1048576` | largest request body (413 past it) |
| `--max-prompt-tokens N` | `GPT2I_MAX_PROMPT_TOKENS` | context - 1 | longest prompt, in tokens (422 past it) |
| `--device` | `GPT2I_DEVICE` | `auto` | `auto`, `cpu`, `cuda`, `cuda:1`, `mps` |
| `--dtype` | `GPT2I_DTYPE` | `auto` | `auto` (bf16 on capable GPUs, fp32 elsewhere), `float32`, `bfloat16`, `float16` |
| `--quantize` | `GPT2I_QUANTIZE` | `none` | weight quantization handed to inference.load_model_from_checkpoint (`none`, `int8`) |
| `--model-name` | `GPT2I_MODEL_NAME` | from the path | the model id in `/health`, `/v1/models` and OpenAI replies |
| `--static-dir` | `GPT2I_STATIC_DIR` | `./static` | folder served at `/` |
| `--log-level` | `GPT2I_LOG_LEVEL` | `info` | `debug`, `info`, `warning`, `error` |
| `--warmup 1` | `GPT2I_WARMUP` | `0` | CUDA: capture the decode CUDA graphs for batch sizes up to --max-batch before `/health` says ok |

gunicorn.conf.py reads `GPT2I_BIND` (or `GPT2I_HOST`/`GPT2I_PORT`), `GPT2I_WORKERS`,
`GPT2I_THREADS`, `GPT2I_TIMEOUT` and `GPT2I_GRACEFUL_TIMEOUT`; see that file.

Endpoints
---------
| method, path | what |
|---|---|
| `GET /health` | readiness (above) |
| `GET /params` | the generation parameters: type, range, default, plus context length and limits |
| `POST /generate` | native generation, plain JSON or SSE (`"stream": true`) |
| `POST /v1/completions` | OpenAI text completion (raw text; `"raw": false` applies the template) |
| `POST /v1/chat/completions` | OpenAI chat; messages fold into the instruction template (below) |
| `GET /v1/models`, `GET /v1/models/<id>` | OpenAI model list |
| `GET /metrics` | Prometheus text exposition (per process) |
| `GET /` and `GET /<file>` | the chat page from the static folder |

Native streaming (`POST /generate` with `"stream": true`) sends `text/event-stream` events:
    data: {"token": "<text piece>"}                       one per piece, in order
    data: {"done": true, "finish_reason": "eos"|"stop"|"length", "usage": {...}, "timings": {...}}
    data: {"error": {"type": ..., "message": ..., "param": null}}   instead of "done" if generation failed
and lines starting with ":" (SSE comments, keep-alives) that clients ignore. OpenAI streams send
`chat.completion.chunk` / `text_completion` chunks and end with `data: [DONE]`.

Errors, everywhere: `{"error": {"type": ..., "message": ..., "param": <field or null>}}`:
400 `invalid_json`, 401 `authentication_error`, 404 `not_found`, 405 `method_not_allowed`,
413 `request_too_large`, 422 `invalid_parameter` (the message names the field and its range),
429 `rate_limit_exceeded` (+ Retry-After), 503 `model_loading` / `model_error` / `overloaded` /
`shutting_down` (+ Retry-After), 500 `server_error`.

Chat messages -> the instruction template
-----------------------------------------
`messages` (roles `system` (or `developer`), `user`, `assistant`; content a string or a list of `{"type": "text"}`
parts) must end with a `user` message. That last user message becomes the `### Instruction:`;
the `### Input:` block (the context) holds, in order, the system messages' text and then the
earlier turns as a transcript, `User: ...` / `Assistant: ...`, one turn a line:

    <system text>

    User: <earlier user turn>
    Assistant: <earlier assistant reply>

A single user message with no system message gives exactly the fine-tuning template with no
Input block. When the prompt would not fit the context, the oldest earlier turns are dropped
first (never the system text or the last user message); if it still does not fit: 422.

OpenAI parameters
-----------------
`model` (any id accepted, replies carry ours), `max_tokens` (chat also `max_completion_tokens`),
`temperature` (0 = greedy), `top_p`, `stop` (string or up to 4 strings), `seed`, `stream`,
`stream_options.include_usage`, `n` (1 only), `user` (ignored). Extensions as in vLLM:
`top_k`, `repetition_penalty`, and `raw` on /v1/completions. `frequency_penalty` and
`presence_penalty` are accepted when 0 (the default) and refused with 422 otherwise (use
`repetition_penalty`); so are `logprobs`, `top_logprobs`, `echo`, `best_of` > 1, `suffix`,
`logit_bias`, `tools`/`functions` and `response_format` other than text. Unknown fields: 422.
max_tokens defaults: 16 for /v1/completions (as OpenAI), the native default for chat; an
unspecified default is lowered to fit the context, an explicit value that does not fit is a 422.

Concurrency
-----------
One engine thread owns the model; HTTP threads never touch it. Requests become jobs; at most
--max-queue are admitted at once (waiting, decoding, or still streaming out), past that: 503 with
Retry-After. The engine takes up to --max-batch waiting jobs and decodes them together with
inference.stream_batch, each row with its own sampling parameters, seed, stop strings and
KV-cache row (static batching: the batch runs until its last row ends, finished rows are
compacted out; jobs arriving meanwhile form the next batch). A streaming client that disconnects
makes the server's next write fail (werkzeug and gunicorn gthread alike); the WSGI server closes
the response generator, which sets the job's cancel flag, which inference polls every decode
chunk: the row stops within a token or two. A non-streaming request cannot notice a disconnect
under WSGI and runs to its end. Each gunicorn worker loads its own model and runs its own engine;
a worker still loading answers 503 model_loading.
"""

import argparse
import collections
import hmac
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields

from flask import Flask, Response, g, jsonify, request, send_from_directory
from flask_cors import CORS
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import parse_many
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import PathConverter, ValidationError
from werkzeug.security import safe_join

import inference
from common import UserError, run_cli
from inference import PARAM_RANGES, ParamError
from prompt import format_prompt

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV_PREFIX = "GPT2I_"
log = logging.getLogger("gpt2i.serve")

# ============================================================================ configuration


@dataclass
class ServeConfig:
    """Everything the server can be told. Field names map to flags (--rate-limit) and env vars (GPT2I_RATE_LIMIT)."""

    ckpt: str = None
    host: str = "127.0.0.1"
    port: int = 5000
    rate_limit: str = "30/minute;5/second"
    rate_limit_storage: str = "memory://"
    trust_proxy: int = 0
    cors_origins: list = field(default_factory=list)
    api_key: str = None
    max_queue: int = 32
    max_batch: int = 8
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = None
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    model_name: str = None
    static_dir: str = os.path.join(ROOT, "static")
    log_level: str = "info"
    warmup: bool = False
    stream_keepalive_s: float = 15.0  # SSE comment sent after this long without a token


_HELP = {
    "ckpt": "checkpoint file or folder, HF GPT-2 folder, or OpenAI GPT-2 name (gpt2, gpt2-medium, ...)",
    "host": "address to bind",
    "port": "port to bind",
    "rate_limit": 'per-client limit on generation endpoints, flask-limiter syntax ("30/minute;5/second"); "none" turns it off',
    "rate_limit_storage": "memory:// (one process) or redis://host:port (shared by gunicorn workers)",
    "trust_proxy": "number of reverse proxies in front whose X-Forwarded-For is trusted (0: ignore the header)",
    "cors_origins": "comma-separated origins allowed cross-origin (or *); none by default",
    "api_key": "require Authorization: Bearer KEY (all but /health, /params, / and static files)",
    "max_queue": "generation requests admitted at once (running + waiting); more get 503 + Retry-After",
    "max_batch": "requests decoded together in one batch",
    "max_body_bytes": "largest request body in bytes (413 past it)",
    "max_prompt_tokens": "longest prompt in tokens (default: the model's context - 1)",
    "device": "auto, cpu, cuda, cuda:N, mps",
    "dtype": "auto, float32, bfloat16, float16",
    "quantize": "weight quantization passed to inference (none, int8)",
    "model_name": "model id shown in /health and /v1/models (default: from the checkpoint path)",
    "static_dir": "folder with the chat page, served at /",
    "log_level": "debug, info, warning, error",
    "warmup": "CUDA: capture the decode CUDA graphs for batch sizes up to --max-batch before /health is ok (1/0)",
    "stream_keepalive_s": "seconds without a token before an SSE keep-alive comment",
}
_INTERNAL_ONLY = {"stream_keepalive_s"}  # configurable from Python/env, no flag


def env_name(name):
    return ENV_PREFIX + name.upper()


def _field_kind(f):
    if f.name == "cors_origins":
        return "list"
    if f.default is None:
        return "int" if f.name == "max_prompt_tokens" else "str"
    return {bool: "bool", int: "int", float: "float"}.get(type(f.default), "str")


def _convert(name, kind, value):
    """A string (flag or env var) -> the field's type; a bad value is a UserError naming its source."""
    if kind == "list":
        if isinstance(value, (list, tuple)):
            return [str(v).strip() for v in value if str(v).strip()]
        return [v.strip() for v in str(value).split(",") if v.strip()]
    if value is None or (isinstance(value, str) and value.strip() == "" and kind != "str"):
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise UserError(f"{name} must be 1/0 (true/false), got {value!r}")
        return word in ("1", "true", "yes", "on")
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}") from None
    return str(value) if value != "" else None


def config_from_env(environ=None):
    """The config's non-default values found in the environment, as a dict of typed values."""
    environ = os.environ if environ is None else environ
    out = {}
    for f in fields(ServeConfig):
        key = env_name(f.name)
        if key in environ:
            out[f.name] = _convert(key, _field_kind(f), environ[key])
    return out


def make_config(values=None, environ=None):
    """ServeConfig from defaults <- environment (when environ is given) <- values (dict or ServeConfig); validated."""
    if isinstance(values, ServeConfig):
        values = asdict(values)
    merged = dict(config_from_env(environ)) if environ is not None else {}
    known = {f.name: f for f in fields(ServeConfig)}
    for key, value in (values or {}).items():
        if key not in known:
            raise UserError(f"unknown serve config key {key!r}; known: {', '.join(known)}")
        merged[key] = _convert(key, _field_kind(known[key]), value) if isinstance(value, str) else value
    cfg = ServeConfig(**merged)
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Fail early, with one line, on values the server could not run with."""
    if not cfg.ckpt:
        raise UserError(f"no checkpoint: pass --ckpt PATH or set {env_name('ckpt')}")
    if not 0 < cfg.port < 65536:
        raise UserError(f"port must be in 1..65535, got {cfg.port}")
    for name in ("max_queue", "max_batch", "max_body_bytes"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_prompt_tokens is not None and cfg.max_prompt_tokens < 1:
        raise UserError(f"max-prompt-tokens must be >= 1, got {cfg.max_prompt_tokens}")
    if cfg.trust_proxy < 0:
        raise UserError(f"trust-proxy must be >= 0, got {cfg.trust_proxy}")
    if rate_limit_enabled(cfg):
        try:
            parse_many(cfg.rate_limit)
        except ValueError:
            raise UserError(
                f"invalid rate limit {cfg.rate_limit!r}: use flask-limiter syntax such as "
                f'"30/minute;5/second", or "none"'
            ) from None
    if not re.match(r"^(memory|redis|rediss|redis\+unix|redis\+sentinel|redis\+cluster|memcached|mongodb|valkey)\S*://",
                    cfg.rate_limit_storage):
        raise UserError(f"rate-limit-storage must be a storage URI such as memory:// or redis://host:port, "
                        f"got {cfg.rate_limit_storage!r}")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise UserError(f"log-level must be debug, info, warning or error, got {cfg.log_level!r}")


def rate_limit_enabled(cfg):
    return bool(cfg.rate_limit) and cfg.rate_limit.strip().lower() not in ("none", "off", "0", "")


def default_model_name(ckpt):
    """A readable id: the checkpoint's folder name (out/dolly/ckpt.pt -> 'dolly'), or the HF name."""
    path = os.path.normpath(os.fspath(ckpt))
    if os.path.basename(path) == "ckpt.pt" or os.path.isfile(path):
        path = os.path.dirname(os.path.abspath(path))
    return os.path.basename(path) or "gpt2-instruct"


# ============================================================================ errors


class ApiError(Exception):
    """An error with its HTTP status; rendered as {"error": {"type", "message", "param"}}."""

    def __init__(self, status, type_, message, param=None, headers=None):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type_, message, param
        self.headers = headers or {}

    def body(self):
        return {"error": {"type": self.type, "message": self.message, "param": self.param}}


def invalid(param, message):
    """422 for one field; the message names the field and what is allowed."""
    return ApiError(422, "invalid_parameter", message, param)


# werkzeug's HTTP exceptions -> our error type names
_HTTP_TYPES = {400: "invalid_json", 401: "authentication_error", 404: "not_found", 405: "method_not_allowed",
               413: "request_too_large", 415: "invalid_json", 429: "rate_limit_exceeded", 503: "overloaded"}


# ============================================================================ metrics (Prometheus text)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Counters, gauges and a latency histogram, rendered in Prometheus' text format. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = collections.Counter()  # (endpoint, status) -> n
        self.latency = {}  # endpoint -> [bucket counts..., sum, count]
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cancelled = 0
        self.batches = 0
        self.batch_rows = 0

    def observe_request(self, endpoint, status, latency_s):
        with self._lock:
            self.requests[(endpoint, str(status))] += 1
            hist = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            for i, bound in enumerate(LATENCY_BUCKETS):
                if latency_s <= bound:
                    hist[i] += 1
            hist[-2] += latency_s
            hist[-1] += 1

    def add_tokens(self, prompt=0, generated=0):
        with self._lock:
            self.prompt_tokens += prompt
            self.generated_tokens += generated

    def add_cancelled(self):
        with self._lock:
            self.cancelled += 1

    def add_batch(self, rows):
        with self._lock:
            self.batches += 1
            self.batch_rows += rows

    def render(self, gauges):
        """Text exposition; `gauges` is {name: (help, value)} read at scrape time."""
        with self._lock:
            lines = [
                "# HELP gpt2i_requests_total HTTP requests by endpoint and status.",
                "# TYPE gpt2i_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'gpt2i_requests_total{{endpoint="{_esc(endpoint)}",status="{status}"}} {n}')
            lines += [
                "# HELP gpt2i_request_latency_seconds Request latency (streams: until the last byte).",
                "# TYPE gpt2i_request_latency_seconds histogram",
            ]
            for endpoint, hist in sorted(self.latency.items()):
                ep = _esc(endpoint)
                for bound, n in zip(LATENCY_BUCKETS, hist):
                    lines.append(f'gpt2i_request_latency_seconds_bucket{{endpoint="{ep}",le="{bound}"}} {n}')
                lines.append(f'gpt2i_request_latency_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {hist[-1]}')
                lines.append(f'gpt2i_request_latency_seconds_sum{{endpoint="{ep}"}} {hist[-2]:.6f}')
                lines.append(f'gpt2i_request_latency_seconds_count{{endpoint="{ep}"}} {hist[-1]}')
            for name, help_, value in (
                ("gpt2i_prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens),
                ("gpt2i_generated_tokens_total", "Tokens generated (cancelled requests included).",
                 self.generated_tokens),
                ("gpt2i_cancelled_total", "Generations stopped because the client went away.", self.cancelled),
                ("gpt2i_engine_batches_total", "Batches the engine decoded.", self.batches),
                ("gpt2i_engine_batch_rows_total", "Requests in those batches (rows / batches = mean batch size).",
                 self.batch_rows),
            ):
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name} {value}"]
        for name, (help_, value) in gauges.items():
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"


def _esc(label):
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ============================================================================ request validation
#
# Which fields each endpoint takes, and the types of the non-generation ones, are HTTP concerns
# and live here; generation parameters (types, ranges, defaults) are checked by inference.py's
# validate_params against its PARAM_RANGES table (one place), through check_params().

NATIVE_FIELDS = {"prompt": "string", "context": "string", "stream": "boolean"}  # + PARAM_RANGES' names


def reject_unknown(body, allowed, where):
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise invalid(unknown[0], f"unknown field{'s' if len(unknown) > 1 else ''} {names} for {where}; "
                                  f"allowed: {', '.join(sorted(allowed))}")


def typed(body, name, kind, param=None):
    """body[name] checked against a JSON type; None when absent or null. param: the name errors use."""
    param = param or name
    if name not in body or body[name] is None:
        return None
    value = body[name]
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }.get(kind)
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)  # 64.0 is accepted as 64
    if not ok:
        raise invalid(param, f"{param} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, "
                             f"got {type(value).__name__ if not isinstance(value, bool) else 'boolean'} {value!r:.40}")
    return value


def check_params(given, names):
    """inference.validate_params on the given fields (null = default) -> the full params dict.

    A ParamError becomes a 422 with the client's name for the field (names: ours -> theirs,
    e.g. max_new_tokens -> max_tokens on the OpenAI endpoints).
    """
    try:
        return inference.validate_params(**{k: v for k, v in given.items() if v is not None})
    except ParamError as e:
        raise translate(e, names) from None


def translate(error, names):
    """A ParamError -> a 422 ApiError whose param and message use the client's field names."""
    message = str(error)
    for ours, theirs in names.items():
        message = re.sub(rf"\b{ours}\b", theirs, message)
    return invalid(names.get(error.param, error.param), message)


def parse_json_body(request):
    """The request body as a JSON object: 400 when it is not one, 413 when it is too large."""
    raw = request.get_data(cache=True)  # raises RequestEntityTooLarge past MAX_CONTENT_LENGTH
    if not raw.strip():
        raise ApiError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


# ============================================================================ jobs and the engine


class QueueFull(Exception):
    pass


class Job:
    """One generation request, shared by the HTTP thread (consumer) and the engine thread (producer).

    The engine calls emit / finish / fail; the HTTP side reads events() or result() and may cancel().
    """

    def __init__(self, prompt, params, prompt_tokens):
        self.id = uuid.uuid4().hex[:12]
        self.prompt = prompt  # what inference.stream_batch gets: text, templated by it unless params["raw"]
        self.params = params  # inference.validate_params output (max_new_tokens, temperature, ..., raw)
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason = None
        self.engine_timings = {}
        self.error = None
        self._pieces = []
        self._events = queue.Queue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.released = False  # set by Engine.release
        self.t_submit = time.perf_counter()
        self.t_start = self.t_first = self.t_end = None

    # ---- HTTP side
    def cancel(self):
        self._cancel.set()

    @property
    def cancelled(self):
        return self._cancel.is_set()

    @property
    def finished(self):
        return self._done.is_set()

    def events(self, keepalive_s=15.0):
        """Yield ("token", text), ("keepalive", None) when idle, then ("done", None) or ("error", ApiError)."""
        while True:
            try:
                kind, payload = self._events.get(timeout=keepalive_s)
            except queue.Empty:
                yield "keepalive", None
                continue
            yield kind, payload
            if kind in ("done", "error"):
                return

    def wait(self, timeout=None):
        """Block until the engine is done with the job; True if it is."""
        return self._done.wait(timeout)

    def result(self):
        """Block until the job ends; the full text, or raise its ApiError."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        return "".join(self._pieces)

    def timings(self):
        """Milliseconds: queue (admitted -> engine start), prefill and decode (inference's own
        figures), first text (admitted -> first piece), total (admitted -> done); decode tokens/s."""
        end = self.t_end or time.perf_counter()
        start = self.t_start or end
        t = self.engine_timings
        return {
            "queue_ms": round((start - self.t_submit) * 1e3, 2),
            "prefill_ms": t.get("prefill_ms"),
            "decode_ms": t.get("decode_ms"),
            "first_token_ms": round((self.t_first - self.t_submit) * 1e3, 2) if self.t_first else None,
            "total_ms": round((end - self.t_submit) * 1e3, 2),
            "decode_tokens_per_s": t.get("decode_tokens_per_s"),
        }

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    # ---- engine side
    def start(self):
        self.t_start = time.perf_counter()

    def emit(self, piece):
        if piece:
            if self.t_first is None:
                self.t_first = time.perf_counter()
            self._pieces.append(piece)
            self._events.put(("token", piece))

    def finish(self, reason, completion_tokens, timings=None):
        self.finish_reason, self.completion_tokens = reason, completion_tokens
        self.engine_timings = timings or {}
        self.t_end = time.perf_counter()
        self._done.set()
        self._events.put(("done", None))

    def fail(self, error):
        self.error = error
        self.finish_reason = "error"
        self.t_end = time.perf_counter()
        self._done.set()
        self._events.put(("error", error))


class Engine:
    """Owns the model: loads it in a background thread, then runs admitted jobs in batches.

    state: "loading" -> "ok" | "error". Admission is bounded: at most max_queue jobs are
    admitted at once; submit() raises QueueFull past that. A job holds its slot from submit()
    until its HTTP request releases it (response sent or client gone), so a stream that is
    still being delivered counts too: it holds a server thread and its undelivered tokens.
    """

    def __init__(self, config, metrics):
        self.config = config
        self.metrics = metrics
        self.state, self.error = "loading", None
        self.model, self.info = None, {}
        self.context_length = None
        self._pending = collections.deque()
        self._admitted = 0  # jobs submitted and not yet released by their HTTP request
        self._running = 0
        self._batch = []  # jobs being decoded
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="gpt2i-engine", daemon=True)

    # ---- lifecycle
    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=5.0):
        with self._cv:
            self._stopping = True
            waiting, self._pending = list(self._pending), collections.deque()
            for job in self._batch:
                job.cancel()  # inference ends these rows with finish_reason "cancelled"
            self._cv.notify_all()
        for job in waiting:  # never started: answer them rather than leave them hanging
            job.fail(ApiError(503, "shutting_down", "the server is shutting down; retry shortly",
                              headers={"Retry-After": "5"}))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_ready(self, timeout=None):
        """Block until loaded or failed; True when ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self.state == "loading":
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
        return self.state == "ok"

    def _main(self):
        try:
            self._load()
        except Exception as e:  # any load failure is reported by /health, never a crash
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error(json.dumps({"event": "model_load_failed", "error": msg}))
            with self._cv:
                self.state, self.error = "error", msg
                self._cv.notify_all()
            return
        with self._cv:
            self.state = "ok"
            self._cv.notify_all()
        log.info(json.dumps({"event": "model_loaded", **self.describe(), "pid": os.getpid()}))
        self._loop()

    def _load(self):
        cfg = self.config
        self.model, self.info = inference.load_model_from_checkpoint(
            cfg.ckpt, device=cfg.device, dtype=cfg.dtype, quantize=cfg.quantize)
        self.context_length = int(self.model.config.block_size)
        if cfg.warmup:  # CUDA graphs for every batch size the engine will use (no-op off CUDA)
            sizes = sorted({1 << i for i in range(cfg.max_batch.bit_length())} | {cfg.max_batch})
            self.info["graphs_captured"] = inference.get_engine(self.model).warmup(batch_sizes=sizes)

    def describe(self):
        """What /health reports about the model."""
        return {"model": self.config.model_name or default_model_name(self.config.ckpt),
                "device": self.info.get("device"), "dtype": self.info.get("dtype"),
                "quantize": self.info.get("quantize"), "decode_mode": self.info.get("decode_mode"),
                "context_length": self.context_length}

    # ---- admission
    def submit(self, job):
        with self._cv:
            if self._admitted >= self.config.max_queue:
                raise QueueFull()
            self._admitted += 1
            self._pending.append(job)
            self._cv.notify_all()
        return job

    def release(self, job):
        """The HTTP side is done with `job` (idempotent): free its slot; cancel it if still unfinished."""
        if not job.finished:
            job.cancel()
        with self._cv:
            if not job.released:
                job.released = True
                self._admitted -= 1

    def admitted(self):
        with self._cv:
            return self._admitted

    def queue_depth(self):
        with self._cv:
            return len(self._pending)

    def running(self):
        with self._cv:
            return self._running

    # ---- the loop
    def _take_batch(self):
        """Wait for jobs; take up to max_batch of them (jobs cancelled while waiting are finished here)."""
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
            batch = []
            while self._pending and len(batch) < self.config.max_batch:
                batch.append(self._pending.popleft())
            self._running, self._batch = len(batch), batch
            return batch

    def _batch_done(self):
        with self._cv:
            self._running, self._batch = 0, []

    def _loop(self):
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                live = [job for job in batch if not self._skip_cancelled(job)]
                if live:
                    self._run(live)
            except Exception as e:  # a bug or device error: fail these jobs, keep serving
                log.exception("generation failed")
                for job in batch:
                    if not job.finished:
                        job.fail(ApiError(500, "server_error", f"generation failed: {type(e).__name__}: {e}"))
            finally:
                self._batch_done()

    def _run(self, jobs):
        """Decode `jobs` together with inference.stream_batch (per-row parameters and cancel flags).

        Static batching: the batch runs until its last row ends (finished rows are compacted out
        by inference); jobs admitted meanwhile wait for the next batch.
        """
        for job in jobs:
            job.start()
        self.metrics.add_batch(len(jobs))
        params = {name: [job.params[name] for job in jobs] for name in jobs[0].params}
        should_stop = [job._cancel.is_set for job in jobs]
        for event in inference.stream_batch(self.model, [job.prompt for job in jobs],
                                            should_stop=should_stop, **params):
            job = jobs[event["index"]]
            if event.get("done"):
                job.finish(event["finish_reason"], event["completion_tokens"], event.get("timings"))
                self._account(job)
            else:
                job.emit(event["text"])

    def _skip_cancelled(self, job):
        if job.cancelled:
            job.finish("cancelled", 0)
            self.metrics.add_cancelled()
            return True
        return False

    def _account(self, job):
        self.metrics.add_tokens(prompt=job.prompt_tokens, generated=job.completion_tokens)
        if job.finish_reason == "cancelled":
            self.metrics.add_cancelled()


# ============================================================================ OpenAI shapes


def openai_finish_reason(reason):
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def sse(obj):
    """One Server-Sent Event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def message_text(message, index):
    """A chat message's content as text (a string, or a list of {"type": "text", "text": ...} parts)."""
    param = f"messages[{index}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(param, f"{param}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    if content is None and message.get("role") == "assistant":
        return ""
    raise invalid(param, f"{param} must be a string or a list of text parts")


def split_chat(messages):
    """messages -> (system_text, earlier turns [(role, text)], last user text). Validates roles and order."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"messages[{i}].role",
                          f"messages[{i}].role must be one of system, user, assistant (got {role!r})")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}]", f"messages[{i}] has unsupported fields: {', '.join(sorted(extra))}")
        text = message_text(m, i)
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise invalid("messages", "the last message must have role 'user'")
    return "\n\n".join(s for s in system if s), turns[:-1], turns[-1][1]


def chat_context(system_text, history):
    """The ### Input: text: system text, blank line, then the transcript `User: ...` / `Assistant: ...`."""
    transcript = "\n".join(f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in history)
    return "\n\n".join(part for part in (system_text, transcript) if part)


# ============================================================================ the Flask app

OPENAI_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
                 "n", "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
                 "top_k", "repetition_penalty"}
COMPLETION_FIELDS = OPENAI_COMMON | {"prompt", "echo", "best_of", "suffix", "raw"}
CHAT_FIELDS = OPENAI_COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "functions", "function_call", "response_format"}
OPEN_ENDPOINTS = {"health", "params", "index", "static_file", "static_root"}  # no API key needed
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Server:
    """The app's state and views: config, engine, metrics. create_app() builds one."""

    def __init__(self, config):
        self.config = config
        self.metrics = Metrics()
        self.engine = Engine(config, self.metrics)
        self.model_name = config.model_name or default_model_name(config.ckpt)
        self.created = int(time.time())
        self.limiter = None

    # ------------------------------------------------------------------ app assembly

    def build_app(self):
        app = Flask(__name__, static_folder=None)
        app.config["MAX_CONTENT_LENGTH"] = self.config.max_body_bytes
        app.json.sort_keys = False
        app.extensions["gpt2i"] = self
        if self.config.trust_proxy > 0:
            app.wsgi_app = ProxyFix(app.wsgi_app, x_for=self.config.trust_proxy)

        app.before_request(self._begin_request)
        app.before_request(self._check_api_key)
        app.after_request(self._end_request)
        app.register_error_handler(ApiError, self._api_error)
        app.register_error_handler(HTTPException, self._http_error)
        app.register_error_handler(Exception, self._unexpected_error)

        app.url_map.converters["staticfile"] = static_file_converter(self.config.static_dir)
        limit = self._make_limiter(app)
        routes = [
            ("/health", "health", self.health, ["GET"]),
            ("/params", "params", self.params, ["GET"]),
            ("/metrics", "metrics", self.metrics_view, ["GET"]),
            ("/generate", "generate", limit(self.generate), ["POST"]),
            ("/v1/completions", "completions", limit(self.completions), ["POST"]),
            ("/v1/chat/completions", "chat_completions", limit(self.chat_completions), ["POST"]),
            ("/v1/models", "models", self.models, ["GET"]),
            ("/v1/models/<path:model_id>", "model", self.model, ["GET"]),
            ("/", "index", self.index, ["GET"]),
            ("/static/<path:filename>", "static_file", self.static_file, ["GET"]),
            # every method, so that a POST to an unknown path is a 404 rather than a 405 (the
            # converter only matches existing files; static_file refuses methods other than GET)
            ("/<staticfile:filename>", "static_root", self.static_file, ["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ]
        for rule, endpoint, view, methods in routes:
            app.add_url_rule(rule, endpoint, view, methods=methods)
        if self.config.cors_origins:
            CORS(app, origins=self.config.cors_origins, methods=["GET", "POST", "OPTIONS"],
                 allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
                 expose_headers=["X-Request-ID", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                                 "X-RateLimit-Reset"], max_age=600)
        return app

    def _make_limiter(self, app):
        """flask-limiter on the generation endpoints only (one budget per client shared by all three)."""
        self.limiter = Limiter(
            get_remote_address, app=app, default_limits=[], headers_enabled=True,
            storage_uri=self.config.rate_limit_storage, key_prefix="gpt2i",
            in_memory_fallback_enabled=True, enabled=rate_limit_enabled(self.config),
        )
        if not rate_limit_enabled(self.config):
            return lambda view: view
        return self.limiter.shared_limit(self.config.rate_limit, scope="generation", methods=["POST"])

    # ------------------------------------------------------------------ per-request bookkeeping

    def _begin_request(self):
        rid = request.headers.get("X-Request-ID", "")
        g.rq = {"request_id": rid if SAFE_REQUEST_ID.match(rid) else uuid.uuid4().hex,
                "t0": time.perf_counter(), "job": None, "prompt_tokens": None, "completion_tokens": None,
                "finish_reason": None, "error": None, "stream": False}

    def _check_api_key(self):
        key = self.config.api_key
        if not key or request.method == "OPTIONS" or request.endpoint in OPEN_ENDPOINTS:
            return None
        if request.routing_exception is not None:
            return None  # no such route: let the 404 / 405 through
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError(401, "authentication_error", "missing API key: send Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise ApiError(401, "authentication_error", "invalid API key",
                           headers={"WWW-Authenticate": "Bearer"})
        return None

    def _end_request(self, response):
        rq = getattr(g, "rq", None)
        if rq is None:
            return response
        response.headers["X-Request-ID"] = rq["request_id"]
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)  # flask-limiter adds it to every limited response
        elif response.headers.get("Retry-After") == "0":
            response.headers["Retry-After"] = "1"  # the window ends within the second
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        if rule in ("/<staticfile:filename>", "/static/<path:filename>"):
            rule = "/static"
        info = {"method": request.method, "endpoint": rule, "path": request.path[:200],
                "client": request.remote_addr, "status": response.status_code}
        response.call_on_close(lambda: self._log_request(rq, info))
        return response

    def _log_request(self, rq, info):
        """One JSON log line and the metrics, when the response is fully sent (streams included)."""
        latency = time.perf_counter() - rq["t0"]
        job = rq["job"]
        if job is not None:
            self.engine.release(job)  # safety net; normally released already
            if job.t_start is not None:  # cancelled mid-generation: the engine stops it within a step or two;
                job.wait(2.0)            # wait for it, so the line has the tokens really generated
            rq["prompt_tokens"] = job.prompt_tokens
            rq["completion_tokens"] = job.completion_tokens
            rq["finish_reason"] = job.finish_reason or ("cancelled" if job.cancelled else None)
        line = {"event": "request", "request_id": rq["request_id"], **info,
                "prompt_tokens": rq["prompt_tokens"], "completion_tokens": rq["completion_tokens"],
                "finish_reason": rq["finish_reason"], "stream": rq["stream"],
                "latency_ms": round(latency * 1e3, 2), "pid": os.getpid()}
        if rq["error"]:
            line["error"] = rq["error"]
        log.info(json.dumps(line))
        self.metrics.observe_request(info["endpoint"], info["status"], latency)

    # ------------------------------------------------------------------ errors

    def _error_response(self, status, type_, message, param=None, headers=None):
        if getattr(g, "rq", None) is not None:
            g.rq["error"] = type_
        resp = jsonify({"error": {"type": type_, "message": message, "param": param}})
        resp.status_code = status
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    def _api_error(self, e):
        return self._error_response(e.status, e.type, e.message, e.param, e.headers)

    def _http_error(self, e):
        code = e.code or 500
        headers = {k: v for k, v in e.get_headers() if k.lower() in ("allow", "retry-after")}
        if isinstance(e, RateLimitExceeded):
            message = f"rate limit exceeded ({e.description}); retry after the Retry-After header's seconds"
            headers.setdefault("Retry-After", str(int(e.limit.limit.get_expiry())))
        elif code == 404:
            message = "no such endpoint or file; see GET /health, POST /generate, /v1/completions, /v1/chat/completions"
        elif code == 405:
            message = f"method not allowed; this endpoint accepts {headers.get('Allow', 'other methods')}"
        elif code == 413:
            message = f"request body too large; the limit is {self.config.max_body_bytes} bytes"
        else:
            message = e.description or e.name
        return self._error_response(code, _HTTP_TYPES.get(code, "http_error"), message, None, headers)

    def _unexpected_error(self, e):
        log.exception("unhandled error")
        rid = g.rq["request_id"] if getattr(g, "rq", None) else "?"
        return self._error_response(500, "server_error", f"internal server error (request id {rid})")

    # ------------------------------------------------------------------ readiness and admission

    def require_ready(self):
        if self.engine.state == "loading":
            raise ApiError(503, "model_loading", "the model is still loading; retry shortly",
                           headers={"Retry-After": "2"})
        if self.engine.state == "error":
            raise ApiError(503, "model_error", f"the model failed to load: {self.engine.error}",
                           headers={"Retry-After": "60"})

    def prompt_limit(self):
        """Longest prompt in tokens: --max-prompt-tokens, never more than the context minus one."""
        ctx = self.engine.context_length
        return min(self.config.max_prompt_tokens or ctx - 1, ctx - 1)

    def fit(self, n_prompt, params, explicit_max, names):
        """Prompt length against --max-prompt-tokens, prompt + max_new_tokens against the context
        (inference.check_fits): a 422 naming the field; a default max_new_tokens is lowered instead."""
        ctx, limit = self.engine.context_length, self.prompt_limit()
        if n_prompt > limit:
            name = names.get("prompt", "prompt")
            raise invalid(name, f"{name} is {n_prompt} tokens long; the limit is {limit} tokens "
                                f"(the model's context is {ctx})")
        if not explicit_max:
            params["max_new_tokens"] = min(params["max_new_tokens"], ctx - n_prompt)
        try:
            inference.check_fits(n_prompt, params["max_new_tokens"], ctx)
        except ParamError as e:
            raise translate(e, names) from None

    def admit(self, prompt, params, explicit_max, names, n_prompt=None):
        """Count tokens, check the context, queue the job (503 when the queue is full)."""
        n_prompt = inference.count_tokens(prompt, params["raw"]) if n_prompt is None else n_prompt
        self.fit(n_prompt, params, explicit_max, names)
        job = Job(prompt, params, n_prompt)
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(503, "overloaded", f"the server is busy ({self.config.max_queue} requests in progress); "
                                              "retry shortly", headers={"Retry-After": "1"}) from None
        g.rq["job"] = job
        return job

    def wait(self, job):
        """The full text of a non-streamed job (its slot is released whatever happens)."""
        try:
            text = job.result()
        finally:
            self.engine.release(job)
        g.rq["finish_reason"] = job.finish_reason
        return text

    def stream_response(self, job, events):
        """An SSE response over `events`; closing it early (client gone) cancels the job."""
        g.rq["stream"] = True

        def guarded():
            try:
                yield from events
            finally:
                self.engine.release(job)  # cancels the job when the client went away mid-stream

        return Response(guarded(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ native endpoints

    def health(self):
        state = self.engine.state
        if state == "ok":
            return jsonify({"status": "ok", **self.engine.describe(), "model": self.model_name,
                            "queue": {"waiting": self.engine.queue_depth(), "running": self.engine.running(),
                                      "max_queue": self.config.max_queue}})
        body = {"status": state}
        if state == "error":
            body["error"] = self.engine.error
        resp = jsonify(body)
        resp.status_code = 503
        resp.headers["Retry-After"] = "2" if state == "loading" else "60"
        return resp

    def params(self):
        """Parameter table for clients (the chat page builds its controls from it)."""
        ctx = self.engine.context_length
        table = {name: dict(spec) for name, spec in PARAM_RANGES.items()}
        if ctx:  # max_new_tokens is bounded by the model: prompt + max_new_tokens <= context
            table["max_new_tokens"]["max"] = ctx - 1
        return jsonify({"params": table, "context_length": ctx,
                        "max_prompt_tokens": self.prompt_limit() if ctx else None,
                        "model": self.model_name, "status": self.engine.state})

    def generate(self):
        body = parse_json_body(request)
        prompt, params, stream, explicit_max = native_request(body)
        self.require_ready()
        job = self.admit(prompt, params, explicit_max, {})
        if stream:
            return self.stream_response(job, self._native_events(job))
        text = self.wait(job)
        return jsonify({"id": g.rq["request_id"], "model": self.model_name, "text": text,
                        "finish_reason": job.finish_reason, "usage": job.usage(), "timings": job.timings()})

    def _native_events(self, job):
        for kind, payload in job.events(self.config.stream_keepalive_s):
            if kind == "token":
                yield sse({"token": payload})
            elif kind == "keepalive":
                yield SSE_KEEPALIVE
            elif kind == "done":
                yield sse({"done": True, "finish_reason": job.finish_reason, "usage": job.usage(),
                           "timings": job.timings()})
            else:
                yield sse(payload.body())

    # ------------------------------------------------------------------ OpenAI endpoints

    def completions(self):
        body = parse_json_body(request)
        reject_unknown(body, COMPLETION_FIELDS, "/v1/completions")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise invalid("prompt", "prompt is required: a non-empty string (or a list holding one string)")
        refuse_unsupported(body, completion=True)
        params, explicit_max, stream, include_usage = openai_params(body, default_max_tokens=16, raw=True)
        self.require_ready()
        job = self.admit(prompt, params, explicit_max, {"max_new_tokens": "max_tokens"})
        cid, created = "cmpl-" + g.rq["request_id"], int(time.time())
        if stream:
            return self.stream_response(job, self._completion_chunks(job, cid, created, include_usage))
        text = self.wait(job)
        return jsonify({
            "id": cid, "object": "text_completion", "created": created, "model": self.model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None,
                         "finish_reason": openai_finish_reason(job.finish_reason)}],
            "usage": job.usage(), "system_fingerprint": None, "timings": job.timings(),
        })

    def _completion_chunks(self, job, cid, created, include_usage):
        def chunk(text, finish, usage=False):
            obj = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                   "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return obj

        yield from self._openai_stream(job, chunk, cid, created, "text_completion", include_usage)

    def chat_completions(self):
        body = parse_json_body(request)
        reject_unknown(body, CHAT_FIELDS, "/v1/chat/completions")
        if "messages" not in body:
            raise invalid("messages", "messages is required: a list of {role, content} objects ending with a user message")
        system, history, instruction = split_chat(body["messages"])
        refuse_unsupported(body, completion=False)
        if body.get("max_completion_tokens") is not None:
            if body.get("max_tokens") is not None:
                raise invalid("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
            body = {**body, "max_tokens": body["max_completion_tokens"]}
        params, explicit_max, stream, include_usage = openai_params(body, default_max_tokens=None, raw=False)
        self.require_ready()
        text, n_prompt = self.fold_chat(system, history, instruction, params["max_new_tokens"] if explicit_max else 1)
        params["raw"] = True  # fold_chat applied the template (with its Input block) already
        job = self.admit(text, params, explicit_max,
                         {"max_new_tokens": "max_tokens", "prompt": "messages"}, n_prompt=n_prompt)
        cid, created = "chatcmpl-" + g.rq["request_id"], int(time.time())
        if stream:
            return self.stream_response(job, self._chat_chunks(job, cid, created, include_usage))
        text = self.wait(job)
        return jsonify({
            "id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": openai_finish_reason(job.finish_reason)}],
            "usage": job.usage(), "system_fingerprint": None, "timings": job.timings(),
        })

    def fold_chat(self, system, history, instruction, min_new):
        """The templated prompt for a chat -> (text, n_tokens), keeping the most recent earlier turns
        that fit: prompt <= the prompt limit and prompt + min_new <= the context. Binary search on how
        many of the oldest turns to drop (a few encodings however long the history)."""
        ctx, limit = self.engine.context_length, self.prompt_limit()

        def build(drop):
            text = format_prompt(instruction, chat_context(system, history[drop:]))
            n = inference.count_tokens(text, raw=True)
            return text, n, n <= limit and n + min_new <= ctx

        text, n, fits = build(0)
        if fits or not history:
            return text, n
        lo, hi = 0, len(history)  # dropping lo turns does not fit; dropping hi is the last resort
        best = build(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            cand = build(mid)
            if cand[2]:
                hi, best = mid, cand
            else:
                lo = mid
        return best[0], best[1]

    def _chat_chunks(self, job, cid, created, include_usage):
        def chunk(text, finish, first=False):
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if finish is None else {})
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_name,
                   "system_fingerprint": None,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return obj

        yield sse(chunk("", None, first=True))
        yield from self._openai_stream(job, chunk, cid, created, "chat.completion.chunk", include_usage)

    def _openai_stream(self, job, chunk, cid, created, object_name, include_usage):
        """Token chunks, a final chunk with finish_reason, an optional usage chunk, then [DONE]."""
        for kind, payload in job.events(self.config.stream_keepalive_s):
            if kind == "token":
                yield sse(chunk(payload, None))
            elif kind == "keepalive":
                yield SSE_KEEPALIVE
            elif kind == "done":
                yield sse(chunk("", openai_finish_reason(job.finish_reason)))
                if include_usage:
                    yield sse({"id": cid, "object": object_name, "created": created, "model": self.model_name,
                               "choices": [], "usage": job.usage()})
            else:
                yield sse(payload.body())
        yield SSE_DONE

    def models(self):
        return jsonify({"object": "list", "data": [self._model_card()]})

    def model(self, model_id):
        if model_id != self.model_name:
            raise ApiError(404, "not_found", f"model {model_id!r} not found; this server has {self.model_name!r}",
                           "model")
        return jsonify(self._model_card())

    def _model_card(self):
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "gpt2-instruct",
                "context_length": self.engine.context_length}

    # ------------------------------------------------------------------ metrics and static files

    def metrics_view(self):
        gauges = {
            "gpt2i_queue_depth": ("Generation requests waiting for the engine.", self.engine.queue_depth()),
            "gpt2i_requests_admitted": ("Generation requests in progress (held against --max-queue).",
                                        self.engine.admitted()),
            "gpt2i_requests_running": ("Generation requests being decoded.", self.engine.running()),
            "gpt2i_model_loaded": ("1 when the model is loaded and serving.", int(self.engine.state == "ok")),
            "gpt2i_max_queue": ("Admission limit (--max-queue).", self.config.max_queue),
        }
        return Response(self.metrics.render(gauges), mimetype="text/plain; version=0.0.4")

    def index(self):
        if os.path.isfile(os.path.join(self.config.static_dir, "index.html")):
            return send_from_directory(self.config.static_dir, "index.html")
        note = ("<!doctype html><meta charset=utf-8><title>gpt2-instruct</title>"
                "<p>gpt2-instruct server. The chat page is not installed (no index.html in the static folder).</p>"
                "<p>API: <code>POST /generate</code>, <code>POST /v1/chat/completions</code>, "
                "<code>GET /health</code>.</p>")
        return Response(note, mimetype="text/html")

    def static_file(self, filename):
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(valid_methods=["GET", "HEAD"])

        folder = self.config.static_dir
        try:
            return send_from_directory(folder, filename)
        except NotFound:
            raise ApiError(404, "not_found", f"no such endpoint or file: /{filename}") from None

    def close(self):
        self.engine.stop()


def static_file_converter(folder):
    """A URL converter matching only files that exist in `folder`, so /<file> never shadows the API's 404/405."""

    class StaticFile(PathConverter):
        def to_python(self, value):
            path = safe_join(folder, value)
            if path is None or not os.path.isfile(path):
                raise ValidationError()
            return value

    return StaticFile


def native_request(body):
    """Check a /generate body -> (prompt for inference, params, stream, max_new_tokens given?)."""
    reject_unknown(body, set(NATIVE_FIELDS) | set(PARAM_RANGES), "/generate")
    v = {name: typed(body, name, kind) for name, kind in NATIVE_FIELDS.items()}
    if v["prompt"] is None:
        raise invalid("prompt", "prompt is required: the instruction (with raw: true, the text to continue)")
    params = check_params({k: body[k] for k in PARAM_RANGES if k in body}, {})
    if not params["raw"] and not v["prompt"].strip():
        raise invalid("prompt", "prompt must not be empty (an empty prompt is allowed with raw: true)")
    prompt = v["prompt"]
    if v["context"]:
        if params["raw"]:
            raise invalid("context", "context fills the template's Input block; it cannot be used with raw: true")
        prompt, params["raw"] = format_prompt(prompt, v["context"]), True  # templated here, sent as is
    return prompt, params, bool(v["stream"]), body.get("max_new_tokens") is not None


OPENAI_TO_OURS = (("max_tokens", "max_new_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                  ("top_k", "top_k"), ("repetition_penalty", "repetition_penalty"), ("seed", "seed"),
                  ("stop", "stop"))


def openai_params(body, default_max_tokens, raw):
    """OpenAI sampling fields -> (our params, max_tokens given?, stream, include_usage).

    raw: the default for our `raw` (the completions endpoint lets the body override it).
    """
    n = typed(body, "n", "integer")
    if n is not None and n != 1:
        raise invalid("n", f"n must be 1 (one completion per request), got {n}")
    given = {ours: body.get(theirs) for theirs, ours in OPENAI_TO_OURS}
    explicit_max = given["max_new_tokens"] is not None
    if not explicit_max and default_max_tokens is not None:
        given["max_new_tokens"] = default_max_tokens
    given["raw"] = body["raw"] if body.get("raw") is not None else raw
    params = check_params(given, {"max_new_tokens": "max_tokens"})
    stream = bool(typed(body, "stream", "boolean"))
    options = typed(body, "stream_options", "object") or {}
    include_usage = options.get("include_usage") is True
    typed(body, "model", "string")
    typed(body, "user", "string")
    return params, explicit_max, stream, include_usage


def refuse_unsupported(body, completion):
    """OpenAI fields we accept only at their no-op value; anything else is a 422 that says why."""
    for name in ("frequency_penalty", "presence_penalty"):
        value = typed(body, name, "number")
        if value is not None and not -2.0 <= value <= 2.0:
            raise invalid(name, f"{name} must be in [-2, 2], got {value}")
        if value:
            raise invalid(name, f"{name} is not supported (only 0); use repetition_penalty (1.0 = off) instead")
    checks = [
        ("logit_bias", lambda v: not v, "logit_bias is not supported"),
        ("tools", lambda v: not v, "tools are not supported by this model"),
        ("functions", lambda v: not v, "functions are not supported by this model"),
        ("tool_choice", lambda v: v in (None, "none"), "tool_choice must be 'none'"),
        ("function_call", lambda v: v in (None, "none"), "function_call must be 'none'"),
        ("response_format", lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
         'response_format must be {"type": "text"}'),
        ("top_logprobs", lambda v: not v, "top_logprobs is not supported"),
        ("echo", lambda v: v in (None, False), "echo is not supported"),
        ("best_of", lambda v: v in (None, 1), "best_of must be 1"),
        ("suffix", lambda v: not v, "suffix is not supported"),
        ("logprobs", lambda v: v is None or v is False or (type(v) is int and v == 0), "logprobs is not supported"),
    ]
    for name, ok, message in checks:
        if name in body and not ok(body[name]):
            raise invalid(name, message)


# ============================================================================ create_app and the CLI


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (gunicorn and pytest swap it)."""

    @property
    def stream(self):
        import sys

        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level):
    """JSON lines on stderr from the 'gpt2i.serve' logger (one handler, however many apps are created)."""
    log.setLevel(getattr(logging, level.upper()))
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False


def create_app(config=None):
    """The Flask app. config: None (read GPT2I_* environment variables), a dict, or a ServeConfig.

    The model starts loading in a background thread before this returns. The Server object
    (config, engine, metrics) is at app.extensions["gpt2i"]; call its close() to stop the engine.
    """
    cfg = make_config(config, environ=os.environ if config is None else None)
    setup_logging(cfg.log_level)
    server = Server(cfg)
    app = server.build_app()
    server.engine.start()
    return app


def build_parser():
    parser = argparse.ArgumentParser(
        description="Serve a gpt2-instruct checkpoint: POST /generate, OpenAI-compatible /v1/*, the chat page at /. "
                    "Every flag can also be set by an environment variable (shown); the flag wins.",
        epilog='production: GPT2I_CKPT=PATH gunicorn -c gunicorn.conf.py "serve:create_app()"',
    )
    for f in fields(ServeConfig):
        if f.name in _INTERNAL_ONLY:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
                            help=f"{_HELP[f.name]} [env {env_name(f.name)}; default: {shown if shown else 'none'}]")
    return parser


def main(argv=None):
    import sys

    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None}
    cfg = make_config(values, environ=os.environ)
    app = create_app(cfg)
    print(f"gpt2-instruct: http://{cfg.host}:{cfg.port} (model {cfg.ckpt} loading in the background; "
          f"GET /health says when it is ready)", file=sys.stderr)
    try:
        app.run(host=cfg.host, port=cfg.port, threaded=True, use_reloader=False)
    finally:
        app.extensions["gpt2i"].close()


if __name__ == "__main__":
    run_cli(main)
