"""The server's configuration (options <- GPT2I_* environment <- flags, checked before anything binds)
and its error model: every error is {"error": {"type", "message", "param", "code"}}."""

import ipaddress
import math
import os
import reprlib
import select
import socket
import types

import torch
from limits import parse_many

from common import UserError
from device import DTYPES, pick_device
from model import PRETRAINED_CONFIGS
from server.options import OPTIONS, env_name

CHOICES = {"dtype": ("auto", *DTYPES), "quantize": ("none", "int8"), "log_level": ("debug", "info", "warning", "error")}
short = reprlib.repr  # a value as a message shows it: bounded in length and depth, whatever a client nests
SHUTTING_DOWN = "the server is shutting down; retry on another instance or shortly"
HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found",
              405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large",
              415: "unsupported_media_type", 429: "rate_limit_exceeded", 503: "overloaded"}


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
                        f"or one of {', '.join(PRETRAINED_CONFIGS)}); make one with make demo (out/demo/sft) or "
                        f"python finetune_dolly.py (out/dolly)")
    for name, allowed in CHOICES.items():
        if str(value := getattr(cfg, name)).lower() not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    ones = ("max_queue", "max_batch", "prefill_chunk", "max_body_bytes", "threads", "max_prompt_tokens")
    lowest = {"port": 0, "trust_proxy": 0, "graceful_timeout": 0, "prefix_cache_mb": 0, **dict.fromkeys(ones, 1)}
    for name, lo in lowest.items():
        value = getattr(cfg, name)
        if value is not None and not lo <= value <= (65535 if name == "port" else math.inf):
            raise UserError(f"--{name.replace('_', '-')} must be >= {lo}{' and <= 65535' * (name == 'port')}, "
                            f"got {value}")
    for name in ("rate_limit", "auth_rate_limit"):
        if limit_enabled(getattr(cfg, name)):
            try:
                parse_many(getattr(cfg, name))
            except ValueError:
                raise UserError(f"invalid --{name.replace('_', '-')} {getattr(cfg, name)!r}: use flask-limiter "
                                f'syntax such as "30/minute;5/second", or "none"') from None
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


def limit_enabled(limit):
    return bool(limit) and limit.strip().lower() not in ("none", "off", "0")


def is_loopback(address):
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


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
