"""The server's options: each is a flag (--max-queue) and an environment variable (GPT2I_MAX_QUEUE).
argparse only (no torch), so `python serve.py --help` and a mistyped flag answer at once."""

import os

from cli import CLIParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (default, type, help)
OPTIONS = {
    "ckpt": (None, str, "checkpoint file or folder, HF GPT-2 folder, or OpenAI GPT-2 name (gpt2, gpt2-medium, ...)"),
    "host": ("127.0.0.1", str, "address to bind (python serve.py)"),
    "port": (5000, int, "port to bind (python serve.py; 0: any free port)"),
    "model_name": ("gpt2-instruct", str, "model id shown in /health, /v1/models and replies"),
    "allowed_hosts": ([], list, "comma-separated Host names accepted (* = any); default: localhost, 127.0.0.1, "
                                "[::1] and --host"),
    "api_key": (None, str, "require Authorization: Bearer KEY (all but /health, /params, /openapi.json, the page); "
                           "failed attempts are limited to --auth-rate-limit per client"),
    "rate_limit": ("30/minute;5/second", str, "per-client limit on generation routes, flask-limiter syntax; "
                                              'loopback clients are exempt; "none" = off'),
    "auth_rate_limit": ("10/minute", str, "failed API-key attempts allowed per client (every client)"),
    "rate_limit_storage": ("memory://", str, "memory:// (one process) or redis://host:port (shared by gunicorn "
                                             "workers)"),
    "trust_proxy": (0, int, "number of reverse proxies in front whose X-Forwarded-For is trusted (0: ignore it)"),
    "cors_origins": ([], list, "comma-separated origins allowed cross-origin (or *); none by default"),
    "max_queue": (64, int, "generations admitted at once (each prompt x n counts; running + waiting); more get "
                           "503 + Retry-After"),
    "max_batch": (32, int, "sequences the engine decodes together (KV-cache slots)"),
    "prefill_chunk": (None, int, "prompt and embedding tokens computed per engine step: running streams stall at "
                                 "most this long (default: 8192 on CUDA, 512 elsewhere)"),
    "prefix_cache": (True, bool, "reuse the KV-cache of prompt prefixes seen before (1/0)"),
    "prefix_cache_mb": (None, int, "prefix cache pool in MiB, allocated at start (default: as large as the KV-cache)"),
    "max_body_bytes": (1 << 20, int, "largest request body in bytes (413 past it)"),
    "max_prompt_tokens": (None, int, "longest prompt in tokens (default: the model's context - 1)"),
    "device": ("auto", str, "auto, cpu, cuda, cuda:N, mps"),
    "dtype": ("auto", str, "auto (bf16 on capable GPUs, else fp32), float32, bfloat16, float16"),
    "quantize": ("none", str, "none, or int8 (CPU, float32)"),
    "compile": (False, bool, "torch.compile the decode step (CUDA; slower start, faster decoding) (1/0)"),
    "threads": (32, int, "python serve.py: most connections served at once (the rest wait their turn)"),
    "graceful_timeout": (30.0, float, "python serve.py: seconds running streams get to finish on SIGTERM"),
    "static_dir": (os.path.join(ROOT, "static"), str, "folder with the chat page, served at /"),
    "log_level": ("info", str, "debug, info, warning, error (requests to /health and static files: debug)"),
}


def env_name(name):
    return "GPT2I_" + name.upper()


def build_parser():
    parser = CLIParser(  # a mistake is one line and exit 2 (run_cli)
        description="Serve a gpt2-instruct model: POST /generate, OpenAI-compatible /v1/*, the chat page at /. "
                    "Every flag can also be set by an environment variable (shown); the flag wins.",
        epilog='production: GPT2I_CKPT=PATH gunicorn -c gunicorn.conf.py "serve:create_app()"')
    for name, (default, _, help_) in OPTIONS.items():
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
                            help=f"{help_} [env {env_name(name)}; default: {shown if shown else 'none'}]")
    return parser
