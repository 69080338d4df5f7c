"""gunicorn settings for serve.py:  gunicorn -c gunicorn.conf.py "serve:create_app()"

The app itself is configured by GPT2I_* environment variables (see serve.py's docstring);
these ones shape the gunicorn process:

| variable | default | meaning |
|---|---|---|
| GPT2I_BIND | GPT2I_HOST:GPT2I_PORT (127.0.0.1:5000) | address(es) to bind, comma-separated |
| GPT2I_WORKERS | 1 | worker processes; each loads its own model and engine (one per GPU, or a few on CPU) |
| GPT2I_THREADS | 32 | threads per worker: the most requests a worker handles at once (streams hold one each) |
| GPT2I_TIMEOUT | 120 | seconds a silent worker may stall before the master restarts it |
| GPT2I_GRACEFUL_TIMEOUT | 120 | seconds running requests (streams) get to finish on reload/shutdown |
| GPT2I_KEEPALIVE | 5 | seconds an idle keep-alive connection stays open |

With more than one worker, set GPT2I_RATE_LIMIT_STORAGE=redis://host:port so the workers
share one rate-limit budget (memory:// counts per worker).
"""

import os


def _env_int(name, default):
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"error: {name} must be an integer, got {value!r}") from None


bind = [b.strip() for b in os.environ.get(
    "GPT2I_BIND", f"{os.environ.get('GPT2I_HOST', '127.0.0.1')}:{os.environ.get('GPT2I_PORT', '5000')}"
).split(",") if b.strip()]
workers = _env_int("GPT2I_WORKERS", 1)
# gthread: a thread per connection, so a long SSE stream ties up one thread, not a whole worker;
# the worker's main loop keeps heart-beating while requests stream, so `timeout` does not cut streams.
worker_class = "gthread"
threads = _env_int("GPT2I_THREADS", 32)
timeout = _env_int("GPT2I_TIMEOUT", 120)
graceful_timeout = _env_int("GPT2I_GRACEFUL_TIMEOUT", 120)
keepalive = _env_int("GPT2I_KEEPALIVE", 5)
# Each worker builds its own app (and loads the model in its own background thread): a model
# loaded before fork would share a CUDA context across processes, which does not work.
preload_app = False
# serve.py writes one JSON line per request itself; gunicorn's access log would duplicate it.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("GPT2I_LOG_LEVEL", "info").lower()
# X-Forwarded-For is handled by the app (GPT2I_TRUST_PROXY), not by gunicorn.
forwarded_allow_ips = os.environ.get("GPT2I_FORWARDED_ALLOW_IPS", "127.0.0.1,::1")
