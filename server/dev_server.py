"""The server `python serve.py` runs: werkzeug's, with a fixed pool of request threads and a read
timeout (gunicorn, with gunicorn.conf.py, is the production server)."""

import errno
import socket
from concurrent.futures import ThreadPoolExecutor

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler

from common import UserError
from server.respond import log


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
            fix = "; pick a free one with --port (0: any free port)" if e.errno == errno.EADDRINUSE else ""
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}{fix}") from None
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
