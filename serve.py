"""Serve a gpt2-instruct model over HTTP: a native API, an OpenAI-compatible API and the chat page.

    python serve.py --ckpt out/demo/sft                      # http://127.0.0.1:5000
    GPT2I_CKPT=out/demo/sft gunicorn -c gunicorn.conf.py "serve:create_app()"   # production

Every flag has a GPT2I_* environment variable (`python serve.py --help` lists both); the flag wins.
The routes, their fields and errors are in GET /openapi.json; docs/design.md has the contracts.

Concurrency: the engine (inference.Engine: continuous batching, requests join and leave the
running batch between steps) runs in a process of its own, whose one loop calls engine.step(), so
request threads never hold up the GPU by holding the interpreter lock. Request threads send adds
and cancels over a pipe; one reader thread here puts each step's outputs into per-request queues.
A request counts against --max-queue from admission until its response is done. A client that
goes away is noticed by a peek at its socket (and by a failed write when streaming) and its
engine request is cancelled.
"""

import argparse
import base64
import hmac
import itertools
import json
import logging
import math
import multiprocessing
import os
import queue
import re
import reprlib
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
import uuid
from concurrent.futures import ThreadPoolExecutor

import prometheus_client as prom
import torch
from flask import Flask, Response, g, jsonify, request, send_from_directory
from flask_cors import CORS
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import parse_many
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import PathConverter, ValidationError
from werkzeug.security import safe_join
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

import inference
from common import DTYPES, UserError, pick_device, run_cli
from inference import PARAM_RANGES, ParamError
from model import PRETRAINED_CONFIGS
from prompt import format_prompt
from tokenizer import decode, encode, get_tokenizer

ROOT = os.path.dirname(os.path.abspath(__file__))
ENV_PREFIX = "GPT2I_"
MAX_N = 8  # choices per request (n): they share one prefill
KEEPALIVE_S = 15.0  # an SSE comment after this long without a token keeps proxies from closing the stream
POLL_S = 0.05  # how often a request thread waiting for tokens checks that its client is still there
EMBED_TIMEOUT_S = 120.0  # how long an embeddings call waits for the engine
log = logging.getLogger("gpt2i.serve")

# ============================================================================ configuration


# name: (default, type, help); each is a flag (--max-queue) and an environment variable (GPT2I_MAX_QUEUE)
OPTIONS = {
    "ckpt": (None, str, "checkpoint file or folder, HF GPT-2 folder, or OpenAI GPT-2 name (gpt2, gpt2-medium, ...)"),
    "host": ("127.0.0.1", str, "address to bind (python serve.py)"),
    "port": (5000, int, "port to bind (python serve.py; 0: any free port)"),
    "model_name": ("gpt2-instruct", str, "model id shown in /health, /v1/models and replies"),
    "allowed_hosts": ([], list, "comma-separated Host names accepted (* = any); default: localhost, 127.0.0.1, "
                                "[::1] and --host"),
    "api_key": (None, str, "require Authorization: Bearer KEY (all but /health, /params, /openapi.json, the page)"),
    "rate_limit": ("30/minute;5/second", str, 'per-client limit on generation routes, flask-limiter syntax; "none" = off'),
    "rate_limit_storage": ("memory://", str, "memory:// (one process) or redis://host:port (shared by gunicorn workers)"),
    "trust_proxy": (0, int, "number of reverse proxies in front whose X-Forwarded-For is trusted (0: ignore it)"),
    "cors_origins": ([], list, "comma-separated origins allowed cross-origin (or *); none by default"),
    "max_queue": (64, int, "generation requests admitted at once (running + waiting); more get 503 + Retry-After"),
    "max_batch": (32, int, "requests the engine decodes together (KV-cache slots)"),
    "prefill_chunk": (512, int, "prompt tokens prefilled per engine step: running streams stall at most this long"),
    "max_body_bytes": (1 << 20, int, "largest request body in bytes (413 past it)"),
    "max_prompt_tokens": (None, int, "longest prompt in tokens (default: the model's context - 1)"),
    "device": ("auto", str, "auto, cpu, cuda, cuda:N, mps"),
    "dtype": ("auto", str, "auto (bf16 on capable GPUs, else fp32), float32, bfloat16, float16"),
    "quantize": ("none", str, "none, or int8 (CPU, float32)"),
    "compile": (False, bool, "torch.compile the decode step (CUDA; slower start, faster decoding) (1/0)"),
    "threads": (32, int, "python serve.py: most connections served at once (the rest wait their turn)"),
    "read_timeout": (30.0, float, "python serve.py: seconds a connection may stay silent while sending its request"),
    "graceful_timeout": (30.0, float, "python serve.py: seconds running streams get to finish on SIGTERM"),
    "static_dir": (os.path.join(ROOT, "static"), str, "folder with the chat page, served at /"),
    "log_level": ("info", str, "debug, info, warning, error (requests to /health and static files: debug)"),
    "log_format": ("auto", str, "auto (JSON unless stderr is a terminal), json, text"),
}
CHOICES = {"dtype": ("auto", *DTYPES), "quantize": ("none", "int8"), "log_format": ("auto", "json", "text"),
           "log_level": ("debug", "info", "warning", "error")}


def env_name(name):
    return ENV_PREFIX + name.upper()


def _convert(name, kind, value):
    """A flag or env string -> the option's type; a bad value is a one-line UserError naming it."""
    if not isinstance(value, str):
        return value
    if kind is list:
        return [v.strip() for v in value.split(",") if v.strip()]
    if value.strip() == "":
        return None
    if kind is bool:
        word = value.strip().lower()
        if word not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise UserError(f"{name} must be 1/0 (true/false), got {value!r}")
        return word in ("1", "true", "yes", "on")
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None


def make_config(values=None, environ=None):
    """The config (a namespace of OPTIONS) from defaults <- environ (GPT2I_*) <- values (a dict), validated."""
    cfg = {name: list(default) if kind is list else default for name, (default, kind, _) in OPTIONS.items()}
    for name, (_, kind, _) in OPTIONS.items():
        if environ is not None and environ.get(env_name(name), "").strip():
            cfg[name] = _convert(env_name(name), kind, environ[env_name(name)])
    for name, value in (values or {}).items():
        if name not in OPTIONS:
            raise UserError(f"unknown serve option {name!r}; known: {', '.join(OPTIONS)}")
        cfg[name] = _convert("--" + name.replace("_", "-"), OPTIONS[name][1], value)
    cfg = types.SimpleNamespace(**cfg)
    validate_config(cfg)
    return cfg


def validate_config(cfg):
    """Fail before the port is bound, with one line, on anything the server could not run with."""
    if not cfg.ckpt:
        raise UserError(f"no checkpoint: pass --ckpt PATH or set {env_name('ckpt')}")
    if not os.path.exists(cfg.ckpt) and cfg.ckpt not in PRETRAINED_CONFIGS:
        raise UserError(f"checkpoint not found: {cfg.ckpt} (a ckpt.pt, a folder holding one, an HF GPT-2 folder, "
                        f"or one of {', '.join(PRETRAINED_CONFIGS)})")
    for name, allowed in CHOICES.items():
        if str(getattr(cfg, name)).lower() not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    lowest = {"port": 0, "trust_proxy": 0, "graceful_timeout": 0, "read_timeout": 0.1, **{name: 1 for name in (
        "max_queue", "max_batch", "prefill_chunk", "max_body_bytes", "threads", "max_prompt_tokens")}}
    for name, lo in lowest.items():
        value = getattr(cfg, name)
        if value is not None and not lo <= value <= (65535 if name == "port" else math.inf):
            raise UserError(f"--{name.replace('_', '-')} must be >= {lo}{' and <= 65535' * (name == 'port')}, "
                            f"got {value}")
    if rate_limit_enabled(cfg):
        try:
            parse_many(cfg.rate_limit)
        except ValueError:
            raise UserError(f"invalid --rate-limit {cfg.rate_limit!r}: use flask-limiter syntax such as "
                            f'"30/minute;5/second", or "none"') from None
    if "://" not in cfg.rate_limit_storage:
        raise UserError(f"--rate-limit-storage must be a storage URI such as memory:// or redis://host:port, "
                        f"got {cfg.rate_limit_storage!r}")
    try:
        device = pick_device(cfg.device)
    except RuntimeError as e:
        raise UserError(f"unknown --device {cfg.device!r}: {str(e).splitlines()[0]}") from None
    usable = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if usable is not None and not usable():
        raise UserError(f"--device {cfg.device} asked for, but {device.type.upper()} is not available on this machine")
    if cfg.quantize == "int8" and (device.type != "cpu" or cfg.dtype not in ("auto", "float32", "fp32")):
        raise UserError(f"--quantize int8 runs on CPU in float32 only (asked: {device.type}, {cfg.dtype})")


def rate_limit_enabled(cfg):
    return bool(cfg.rate_limit) and cfg.rate_limit.strip().lower() not in ("none", "off", "0")


def host_name(host):
    """A Host header without its port: "[::1]:5000" -> "[::1]", "localhost:5000" -> "localhost"."""
    host = (host or "").lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0]


def allowed_hosts(cfg):
    """Host names (without port) this server answers to; None = any."""
    if "*" in cfg.allowed_hosts:
        return None
    names = set(cfg.allowed_hosts or ("localhost", "127.0.0.1", "[::1]"))
    if not cfg.allowed_hosts and cfg.host not in ("0.0.0.0", "::", ""):
        names.add(f"[{cfg.host}]" if ":" in cfg.host else cfg.host)
    return {n.lower() for n in names}


# ============================================================================ errors


class ApiError(Exception):
    """An HTTP error rendered as {"error": {"type", "message", "param", "code"}}."""

    def __init__(self, status, type_, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.type, self.message, self.param = status, type_, message, param
        self.code = code or type_
        self.headers = headers or {}

    def body(self):
        return {"error": {"type": self.type, "message": self.message, "param": self.param, "code": self.code}}


def invalid(param, message, code=None):
    """400 for one request field; the message names the field and what is allowed."""
    return ApiError(400, "invalid_request_error", message, param, code)


def unavailable(code, message, retry_after):
    return ApiError(503, code, message, headers={"Retry-After": str(retry_after)})


SHUTTING_DOWN = "the server is shutting down; retry on another instance or shortly"
HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found",
              405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large",
              415: "unsupported_media_type", 429: "rate_limit_exceeded", 503: "overloaded"}


class ClientGone(Exception):
    """The client closed its connection: its generation is cancelled."""


def client_gone(environ):
    """True when the request's client has closed its connection: a poll and a peek, never a read."""
    sock = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLRDHUP)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLRDHUP | select.POLLNVAL):
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""  # readable: EOF, or the next pipelined request
    except ValueError:  # TLS sockets take no recv flags: cannot tell
        return False
    except OSError:
        return True


# ============================================================================ request bodies
#
# Each route's fields, in one table per route: a JSON Schema (checked here, published in
# /openapi.json) or the engine parameter the field feeds (checked by inference.validate_params
# against PARAM_RANGES, published from it). `only` marks OpenAI fields accepted at a no-op value.


def param_schema(name):
    """The JSON Schema of one engine parameter, from PARAM_RANGES."""
    spec = PARAM_RANGES[name]
    if name == "stop":
        schema = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                 "maxItems": spec.get("max_items", 4)}]}
    elif spec["type"] == "bias":
        schema = {"type": "object", "maxProperties": spec["max_items"],
                  "additionalProperties": {"type": "number", "minimum": spec["min"], "maximum": spec["max"]}}
    else:
        schema = {"type": {"int": "integer", "float": "number", "bool": "boolean"}.get(spec["type"], "string")}
        if spec.get("min") is not None:
            schema["exclusiveMinimum" if spec.get("min_exclusive") else "minimum"] = spec["min"]
        if spec.get("max") is not None:
            schema["maximum"] = spec["max"]
    if spec.get("default") is not None:
        schema["default"] = spec["default"]
    return {**schema, "description": spec.get("help", "")}


def F(schema=None, param=None, only=None, why=None, **extra):
    """One field of a route table."""
    return {"schema": schema or {}, "param": param, "only": only, "why": why, **extra}


def T(kind, description="", **bounds):
    return F({"type": kind, "description": description, **bounds})


STRING_OR_IDS = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                           {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                           {"type": "array", "minItems": 1,
                            "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}}]}
MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant"]}, "name": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]}}}}
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "logit_bias", "stop", "seed", "ignore_eos")
OPENAI_COMMON = {
    "model": T("string", "any id is accepted; replies carry this server's model name"),
    "max_tokens": F(param="max_new_tokens"),
    **{name: F(param=name) for name in SAMPLING},
    "n": T("integer", "choices to generate (they share one prefill)", minimum=1, maximum=MAX_N),
    "stream": T("boolean"),
    "stream_options": F({"type": "object", "properties": {"include_usage": {"type": "boolean"}}}),
    "user": T("string", "ignored"),
    "best_of": F({"type": "integer", "minimum": 1, "maximum": 1}, only=lambda v: v == 1,
                 why="best_of is not supported (only 1); use n for several choices"),
}
NATIVE_FIELDS = {
    "prompt": F({"type": "string", "description": "the instruction (with raw: true, the text to continue)"},
                required=True),
    "context": T("string", "fills the template's Input block"),
    "stream": T("boolean"),
    "logprobs": T("integer", "return each token's log-probability and this many alternatives", minimum=0,
                  maximum=20),
    **{name: F(param=name) for name in PARAM_RANGES},
}
COMPLETION_FIELDS = {
    **OPENAI_COMMON,
    "prompt": F(STRING_OR_IDS, required=True),
    "logprobs": T("integer", "log-probabilities of each token and this many alternatives", minimum=0, maximum=5),
    "echo": T("boolean", "return the prompt, with its logprobs, before the completion"),
    "suffix": F({"type": "string", "maxLength": 0}, only=lambda v: v == "", why="suffix is not supported"),
    "raw": F(param="raw"),
}
CHAT_FIELDS = {
    **OPENAI_COMMON,
    "messages": F(MESSAGES, required=True),
    "max_completion_tokens": F(param="max_new_tokens"),
    "logprobs": T("boolean"),
    "top_logprobs": T("integer", "alternatives per token (needs logprobs: true)", minimum=0, maximum=20),
    "response_format": F({"type": "object", "properties": {"type": {"enum": ["text"]}}},
                         only=lambda v: v.get("type") == "text", why='response_format must be {"type": "text"}'),
    "tools": F({"type": "array", "maxItems": 0}, only=lambda v: not v, why="tools are not supported by this model"),
    "tool_choice": F({"enum": ["none"]}, only=lambda v: v == "none", why="tool_choice must be 'none'"),
    "functions": F({"type": "array", "maxItems": 0}, only=lambda v: not v, why="functions are not supported"),
    "function_call": F({"enum": ["none"]}, only=lambda v: v == "none", why="function_call must be 'none'"),
    "parallel_tool_calls": T("boolean", "ignored"),
}
TOKENIZE_FIELDS = {
    "model": T("string"),
    "prompt": T("string", "text to tokenize as is (with raw: false, in the instruction template)"),
    "messages": F(MESSAGES),
    "raw": T("boolean", "default true for prompt"),
    "add_special_tokens": T("boolean", "ignored: GPT-2 adds none"),
    "return_token_strs": T("boolean"),
}
DETOKENIZE_FIELDS = {"model": T("string"), "tokens": F({"type": "array", "items": {"type": "integer", "minimum": 0}},
                                                       required=True)}
EMBEDDING_FIELDS = {
    "model": T("string"),
    "input": F(STRING_OR_IDS, required=True),
    "encoding_format": F({"enum": ["float", "base64"]}),
    "user": T("string", "ignored"),
    "dimensions": F({"type": "integer"}, only=lambda v: False, why="dimensions is not supported"),
}
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}


def check_type(name, value, schema):
    """The top-level checks of a field's schema (type, enum, bounds, lengths); nested shapes are checked where used."""
    kind = schema.get("type")
    ok = kind is None or (isinstance(value, JSON_TYPES[kind]) and not (kind in ("integer", "number")
                                                                       and isinstance(value, bool)))
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok:
        raise invalid(name, f"{name} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {short(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise invalid(name, f"{name} must be one of {', '.join(map(str, schema['enum']))}, got {short(value)}")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise invalid(name, f"{name} must be between {lo} and {hi}, got {short(value)}")
    return value


def short(value):
    return reprlib.repr(value)  # bounded in length and depth, whatever a client nests


def read_body(table, route):
    """The JSON body checked against a route table -> (plain fields, engine params given, client names)."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", f"{route} takes a JSON body: send Content-Type: application/json")
    try:
        raw = request.get_data(cache=True)  # RequestEntityTooLarge past MAX_CONTENT_LENGTH
    except (TimeoutError, OSError):
        raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
    try:
        body = json.loads(raw, parse_constant=_refuse_number, parse_float=_finite_float, parse_int=_sane_int)
    except RecursionError:
        raise invalid(None, "the request body is nested too deeply", "invalid_json") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid(None, f"the request body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    unknown = sorted(set(body) - set(table))
    if unknown:
        raise invalid(unknown[0], f"unknown field {unknown[0]!r} for {route}; allowed: {', '.join(sorted(table))}")
    for name, spec in table.items():
        if spec.get("required") and body.get(name) is None:
            raise invalid(name, f"{name} is required ({route})")
    plain, params, names = {}, {}, {}
    for name, value in body.items():
        spec = table[name]
        if value is None:
            continue  # null = the default, as OpenAI
        if spec["param"]:
            if spec["param"] in params:
                raise invalid(name, f"give {names[spec['param']]} or {name}, not both")
            params[spec["param"]], names[spec["param"]] = value, name
            continue
        if "type" in spec["schema"] or "enum" in spec["schema"]:
            value = check_type(name, value, spec["schema"])
        if spec["only"] is not None and not spec["only"](value):
            raise invalid(name, spec["why"])
        plain[name] = value
    return plain, params, names


def _refuse_number(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _sane_int(text):
    if len(text.lstrip("-")) > 300:  # past float range: no field takes it (and math on it overflows)
        raise ValueError(f"integer {text[:20]}... is out of range")
    return int(text)


def engine_params(given, names, defaults=None):
    """inference.validate_params over defaults + the given fields; a ParamError becomes a 400 in the client's words."""
    try:
        return inference.validate_params(**{**(defaults or {}), **given})
    except ParamError as e:
        raise param_error(e, names) from None
    except (TypeError, ValueError, OverflowError, RecursionError) as e:  # a shape validate_params did not expect
        raise invalid(None, f"invalid generation parameter: {e}") from None


def param_error(error, names):
    """A ParamError -> 400 whose param and message use the client's field name (max_new_tokens -> max_tokens)."""
    message = str(error)
    for ours, theirs in names.items():
        if ours != theirs:
            message = re.sub(rf"\b{ours}\b", theirs, message)
    return invalid(names.get(error.param, error.param), message)


def prompt_list(value, param):
    """A prompt field (string, list of strings, ids, list of id lists) -> list of str | list[int]."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(type(v) is int for v in value):
            return [check_ids(value, param)]
        if all(isinstance(v, list) and v for v in value):
            return [check_ids(v, f"{param}[{i}]") for i, v in enumerate(value)]
    raise invalid(param, f"{param} must be a string, a list of strings, a list of token ids, or a list of "
                         f"token-id lists (none empty), got {short(value)}")


def check_ids(ids, param):
    try:
        return inference.check_ids(ids, param)
    except ParamError as e:
        raise invalid(param, str(e)) from None


# ============================================================================ chat messages -> the template


def message_text(message, index):
    """A chat message's content as text (a string, or a list of {"type": "text", "text": ...} parts)."""
    param = f"messages[{index}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    if content is None and message.get("role") == "assistant":
        return ""
    raise invalid(param, f'{param} must be a string or a list of text parts ({{"type": "text", "text": ...}})')


def split_chat(messages):
    """messages -> (system text, earlier turns [(role, text)], last user text); validates roles and order."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise invalid(f"messages[{i}].role", f"messages[{i}].role must be one of system, developer, user, "
                                                 f"assistant, got {short(role)}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}]", f"messages[{i}] has unsupported fields: {', '.join(sorted(extra))}")
        text = message_text(m, i)
        (system if role in ("system", "developer") else turns).append(text if role in ("system", "developer")
                                                                       else (role, text))
    if not turns or turns[-1][0] != "user":
        raise invalid("messages", "messages: the last message must have role 'user'")
    if not turns[-1][1].strip():
        last = f"messages[{len(messages) - 1}].content"
        raise invalid(last, f"{last}: the last user message must not be empty")
    return "\n\n".join(s for s in system if s), turns[:-1], turns[-1][1]


def chat_context(system_text, history):
    """The ### Input: text: system text, blank line, then the transcript `User: ...` / `Assistant: ...`."""
    transcript = "\n".join(f"{'User' if role == 'user' else 'Assistant'}: {text}" for role, text in history)
    return "\n\n".join(part for part in (system_text, transcript) if part)


def fold_chat(messages, fits):
    """The templated prompt ids for a chat, keeping the most recent earlier turns for which
    fits(n_tokens) holds. Binary search on how many of the oldest turns to drop (a few encodings)."""
    system, history, instruction = split_chat(messages)

    def build(drop):
        return inference.encode_prompt(format_prompt(instruction, chat_context(system, history[drop:])), raw=True)

    best = build(0)
    if fits(len(best)) or not history:
        return best
    lo, hi = 0, len(history)  # dropping lo turns does not fit; dropping hi is the last resort
    best = build(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ids = build(mid)
        if fits(len(ids)):
            hi, best = mid, ids
        else:
            lo = mid
    return best


# ============================================================================ logprob shapes

def token_bytes(token_id):
    return get_tokenizer().decode_single_token_bytes(token_id)


def token_str(token_id):
    return token_bytes(token_id).decode("utf-8", errors="replace")


def native_logprobs(entries):
    return [{"token": token_str(e["token_id"]), "token_id": e["token_id"], "logprob": e["logprob"],
             "top_logprobs": [{"token": token_str(t), "token_id": t, "logprob": lp} for t, lp in e["top"]]}
            for e in entries]


def chat_logprobs(entries):
    def one(t, lp):
        return {"token": token_str(t), "logprob": lp, "bytes": list(token_bytes(t))}

    return {"content": [{**one(e["token_id"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries, offset):
    """OpenAI's legacy shape; offset: characters of text before these tokens. Prompt entries may be None."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        tok = token_str(e["token_id"])
        out["tokens"].append(tok)
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append(None if e["top"] is None else {token_str(t): lp for t, lp in e["top"]})
        out["text_offset"].append(offset)
        offset += len(tok)
    return out


def prompt_entries(ids, prompt_logprobs):
    """Engine prompt_logprobs (the first None) -> entries shaped like generated ones."""
    return [e or {"token_id": t, "logprob": None, "top": None} for t, e in zip(ids, prompt_logprobs)]


# ============================================================================ the server state


class Reply:
    """One HTTP request's engine requests, seen from its request thread: outputs arrive on a queue
    (put there by the reader thread), in order; an ApiError ends it early (shutdown, engine failure)."""

    def __init__(self, server, n_choices, stream):
        self.server, self.stream = server, stream
        self.handles = []  # a Handle per prompt
        self.queue = queue.Queue()  # lists of (choice, Output), or the ApiError that ended the reply
        self.pending = []  # not streamed: outputs held until a choice ends (no wake-up per step)
        self.open = n_choices  # choices not finished yet
        self.started = False  # first output seen: no longer "queued"
        self.ended = None  # the ApiError that ended it, if any
        self.t0 = time.perf_counter()
        self.t_first = self.t_last = self.t_end = None
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reasons = {}

    def _next(self):
        """The next outputs [(choice, Output), ...], [] after POLL_S; raises the ApiError that ended the reply."""
        try:
            item = self.queue.get(timeout=POLL_S)
        except queue.Empty:
            return []
        if isinstance(item, ApiError):
            raise item
        for index, out in item:
            if out.finish_reason is not None:
                self.open -= 1
                self.finish_reasons[index] = out.finish_reason
        return item

    def items(self, environ, keepalive=False):
        """Yield (choice, Output) until every choice has finished (None after KEEPALIVE_S idle, if asked);
        raises ClientGone once the client has closed its connection."""
        idle = 0.0
        while self.open:
            got = self._next()
            if client_gone(environ):
                raise ClientGone()
            idle = 0.0 if got else idle + POLL_S
            if keepalive and idle >= KEEPALIVE_S:
                idle = 0.0
                yield None  # a keep-alive
            yield from got

    def drain(self, timeout=2.0):
        """After a cancel: wait (bounded) for the engine to end every choice, so the log tells the truth."""
        deadline = time.monotonic() + timeout
        try:
            while self.open and time.monotonic() < deadline:
                self._next()
        except ApiError:
            pass

    def entries(self, index, out):
        """The logprob entries of an output: the prompt's first (echo), then the new tokens'."""
        if not out.prompt_logprobs:
            return list(out.logprobs or [])
        ids = next(h.ids for h in self.handles if h.base <= index < h.base + h.n)
        return prompt_entries(ids, out.prompt_logprobs) + list(out.logprobs or [])

    def timings(self):
        end = self.t_end or time.perf_counter()
        ms = lambda t: None if t is None else round((t - self.t0) * 1e3, 2)  # noqa: E731
        return {"first_token_ms": ms(self.t_first), "total_ms": ms(end)}

    def usage(self):
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class Handle:
    """The server's side of one engine request: `n` choices, `done` once all have finished."""

    def __init__(self, rid, n, reply, base, ids):
        self.id, self.n, self.reply, self.base, self.ids = rid, n, reply, base, ids
        self.open, self.done = n, False


class Server:
    """The HTTP side of one model: the engine runs in a process of its own (engine_process), so its
    loop never waits for the interpreter lock behind request threads; a reader thread here puts
    what it sends into each reply's queue. create_app builds one, serve.state(app) returns it."""

    def __init__(self, config):
        self.config = config
        self.model_name = config.model_name
        self.status, self.error = "loading", None
        self.info, self.context_length = {}, None
        self.created = int(time.time())
        self.accepting = True
        self._replies = set()  # admitted and not released
        self._handles = {}  # engine request id -> Handle, until every choice has finished
        self._embeds = {}  # embedding call id -> [threading.Event, result]
        self._ids = itertools.count()
        self._stats = {"running": 0, "waiting": 0, "slots_used": 0, "slots_total": 0}  # as of the last step
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # a pipe takes one sender at a time
        self._ready = threading.Event()
        self._closed = False
        self._conn = self._proc = None
        self._thread = threading.Thread(target=self._run, name="gpt2i-loop", daemon=True)
        self._make_metrics()

    # ------------------------------------------------------------------ metrics

    def _make_metrics(self):
        prom.disable_created_metrics()  # no *_created samples: they double the exposition for nothing
        r = self.registry = prom.CollectorRegistry()
        self.m_requests = prom.Counter("gpt2i_requests", "HTTP requests by endpoint and status.",
                                       ["endpoint", "status"], registry=r)
        self.m_latency = prom.Histogram("gpt2i_request_latency_seconds", "Request latency (streams: to the end).",
                                        ["endpoint"], registry=r,
                                        buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.m_tokens = prom.Counter("gpt2i_tokens", "Tokens processed, by kind (prompt, completion).", ["kind"],
                                     registry=r)
        self.m_cancelled = prom.Counter("gpt2i_cancelled", "Generations cancelled (client gone or shutdown).",
                                        registry=r)
        self.m_ttft = prom.Histogram("gpt2i_time_to_first_token_seconds", "Admission to first output.", registry=r,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.m_itl = prom.Histogram("gpt2i_inter_token_latency_seconds", "Time between tokens of one choice.",
                                    registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        for name, help_, key in (("gpt2i_requests_waiting", "Requests waiting for the engine.", "waiting"),
                                 ("gpt2i_requests_running", "Requests being decoded.", "running"),
                                 ("gpt2i_kv_slots_used", "KV-cache slots in use.", "slots_used"),
                                 ("gpt2i_kv_slots_total", "KV-cache slots.", "slots_total")):
            prom.Gauge(name, help_, registry=r).set_function(lambda key=key: self.stats()[key])
        prom.Gauge("gpt2i_requests_admitted", "Requests held against --max-queue.",
                   registry=r).set_function(lambda: len(self._replies))
        prom.Gauge("gpt2i_model_loaded", "1 when the model is loaded.",
                   registry=r).set_function(lambda: int(self.status == "ok"))

    def stats(self):
        return dict(self._stats)

    # ------------------------------------------------------------------ lifecycle

    def start(self):
        """Start the engine process (it loads the model) and the thread that reads it."""
        cfg = self.config
        options = {"ckpt": cfg.ckpt, "device": cfg.device, "dtype": cfg.dtype, "quantize": cfg.quantize,
                   "max_batch": cfg.max_batch, "prefill_chunk": cfg.prefill_chunk, "compile": cfg.compile}
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: CUDA and threads do not survive fork
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=engine_process, args=(child, options), name="gpt2i-engine", daemon=True)
        self._proc.start()
        child.close()
        self._thread.start()
        return self

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
            queued = [r for r in self._replies if not r.started and r.ended is None]
            for r in queued:
                self._end(r, unavailable("shutting_down", SHUTTING_DOWN, 5))

    def close(self, timeout=0.0):
        """Shut down: running streams get `timeout` seconds to finish, then end with an error event;
        the engine process and the reader thread stop. Idempotent."""
        self.begin_shutdown()
        deadline = time.monotonic() + timeout
        while self._replies and time.monotonic() < deadline:
            time.sleep(POLL_S)
        with self._lock:
            for r in list(self._replies):
                if r.ended is None:
                    self._end(r, unavailable("shutting_down", "the server shut down before this generation "
                                                              "finished", 5))
        deadline = time.monotonic() + 2.0  # let request threads write their last event
        while self._replies and time.monotonic() < deadline:
            time.sleep(POLL_S / 2)
        self._closed = True
        if self._proc is not None:
            self._send(("stop",))
            self._proc.join(10.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)
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
            self._send(("cancel", handle.id))

    def _run(self):
        """The reader thread: the engine's load result, then its outputs, until it stops."""
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            message = ("error", "the engine process exited while loading")
        if message[0] == "error":  # reported by /health and wait_ready, never a crash
            self.status, self.error = "error", message[1]
            log.error({"event": "model_load_failed", "error": self.error})
            self._ready.set()
            return
        _, self.info, self.context_length, self._stats = message
        self.status = "ok"
        self._ready.set()
        log.info({"event": "model_loaded", "model": self.model_name, **self.describe(), "pid": os.getpid()})
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "outputs":
                now = time.perf_counter()
                with self._lock:
                    for out in message[1]:
                        self._dispatch(out, now)
                self._stats = message[2]
            elif kind == "embedded":
                call = self._embeds.get(message[1])
                if call is not None:
                    call[1] = message[2]
                    call[0].set()
            elif kind in ("rejected", "failed"):
                error = ApiError(500, "server_error", f"generation failed: {message[2]}") if kind == "failed" \
                    else invalid(*message[2])
                with self._lock:
                    for rid in message[1]:
                        handle = self._handles.pop(rid, None)
                        if handle is not None and handle.reply.ended is None:
                            self._end(handle.reply, error)
        if not self._closed:  # the engine process died: fail what runs, refuse what comes
            self.status, self.error = "error", "the engine process exited"
            log.error({"event": "engine_exited", "exitcode": self._proc.exitcode if self._proc else None})
            with self._lock:
                for r in list(self._replies):
                    if r.ended is None:
                        self._end(r, ApiError(500, "server_error", "generation failed: the engine stopped"))
            for call in list(self._embeds.values()):
                call[0].set()

    def _dispatch(self, out, now):
        """One engine Output -> its reply's queue, with the token metrics (the reader thread, under self._lock)."""
        handle = self._handles.get(out.request)
        if handle is None:
            return
        reply, n_new = handle.reply, len(out.token_ids)
        out.request = handle
        self.m_tokens.labels("completion").inc(n_new)
        if n_new:  # one observation per output: the mean gap of its tokens
            self.m_ttft.observe(now - reply.t0) if reply.t_last is None else \
                self.m_itl.observe((now - reply.t_last) / n_new)
            reply.t_first, reply.t_last = reply.t_first or now, now
        if out.finish_reason is not None:
            handle.open -= 1
            if not handle.open:
                handle.done = True
                del self._handles[handle.id]
            reply.completion_tokens += (out.usage or {}).get("completion_tokens", 0)
            if out.finish_reason == "cancelled":
                self.m_cancelled.inc()
        if reply.ended is None:
            reply.started = True
            reply.pending.append((handle.base + out.index, out))
            if reply.stream or out.finish_reason is not None:
                reply.queue.put(reply.pending)
                reply.pending = []

    # ------------------------------------------------------------------ admission

    def require_ready(self):
        if self.status == "loading":
            raise unavailable("model_loading", "the model is still loading; retry shortly", 2)
        if self.status == "error":
            raise unavailable("model_error", f"the model failed to load: {self.error}", 60)
        if not self.accepting:
            raise unavailable("shutting_down", SHUTTING_DOWN, 5)

    def prompt_limit(self):
        return min(self.config.max_prompt_tokens or self.context_length - 1, self.context_length - 1)

    def fit(self, ids, params, explicit_max, names, param="prompt"):
        """Prompt length against --max-prompt-tokens and the context; an unspecified max_new_tokens is
        lowered to fit, an explicit one that does not fit is a 400 naming it."""
        limit, ctx = self.prompt_limit(), self.context_length
        if len(ids) > limit:
            raise invalid(param, f"{param} is {len(ids)} tokens long; the limit is {limit} tokens "
                                 f"(the model's context is {ctx})")
        room = ctx - len(ids)
        if params["max_new_tokens"] > room:
            if explicit_max:
                name = names.get("max_new_tokens", "max_new_tokens")
                raise invalid(name, f"prompt ({len(ids)} tokens) + {name} ({params['max_new_tokens']}) is more than "
                                    f"the model's context of {ctx} tokens; {name} can be at most {room} here")
            params = {**params, "max_new_tokens": room}
        return params

    def admit(self, prompts, params, names, stream, n=1, logprobs=None, echo=False):
        """Queue one engine request per prompt (ids) with n choices each -> a Reply; 503 when full."""
        self.require_ready()
        try:  # what the engine would refuse, refused here: a 400 before anything is queued
            prompts = [inference.check_request(ids, params, n, logprobs, echo, self.config.max_batch,
                                               self.context_length) for ids in prompts]
        except ParamError as e:
            raise param_error(e, names) from None
        reply = Reply(self, len(prompts) * n, stream)
        with self._lock:
            if not self.accepting:
                raise unavailable("shutting_down", SHUTTING_DOWN, 5)
            if len(self._replies) >= self.config.max_queue:
                raise unavailable("overloaded", f"the server is busy ({self.config.max_queue} requests in progress); "
                                                "retry shortly", 1)
            self._replies.add(reply)
            for i, ids in enumerate(prompts):
                handle = Handle(next(self._ids), n, reply, i * n, ids)
                self._handles[handle.id] = handle
                reply.handles.append(handle)
                reply.prompt_tokens += len(ids)
        g.rq["reply"] = reply
        for handle in reply.handles:
            if not self._send(("add", handle.id, handle.ids, params, n, logprobs, echo)):
                self.release(reply)
                raise ApiError(500, "server_error", "generation failed: the engine stopped")
        self.m_tokens.labels("prompt").inc(reply.prompt_tokens)
        return reply

    def release(self, reply):
        """The HTTP side is done with a reply (idempotent): cancel what still runs, free its place."""
        for handle in reply.handles:
            if not handle.done:
                self._send(("cancel", handle.id))
        reply.t_end = reply.t_end or time.perf_counter()
        with self._lock:
            self._replies.discard(reply)

    def embed(self, inputs):
        """Embeddings of id lists, computed by the engine between steps; ParamError for a bad input."""
        self.require_ready()
        eid = next(self._ids)
        call = self._embeds[eid] = [threading.Event(), None]
        try:
            if not self._send(("embed", eid, inputs)) or not call[0].wait(EMBED_TIMEOUT_S) or call[1] is None:
                raise ApiError(500, "server_error", "embedding failed: the engine did not answer")
        finally:
            self._embeds.pop(eid, None)
        if isinstance(call[1], tuple):
            raise ParamError(*call[1])
        return call[1]

    def describe(self):
        return {"device": self.info.get("device"), "dtype": self.info.get("dtype"), "quantize": self.info.get("quantize"),
                "context_length": self.context_length, "graphs_captured": self.info.get("graphs_captured")}


def engine_process(conn, options):
    """The engine's process: load the model, then add / cancel / embed as the server asks and step
    while there is work, sending each step's outputs as plain tuples. Ends when the server says
    stop or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the server decides
    try:
        model, info = inference.load_model_from_checkpoint(options["ckpt"], device=options["device"],
                                                           dtype=options["dtype"], quantize=options["quantize"])
        engine = inference.Engine(model, max_batch=options["max_batch"], prefill_chunk=options["prefill_chunk"],
                                  compile=options["compile"])
        info["graphs_captured"] = engine.warmup()  # CUDA: no request waits for a capture
    except Exception as e:
        conn.send(("error", (str(e).splitlines() or [type(e).__name__])[0]))
        return
    conn.send(("ready", info, int(model.config.block_size), engine.stats()))
    try:
        engine_loop(conn, engine)
    except (EOFError, OSError):
        return  # the server is gone


def engine_loop(conn, engine):
    requests = {}  # id -> engine Request, until it is done
    while True:
        while conn.poll(0 if engine.has_work() else 1.0):
            message = conn.recv()
            kind = message[0]
            if kind == "add":
                rid, ids, params, n, logprobs, echo = message[1:]
                try:
                    requests[rid] = engine.add(ids, params, n=n, logprobs=logprobs, echo=echo, tag=rid)
                except ParamError as e:
                    conn.send(("rejected", [rid], (e.param, str(e))))
            elif kind == "cancel" and message[1] in requests:
                engine.cancel(requests[message[1]])
            elif kind == "embed":
                try:
                    conn.send(("embedded", message[1], engine.embed(message[2])))
                except ParamError as e:
                    conn.send(("embedded", message[1], (e.param, str(e))))
            elif kind == "stop":
                return
        if not engine.has_work():
            continue
        try:
            outputs = engine.step()
        except Exception as e:  # a bug or a device error: fail what runs, keep serving
            traceback.print_exc()
            for r in requests.values():
                engine.cancel(r)
            conn.send(("failed", list(requests), type(e).__name__))
            requests.clear()
            continue
        for o in outputs:  # the server knows a request by its id: the handle stays here
            handle, o.request = o.request, o.request.tag
            if handle.done:
                requests.pop(handle.tag, None)
        conn.send(("outputs", outputs, engine.stats()))


def state(app):
    """The Server behind an app from create_app (gunicorn's hooks call its wait_ready, begin_shutdown, close)."""
    return app.extensions["gpt2i"]


# ============================================================================ responses

OPEN_ENDPOINTS = {"health", "params", "openapi", "index", "static_file", "static_root"}  # no API key needed
QUIET_ENDPOINTS = {"health", "index", "static_file", "static_root"}  # logged at debug level
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def openai_finish(reason):
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def create_app(config=None):
    """The Flask app. config: None (read GPT2I_* environment variables), a dict of options, or a
    make_config result. The model starts loading in the background; serve.state(app) is its Server."""
    if not isinstance(config, types.SimpleNamespace):
        config = make_config(config, environ=os.environ if config is None else None)
    cfg = config
    setup_logging(cfg.log_level, cfg.log_format)
    server = Server(cfg)
    app = build_app(server)
    server.start()
    return app


def build_app(server):
    cfg = server.config
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.sort_keys = False
    app.extensions["gpt2i"] = server
    if cfg.trust_proxy > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=cfg.trust_proxy)
    hosts = allowed_hosts(cfg)

    # ---------------------------------------------------------------- per-request bookkeeping

    @app.before_request
    def begin():
        rid = request.headers.get("X-Request-ID", "")
        g.rq = {"request_id": rid if SAFE_REQUEST_ID.match(rid) else uuid.uuid4().hex, "t0": time.perf_counter(),
                "reply": None, "error": None, "stream": False, "logged": False}
        if hosts is not None and host_name(request.host) not in hosts:
            raise invalid(None, f"Host {request.host!r} is not allowed here (see --allowed-hosts)", "invalid_host")
        if cfg.api_key and request.method != "OPTIONS" and request.endpoint not in OPEN_ENDPOINTS \
                and request.routing_exception is None:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), cfg.api_key.encode()):
                raise ApiError(401, "authentication_error", "missing or invalid API key: send Authorization: "
                               "Bearer <key>", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.after_request
    def end(response):
        rq = g.get("rq")
        response.headers.update(SECURITY_HEADERS)
        if rq is None:
            return response
        response.headers["X-Request-ID"] = rq["request_id"]
        if response.status_code not in (429, 503):
            response.headers.pop("Retry-After", None)  # flask-limiter adds it to every limited response
        elif response.headers.get("Retry-After") == "0":
            response.headers["Retry-After"] = "1"
        rule = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        info = {"method": request.method, "endpoint": "/static" if "filename" in rule else rule,
                "path": request.path[:200], "client": request.remote_addr, "status": response.status_code,
                "quiet": request.endpoint in QUIET_ENDPOINTS}
        response.call_on_close(lambda: finish_request(server, rq, info))
        if rq["stream"]:
            rq["info"] = info
        return response

    # flask-limiter after `end` above, so that its after_request (which adds Retry-After) runs before it
    limiter = Limiter(get_remote_address, app=app, default_limits=[], headers_enabled=True,
                      storage_uri=cfg.rate_limit_storage, key_prefix="gpt2i", in_memory_fallback_enabled=True,
                      enabled=rate_limit_enabled(cfg))
    limited = (limiter.shared_limit(cfg.rate_limit, scope="generation", methods=["POST"])
               if rate_limit_enabled(cfg) else (lambda view: view))

    # ---------------------------------------------------------------- errors

    def error_response(e):
        if g.get("rq") is not None:
            g.rq["error"] = e.code
        resp = jsonify(e.body())
        resp.status_code = e.status
        resp.headers.update(e.headers)
        return resp

    @app.errorhandler(HTTPException)
    def http_error(e):
        code = e.code or 500
        headers = {k: v for k, v in e.get_headers() if k.lower() in ("allow", "retry-after")}
        message = {404: "no such route or file; GET /openapi.json lists the routes",
                   405: f"method not allowed; this route accepts {headers.get('Allow', 'other methods')}",
                   413: f"request body too large; the limit is {cfg.max_body_bytes} bytes"}.get(code, e.description)
        if isinstance(e, RateLimitExceeded):
            message = f"rate limit exceeded ({e.description}); retry after Retry-After seconds"
            headers.setdefault("Retry-After", str(int(e.limit.limit.get_expiry())))
        return error_response(ApiError(code, HTTP_TYPES.get(code, "http_error"), message, headers=headers))

    app.register_error_handler(ApiError, error_response)

    @app.errorhandler(Exception)
    def unexpected(e):
        log.exception("unhandled error")
        rid = g.rq["request_id"] if g.get("rq") else "?"
        return error_response(ApiError(500, "server_error", f"internal server error (request id {rid})"))

    # ---------------------------------------------------------------- generation plumbing

    def respond(reply, stream, render, chunks, head=(), tail=lambda: ()):
        """Non-streamed: wait for every output, then render({choice: {"text", "entries", "finish_reason"}}).
        Streamed: wait for the first output (so that a queued request can still get a JSON 503), then SSE:
        head, chunks(choice, Output) for each output (keep-alive comments while idle), tail()."""
        environ, rq = request.environ, g.rq
        rq["stream"] = stream
        try:
            if not stream:
                choices = {}
                for index, out in reply.items(environ):
                    c = choices.setdefault(index, {"text": "", "entries": []})
                    c["text"] += out.text
                    c["entries"] += reply.entries(index, out)
                    c["finish_reason"] = out.finish_reason
                server.release(reply)
                return render(choices)
            items = reply.items(environ, keepalive=True)
            first = next(items)
            while first is None:  # still queued: nothing is sent before the first output
                first = next(items)
        except ClientGone:
            server.release(reply)
            reply.drain()
            rq["error"] = "client_gone"
            return Response(status=499)
        except BaseException:
            server.release(reply)
            raise
        is_openai = request.path.startswith("/v1/")

        def body():
            try:
                yield from head
                for item in itertools.chain([first], items):
                    yield from [SSE_KEEPALIVE] if item is None else chunks(*item)
                yield from tail()
            except ApiError as e:
                rq["error"] = e.code
                yield sse(e.body())
                if is_openai:
                    yield SSE_DONE
            except (ClientGone, GeneratorExit):  # GeneratorExit: the server closed us after a failed write
                rq["error"] = "client_gone"
                server.release(reply)
                reply.drain()
            finally:
                server.release(reply)
                finish_request(server, rq, rq.get("info"))

        return Response(body(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- native routes

    @app.get("/health")
    def health():
        if server.status == "ok" and server.accepting:
            return jsonify({"status": "ok", "model": server.model_name, **server.describe(),
                            "queue": {**server.stats(), "admitted": len(server._replies),
                                      "max_queue": cfg.max_queue}})
        status = server.status if server.status != "ok" else "shutting_down"
        body = {"status": status, **({"error": server.error} if server.error else {})}
        return jsonify(body), 503, {"Retry-After": "2" if status == "loading" else "60"}

    @app.get("/params")
    def params():
        ctx = server.context_length
        table = {name: dict(spec) for name, spec in PARAM_RANGES.items()}
        if ctx:
            table["max_new_tokens"]["max"] = ctx - 1
        return jsonify({"params": table, "context_length": ctx, "max_prompt_tokens": server.prompt_limit() if ctx
                        else None, "model": server.model_name, "status": server.status})

    @app.post("/generate")
    @limited
    def generate():
        body, given, names = read_body(NATIVE_FIELDS, "/generate")
        p = engine_params(given, names)
        if not p["raw"] and not body["prompt"].strip():
            raise invalid("prompt", "prompt must not be empty (an empty prompt is allowed with raw: true)")
        if body.get("context") and p["raw"]:
            raise invalid("context", "context fills the template's Input block; it cannot be used with raw: true")
        server.require_ready()
        ids = inference.encode_prompt(format_prompt(body["prompt"], body["context"]), raw=True) \
            if body.get("context") else inference.encode_prompt(body["prompt"], p["raw"])
        k = body.get("logprobs")
        stream = bool(body.get("stream"))
        reply = server.admit([ids], server.fit(ids, p, "max_new_tokens" in given, names), names, stream, logprobs=k)

        def logprobs(entries):
            return {"logprobs": native_logprobs(entries)} if k is not None else {}

        def render(choices):
            c = choices[0]
            return jsonify({"id": g.rq["request_id"], "model": server.model_name, "text": c["text"],
                            "finish_reason": c["finish_reason"], "usage": reply.usage(), "timings": reply.timings(),
                            **logprobs(c["entries"])})

        def chunks(_, out):
            if out.text or (k is not None and out.logprobs):
                yield sse({"token": out.text, **logprobs(out.logprobs)})
            if out.finish_reason is not None:
                yield sse({"done": True, "finish_reason": out.finish_reason, "usage": reply.usage(),
                           "timings": reply.timings()})

        return respond(reply, stream, render, chunks)

    # ---------------------------------------------------------------- OpenAI routes

    def openai_request(route, table):
        """An OpenAI route's body -> (fields, engine params given, client names, stream, a chunk maker, tail)."""
        body, given, names = read_body(table, route)
        names.setdefault("max_new_tokens", "max_tokens")
        stream, usage = bool(body.get("stream")), bool((body.get("stream_options") or {}).get("include_usage"))
        if "stream_options" in body and not stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true")
        obj = "text_completion" if route == "/v1/completions" else "chat.completion"
        head = {"id": ("cmpl-" if route == "/v1/completions" else "chatcmpl-") + g.rq["request_id"],
                "object": obj, "created": int(time.time()), "model": server.model_name, "system_fingerprint": None}

        def make(choices=None, usage_=None, chunk=False):
            out = {**head, "choices": choices, "usage": usage_}
            if chunk:
                out["object"] = obj if obj == "text_completion" else obj + ".chunk"
                if not usage:
                    del out["usage"]
            return out

        def tail(reply):
            if usage:
                yield sse(make([], reply.usage(), chunk=True))
            yield SSE_DONE

        return body, given, names, stream, make, tail

    @app.post("/v1/completions")
    @limited
    def completions():
        body, given, names, stream, make, tail = openai_request("/v1/completions", COMPLETION_FIELDS)
        prompts = prompt_list(body["prompt"], "prompt")
        echo, n, k = bool(body.get("echo")), body.get("n", 1), body.get("logprobs")
        p = engine_params(given, names, {"raw": True, "max_new_tokens": 16})
        server.require_ready()
        ids_list = [inference.encode_prompt(q, p["raw"]) if isinstance(q, str) else q for q in prompts]
        fitted = [server.fit(ids, p, "max_new_tokens" in given, names, "prompt" if len(prompts) == 1 else
                             f"prompt[{i}]") for i, ids in enumerate(ids_list)]
        p = min(fitted, key=lambda q: q["max_new_tokens"])  # one params dict for all the prompts
        reply = server.admit(ids_list, p, names, stream, n=n, logprobs=k, echo=echo)
        echoed = {i * n + j: decode(ids) for i, ids in enumerate(ids_list) for j in range(n)} if echo else {}

        def render(choices):
            return jsonify(make([{"text": echoed.get(i, "") + c["text"], "index": i,
                                  "logprobs": completion_logprobs(c["entries"], 0) if k is not None else None,
                                  "finish_reason": openai_finish(c["finish_reason"])}
                                 for i, c in sorted(choices.items())], reply.usage()))

        sent = {}  # choice -> characters of its tokens sent so far (text_offset)

        def chunks(index, out):
            lp = completion_logprobs(reply.entries(index, out), sent.get(index, 0)) if k is not None else None
            text = ("" if index in sent else echoed.get(index, "")) + out.text
            sent[index] = sent.get(index, 0) + sum(map(len, lp["tokens"] if lp else []))
            yield sse(make([{"text": text, "index": index, "logprobs": lp,
                             "finish_reason": openai_finish(out.finish_reason)}], chunk=True))

        return respond(reply, stream, render, chunks, tail=lambda: tail(reply))

    @app.post("/v1/chat/completions")
    @limited
    def chat_completions():
        body, given, names, stream, make, tail = openai_request("/v1/chat/completions", CHAT_FIELDS)
        if "top_logprobs" in body and not body.get("logprobs"):
            raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
        split_chat(body["messages"])  # validate before anything else
        p = engine_params(given, names)
        server.require_ready()
        explicit = "max_new_tokens" in given
        limit, min_new = server.prompt_limit(), p["max_new_tokens"] if explicit else 1
        ids = fold_chat(body["messages"], lambda n_: n_ <= limit and n_ + min_new <= server.context_length)
        n, k = body.get("n", 1), (body.get("top_logprobs", 0) if body.get("logprobs") else None)
        reply = server.admit([ids], server.fit(ids, p, explicit, names, "messages"), names, stream, n=n, logprobs=k)

        def render(choices):
            return jsonify(make([{"index": i, "message": {"role": "assistant", "content": c["text"], "refusal": None},
                                  "logprobs": chat_logprobs(c["entries"]) if k is not None else None,
                                  "finish_reason": openai_finish(c["finish_reason"])}
                                 for i, c in sorted(choices.items())], reply.usage()))

        def chunk(index, delta, finish=None, lp=None):
            return sse(make([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}], chunk=True))

        def chunks(index, out):
            lp = chat_logprobs(out.logprobs) if k is not None else None
            if out.text or (lp and lp["content"]):
                yield chunk(index, {"content": out.text}, lp=lp)
            if out.finish_reason is not None:
                yield chunk(index, {}, openai_finish(out.finish_reason))

        head = [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
        return respond(reply, stream, render, chunks, head, lambda: tail(reply))

    @app.post("/v1/embeddings")
    @limited
    def embeddings():
        body, _, _ = read_body(EMBEDDING_FIELDS, "/v1/embeddings")
        inputs = prompt_list(body["input"], "input")
        server.require_ready()
        ids_list = [inference.encode_prompt(q, raw=True) if isinstance(q, str) else q for q in inputs]
        try:
            vectors = server.embed(ids_list)
        except ParamError as e:
            raise param_error(e, {}) from None
        b64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else list(v)}
                for i, v in enumerate(vectors)]
        n_tokens = sum(len(ids) for ids in ids_list)
        server.m_tokens.labels("prompt").inc(n_tokens)
        return jsonify({"object": "list", "data": data, "model": server.model_name,
                        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @app.post("/tokenize")
    def tokenize():
        body, _, _ = read_body(TOKENIZE_FIELDS, "/tokenize")
        if ("prompt" in body) == ("messages" in body):
            raise invalid("prompt", "give exactly one of prompt (text) or messages (a chat)")
        if "messages" in body:
            system, history, instruction = split_chat(body["messages"])
            ids = inference.encode_prompt(format_prompt(instruction, chat_context(system, history)), raw=True)
        elif body.get("raw", True):
            ids = encode(body["prompt"])
        else:
            ids = inference.encode_prompt(body["prompt"])
        out = {"count": len(ids), "max_model_len": server.context_length, "tokens": ids}
        if body.get("return_token_strs"):
            out["token_strs"] = [token_str(t) for t in ids]
        return jsonify(out)

    @app.post("/detokenize")
    def detokenize():
        body, _, _ = read_body(DETOKENIZE_FIELDS, "/detokenize")
        if not isinstance(body["tokens"], list):
            raise invalid("tokens", f"tokens must be a list of token ids, got {short(body['tokens'])}")
        ids = check_ids(body["tokens"], "tokens") if body["tokens"] else []
        return jsonify({"prompt": decode(ids)})

    @app.get("/v1/models")
    def models():
        return jsonify({"object": "list", "data": [model_card(server)]})

    @app.get("/v1/models/<path:model_id>")
    def model(model_id):
        if model_id != server.model_name:
            raise ApiError(404, "not_found", f"model {model_id!r} not found; this server has {server.model_name!r}",
                           "model", "model_not_found")
        return jsonify(model_card(server))

    @app.get("/metrics")
    def metrics():
        return Response(prom.generate_latest(server.registry), mimetype="text/plain",
                        headers={"Content-Type": prom.CONTENT_TYPE_LATEST})

    @app.get("/openapi.json")
    def openapi():
        return jsonify(openapi_document(server))

    # ---------------------------------------------------------------- the page

    class StaticFile(PathConverter):
        """Matches only files that exist in the static folder, so /<file> never shadows a 404/405."""

        def to_python(self, value):
            path = safe_join(cfg.static_dir, value)
            if path is None or not os.path.isfile(path):
                raise ValidationError()
            return value

    app.url_map.converters["staticfile"] = StaticFile

    @app.get("/")
    def index():
        if os.path.isfile(os.path.join(cfg.static_dir, "index.html")):
            return send_from_directory(cfg.static_dir, "index.html")
        return Response("<!doctype html><meta charset=utf-8><title>gpt2-instruct</title><p>gpt2-instruct server "
                        "(no chat page installed). API: <code>POST /generate</code>, <code>POST /v1/chat/completions"
                        "</code>, <code>GET /openapi.json</code>.</p>", mimetype="text/html")

    @app.get("/static/<path:filename>", endpoint="static_file")
    # every method, so that a POST to a path that is no file is a 404, not a 405 (werkzeug checks the
    # method before the converter)
    @app.route("/<staticfile:filename>", endpoint="static_root", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def static_files(filename):
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(valid_methods=["GET", "HEAD"])
        try:
            return send_from_directory(cfg.static_dir, filename)
        except NotFound:
            raise ApiError(404, "not_found", f"no such route or file: /{filename}") from None

    if cfg.cors_origins:
        CORS(app, origins=cfg.cors_origins, methods=["GET", "POST", "OPTIONS"],
             allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
             expose_headers=["X-Request-ID", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                             "X-RateLimit-Reset"], max_age=600)
    return app


def model_card(server):
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "gpt2-instruct",
            "context_length": server.context_length}


def finish_request(server, rq, info):
    """One log line and the request metrics, once, when the response is done (streams included)."""
    if info is None or rq["logged"]:
        return
    rq["logged"] = True
    if rq["reply"] is not None:
        server.release(rq["reply"])
    latency = time.perf_counter() - rq["t0"]
    server.m_requests.labels(info["endpoint"], str(info["status"])).inc()
    server.m_latency.labels(info["endpoint"]).observe(latency)
    reply = rq["reply"]
    line = {"event": "request", "request_id": rq["request_id"], **{k: v for k, v in info.items() if k != "quiet"},
            "stream": rq["stream"], "latency_ms": round(latency * 1e3, 2), "pid": os.getpid()}
    if reply is not None:
        line.update(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                    finish_reason=",".join(sorted(set(reply.finish_reasons.values()))) or None)
    if rq["error"]:
        line["error"] = rq["error"]
    log.log(logging.DEBUG if info["quiet"] else logging.INFO, line)


# ============================================================================ OpenAPI


def openapi_document(server):
    """OpenAPI 3.1 for every route, the request bodies built from the route tables and PARAM_RANGES."""

    def body_schema(table):
        props = {}
        for name, spec in table.items():
            schema = param_schema(spec["param"]) if spec["param"] else dict(spec["schema"])
            props[name] = {"anyOf": [schema, {"type": "null"}]} if not spec.get("required") else schema
        return {"type": "object", "properties": props, "additionalProperties": False,
                "required": [n for n, s in table.items() if s.get("required")]}

    error = {"$ref": "#/components/schemas/Error"}
    errors = {str(code): {"description": HTTP_TYPES.get(code, "error"), "content": {"application/json": {"schema": error}}}
              for code in (400, 401, 404, 405, 408, 413, 415, 429, 503)}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    ok_stream = {"description": "OK (JSON, or Server-Sent Events with stream: true)",
                 "content": {"application/json": {"schema": {"type": "object"}},
                             "text/event-stream": {"schema": {"type": "string"}}}}

    def post(summary, table, ok=ok_json):
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": body_schema(table)}}}, "responses": {"200": ok, **errors}}}

    def get(summary, ok=ok_json):
        return {"get": {"summary": summary, "responses": {"200": ok, **errors}}}

    model_param = [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "gpt2-instruct", "version": "1", "description": (
            "Native and OpenAI-compatible generation. Logprobs are the model's raw log-probabilities (before "
            "temperature, top-k, top-p and penalties). With n > 1, choice i samples with seed + i when seed is given.")},
        "paths": {
            "/health": get("Readiness: 200 when the model is loaded, 503 while loading or shutting down"),
            "/params": get("Generation parameters: type, range, default; context length"),
            "/generate": post("Native generation (instruction template unless raw)", NATIVE_FIELDS, ok_stream),
            "/v1/completions": post("OpenAI text completion", COMPLETION_FIELDS, ok_stream),
            "/v1/chat/completions": post("OpenAI chat completion", CHAT_FIELDS, ok_stream),
            "/v1/embeddings": post("Mean-pooled, L2-normalised final hidden states", EMBEDDING_FIELDS),
            "/tokenize": post("Text or chat -> token ids", TOKENIZE_FIELDS),
            "/detokenize": post("Token ids -> text", DETOKENIZE_FIELDS),
            "/v1/models": get("The served model"),
            "/v1/models/{model_id}": {"get": {"summary": "One model", "parameters": model_param,
                                              "responses": {"200": ok_json, **errors}}},
            "/metrics": get("Prometheus metrics", {"description": "OK", "content": {"text/plain": {
                "schema": {"type": "string"}}}}),
            "/openapi.json": get("This document"),
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["type", "message"], "properties": {
                "type": {"type": "string"}, "message": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}},
    }


# ============================================================================ logging and the CLI


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (gunicorn and pytest swap it); JSON or text lines."""

    json_lines = True

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    def format(self, record):
        msg = record.msg if isinstance(record.msg, dict) else record.getMessage()
        if record.exc_info:  # unexpected errors keep their traceback
            msg = f"{msg}\n{logging.Formatter().formatException(record.exc_info)}" if isinstance(msg, str) else msg
        if self.json_lines:
            return json.dumps(msg if isinstance(msg, dict) else {"event": "log", "level": record.levelname.lower(),
                                                                  "message": msg})
        if isinstance(msg, dict):
            msg = " ".join(f"{k}={v}" for k, v in msg.items() if v is not None and k != "event")
        return f"{time.strftime('%H:%M:%S')} {record.levelname.lower()} {msg}"


def setup_logging(level, fmt="auto"):
    """One handler on the 'gpt2i.serve' logger, however many apps are created."""
    log.setLevel(getattr(logging, level.upper()))
    log.propagate = False
    handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        log.addHandler(handler)
    handler.json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # our own line per request replaces its access log


class _Handler(WSGIRequestHandler):
    """HTTP/1.0 (one request per connection), a read timeout, no access log of its own."""

    protocol_version = "HTTP/1.0"

    def setup(self):
        self.timeout = self.server.read_timeout
        super().setup()

    def log_request(self, *args):
        pass

    def log(self, type, message, *args):
        log.debug(message % args if args else message)


class PooledServer(BaseWSGIServer):
    """werkzeug's server with a fixed pool of request threads (connections past it wait their turn)."""

    multithread = True

    def __init__(self, host, port, app, threads, read_timeout):
        self.read_timeout = read_timeout
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:  # bound here: werkzeug would print its own message and exit 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            super().__init__(host, port, app, handler=_Handler, fd=sock.fileno())
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        finally:
            sock.close()  # werkzeug holds a duplicate
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gpt2i-http")

    def process_request(self, request, client_address):
        self.pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)


def build_parser():
    parser = argparse.ArgumentParser(
        description="Serve a gpt2-instruct model: POST /generate, OpenAI-compatible /v1/*, the chat page at /. "
                    "Every flag can also be set by an environment variable (shown); the flag wins.",
        epilog='production: GPT2I_CKPT=PATH gunicorn -c gunicorn.conf.py "serve:create_app()"')
    for name, (default, _, help_) in OPTIONS.items():
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
                            help=f"{help_} [env {env_name(name)}; default: {shown if shown else 'none'}]")
    parser.error = refuse  # a bad flag is one line and exit 2, as every other user mistake
    return parser


def refuse(message):
    raise UserError(message)


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = make_config({k: v for k, v in vars(args).items() if v is not None}, environ=os.environ)
    httpd = PooledServer(cfg.host, cfg.port, None, cfg.threads, cfg.read_timeout)
    app = create_app(cfg)
    httpd.app = app
    server = state(app)

    def stop(signum, frame):
        def shut():
            server.close(cfg.graceful_timeout)
            httpd.shutdown()

        threading.Thread(target=shut, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info({"event": "listening", "url": f"http://{cfg.host}:{httpd.port}", "model": cfg.ckpt,
              "note": "the model loads in the background; GET /health says when it is ready"})
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        httpd.pool.shutdown(wait=False, cancel_futures=True)
        server.close()
    return 0


if __name__ == "__main__":
    run_cli(main)
