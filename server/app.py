"""The Flask app around an engine client: its hooks, error model and logging (docs/design.md "HTTP API")."""

import functools
import hmac
import json
import logging
import os
import re
import sys
import time
import types
import uuid

import orjson
from flask import Flask, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from flask_cors import CORS
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits import parse_many
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import PathConverter, ValidationError
from werkzeug.security import safe_join

from engine.sampling_params import ParamError
from grammar import ConstraintError
from server.routes import native, openai
from server.config import (HTTP_TYPES, ApiError, allowed_hosts, host_name, invalid, is_loopback, limit_enabled,
                           make_config)
from server.engine_client import EngineClient
from server.respond import finish_request, log

QUIET_ENDPOINTS = {"native." + name for name in ("health", "index", "static_root")}  # debug level
OPEN_ENDPOINTS = QUIET_ENDPOINTS | {"native.params", "native.openapi"}  # no API key needed
GENERATION = ("native.generate", "openai.completions", "openai.chat_completions", "openai.embeddings",
              "openai.responses")
SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class FastJSON(DefaultJSONProvider):
    """jsonify through orjson: a 500-token echo's logprobs encode in 0.06 ms instead of 1.3 ms (the stdlib's
    float repr), a fifth of the HTTP worker's time on a loglikelihood request. What orjson refuses (a lone
    surrogate, an int past 64 bits, a type it does not know) goes through the stdlib as before."""

    sort_keys = False

    def response(self, *args, **kwargs):
        obj = self._prepare_response_obj(args, kwargs)
        try:
            return self._app.response_class(orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE), mimetype=self.mimetype)
        except orjson.JSONEncodeError:
            return super().response(obj)


def create_app(config=None):
    """The Flask app. config: None (read GPT2I_* environment variables), a dict of options, or a
    make_config result. The model starts loading in the background; serve.state(app) is its EngineClient."""
    if not isinstance(config, types.SimpleNamespace):
        config = make_config(config, environ=os.environ if config is None else None)
    setup_logging(config.log_level)
    client = EngineClient(config)
    app = build_app(client)
    client.start()
    return app


def state(app):
    """The EngineClient behind an app from create_app."""
    return app.extensions["gpt2i"]


def build_app(client):
    cfg = client.config
    app = Flask(__name__, static_folder=None)
    app.config.update(MAX_CONTENT_LENGTH=cfg.max_body_bytes, STATIC_DIR=cfg.static_dir)
    app.json = FastJSON(app)
    app.extensions["gpt2i"] = client
    if cfg.trust_proxy > 0:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=cfg.trust_proxy)

    class StaticFile(PathConverter):
        """Matches only files that exist in the static folder, so /<file> never shadows a 404/405."""

        def to_python(self, value):
            path = safe_join(cfg.static_dir, value)
            if path is None or not os.path.isfile(path):
                raise ValidationError()
            return value

    app.url_map.converters["staticfile"] = StaticFile
    app.register_blueprint(native)
    app.register_blueprint(openai)
    limiter = Limiter(get_remote_address, default_limits=[], headers_enabled=True, key_prefix="gpt2i",
                      storage_uri=cfg.rate_limit_storage, in_memory_fallback_enabled=True)
    install_hooks(app, client)
    install_auth(app, cfg, limiter)
    install_limits(app, cfg, limiter)
    install_errors(app, cfg)
    if cfg.cors_origins:
        CORS(app, origins=cfg.cors_origins, methods=["GET", "POST", "OPTIONS"],
             allow_headers=["Content-Type", "Authorization", "X-Request-ID"],
             expose_headers=["X-Request-ID", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                             "X-RateLimit-Reset"], max_age=600)
    return app


def install_hooks(app, client):
    """A request id and the Host check first; security headers, the log line and metrics at the end."""
    hosts = allowed_hosts(client.config)

    @app.before_request
    def begin():
        rid = request.headers.get("X-Request-ID", "")
        g.rq = {"request_id": rid if SAFE_REQUEST_ID.match(rid) else uuid.uuid4().hex, "t0": time.perf_counter(),
                "reply": None, "error": None, "stream": False, "logged": False}
        if hosts is not None and host_name(request.host) not in hosts:
            raise invalid(None, f"Host {request.host!r} is not allowed here (see --allowed-hosts)", "invalid_host")

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
        response.call_on_close(lambda: finish_request(rq, info, client))
        if rq["stream"]:
            rq["info"] = info
        return response


def install_limits(app, cfg, limiter):
    """Per-client limits on the generation routes, shared between them; loopback clients are exempt.
    Installed after `end` above, so that flask-limiter's after_request (which adds Retry-After) runs first."""
    limiter.init_app(app)
    if limit_enabled(cfg.rate_limit):
        limit = limiter.shared_limit(cfg.rate_limit, scope="generation", methods=["POST"])
        for endpoint in GENERATION:
            app.view_functions[endpoint] = remote_only(app.view_functions[endpoint], limit)


def remote_only(view, limit):
    """The view with the limit applied to remote clients only: a loopback request skips flask-limiter
    altogether (its exempt_when still cost a tenth of the HTTP worker's CPU on a loglikelihood request)."""
    limited = limit(view)

    @functools.wraps(view)
    def route(*args, **kwargs):
        return (view if is_loopback(request.remote_addr) else limited)(*args, **kwargs)

    return route


def install_auth(app, cfg, limiter):
    """With --api-key, every route but the open ones needs it; a client's failed attempts are limited
    (--auth-rate-limit, loopback included) in the rate limiter's storage. Checked before the rate limit."""
    if not cfg.api_key:
        return
    limits = parse_many(cfg.auth_rate_limit) if limit_enabled(cfg.auth_rate_limit) else []

    @app.before_request
    def authenticate():
        if request.method == "OPTIONS" or request.endpoint in OPEN_ENDPOINTS or request.routing_exception is not None:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), cfg.api_key.encode()):
            return
        if not all(limiter.limiter.hit(item, "gpt2i-auth", request.remote_addr or "") for item in limits):
            raise ApiError(429, "rate_limit_exceeded", "too many failed API-key attempts from this client; retry "
                           "after Retry-After seconds", code="auth_rate_limited",
                           headers={"Retry-After": str(max(item.get_expiry() for item in limits))})
        raise ApiError(401, "authentication_error", "missing or invalid API key: send Authorization: "
                       "Bearer <key>", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def install_errors(app, cfg):
    """Every error as {"error": {...}}: ours (ApiError), werkzeug's and flask-limiter's, and a 500 for the rest."""

    def error_response(e):
        if g.get("rq") is not None:
            g.rq["error"] = e.code
        return jsonify(e.body()), e.status, e.headers

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
    # the edge's checks raise these in the client's words: a 400 naming the field
    app.register_error_handler(ParamError, lambda e: error_response(invalid(e.param, str(e))))
    app.register_error_handler(ConstraintError, lambda e: error_response(invalid(e.field, str(e))))

    @app.errorhandler(Exception)
    def unexpected(e):
        log.exception("unhandled error")
        rid = g.rq["request_id"] if g.get("rq") else "?"
        return error_response(ApiError(500, "server_error", f"internal server error (request id {rid})"))


class _StderrHandler(logging.StreamHandler):
    """JSON lines (text lines on a terminal) to whatever sys.stderr is at the time (gunicorn and pytest swap it)."""

    stream = property(lambda self: sys.stderr, lambda self, _: None)  # StreamHandler writes and flushes it

    def format(self, record):
        msg = record.msg if isinstance(record.msg, dict) else record.getMessage()
        if record.exc_info:  # unexpected errors keep their traceback
            msg = f"{msg}\n{logging.Formatter().formatException(record.exc_info)}" if isinstance(msg, str) else msg
        if not sys.stderr.isatty():
            return json.dumps(msg if isinstance(msg, dict) else {"event": "log", "level": record.levelname.lower(),
                                                                  "message": msg})
        if isinstance(msg, dict):
            msg = " ".join(f"{k}={v}" for k, v in msg.items() if v is not None and k != "event")
        return f"{time.strftime('%H:%M:%S')} {record.levelname.lower()} {msg}"


def setup_logging(level):
    """One handler on the 'gpt2i.serve' logger, however many apps are created."""
    log.setLevel(getattr(logging, level.upper()))
    log.propagate = False
    if not log.handlers:
        log.addHandler(_StderrHandler())
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # our own line per request replaces its access log
