"""Serve a gpt2-instruct model over HTTP: a native API, an OpenAI-compatible API and the chat page (server/).

    python serve.py --ckpt out/demo/sft                      # http://127.0.0.1:5000
    GPT2I_CKPT=out/demo/sft gunicorn -c gunicorn.conf.py "serve:create_app()"   # production
"""

import errno
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from common import UserError, freeze_heap, run_cli
from server.options import build_parser

if __name__ == "__main__":
    # the flags first: --help and a mistyped flag answer before torch's 2 s import (below)
    run_cli(lambda argv: build_parser().parse_args(argv))

from server.app import create_app, state  # noqa: E402
from server.config import make_config  # noqa: E402
from server.respond import log  # noqa: E402


class _Handler(WSGIRequestHandler):
    """HTTP/1.0 (one request per connection), a read timeout, no access log of its own."""

    protocol_version = "HTTP/1.0"
    timeout = 30  # seconds a connection may stay silent while sending its request (socketserver applies it)

    def log_request(self, *args):
        pass

    def log(self, type, message, *args):
        log.debug(message % args if args else message)


class PooledServer(ThreadedWSGIServer):
    """The server `python serve.py` runs: werkzeug's, with a fixed pool of request threads (connections past
    it wait their turn) and a read timeout. gunicorn, with gunicorn.conf.py, is the production server."""

    def __init__(self, host, port, app, threads):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:  # bound here: werkzeug would print its own message and exit 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            super().__init__(host, port, app, handler=_Handler, fd=sock.fileno())
        except OSError as e:
            fix = "; pick a free one with --port (0: any free port)" if e.errno == errno.EADDRINUSE else ""
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{fix}") from None
        finally:
            sock.close()  # werkzeug holds a duplicate
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="gpt2i-http")

    def process_request(self, request, client_address):
        self.pool.submit(self.process_request_thread, request, client_address)  # socketserver's thread body


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = make_config({k: v for k, v in vars(args).items() if v is not None}, environ=os.environ)
    httpd = PooledServer(cfg.host, cfg.port, None, cfg.threads)
    httpd.app = create_app(cfg)
    freeze_heap()
    server, failed = state(httpd.app), []

    def stop(signum=None, frame=None):
        def shut():
            server.close(cfg.graceful_timeout)
            httpd.shutdown()

        threading.Thread(target=shut, daemon=True).start()

    def watch_load():  # a model that cannot load ends the server: one line, exit 2
        try:
            server.wait_ready()
        except UserError as e:
            failed.append(e)
            stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threading.Thread(target=watch_load, daemon=True).start()
    log.info({"event": "listening", "url": f"http://{cfg.host}:{httpd.port}", "model": cfg.ckpt,
              "note": "the model loads in the background; GET /health says when it is ready"})
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        httpd.pool.shutdown(wait=False, cancel_futures=True)
        server.close()
    if failed:
        raise failed[0]
    return 0


if __name__ == "__main__":
    run_cli(main)
