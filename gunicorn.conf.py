"""gunicorn settings for serve.py: gunicorn -c gunicorn.conf.py "serve:create_app()". What it reads (GPT2I_BIND,
GPT2I_WORKERS, GPT2I_THREADS, GPT2I_NGINX_LISTEN, GPT2I_RUN_DIR) and how the stack runs: README "Production"."""

import ctypes
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch  # noqa: F401  here in the master: a (re)started worker forks with it loaded


def _env_int(name, default):
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else default
    except ValueError:
        raise SystemExit(f"error: {name} must be an integer, got {value!r}") from None


NGINX_LISTEN = os.environ.get("GPT2I_NGINX_LISTEN", "").strip()
RUN_DIR = os.path.abspath(os.environ.get("GPT2I_RUN_DIR", "out/prod"))
NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/local/sbin")

LOCAL = f"{os.environ.get('GPT2I_HOST', '127.0.0.1')}:{os.environ.get('GPT2I_PORT', '5000')}"
bind = ([f"unix:{RUN_DIR}/gunicorn.sock"] if NGINX_LISTEN
        else [b.strip() for b in os.environ.get("GPT2I_BIND", LOCAL).split(",") if b.strip()])
workers = _env_int("GPT2I_WORKERS", 1)
# gthread: a long SSE stream ties up one thread, not a worker, and the worker's main loop keeps
# heart-beating meanwhile, so `timeout` does not cut streams
worker_class = "gthread"
threads = _env_int("GPT2I_THREADS", 32)
preload_app = False  # each worker loads its own model: a CUDA context does not survive fork; a reload runs new code
loglevel = os.environ.get("GPT2I_LOG_LEVEL", "info").lower()
control_socket_disable = True  # gunicorn's control socket (in ~/.gunicorn, shared by the user's instances)
graceful_timeout = 30  # seconds streams get to finish on reload or stop; then an error event ends them
STOP_MARGIN = 5  # of those, seconds kept for ending streams and leaving the engine before SIGKILL
# the engine process (server/engine_worker.py main): one model for every worker, configured by the same
# GPT2I_* variables; it listens on GPT2I_ENGINE_SOCKET
ENGINE = [sys.executable, "-c", "import cli, server.engine_worker as e; cli.run_cli(e.main)"]


def post_worker_init(worker):
    """Accept connections only once this worker is connected to the engine (requests meanwhile wait in the
    listen backlog, not on a 503 loading); on a reload the old workers serve until then."""
    state = worker.wsgi.extensions["gpt2i"]  # serve.state(app): the master never imports serve (a reload runs new code)
    # the worker's graceful window ends before the master's SIGKILL, leaving time to close() its streams
    worker.cfg.set("graceful_timeout", max(worker.cfg.graceful_timeout - STOP_MARGIN, 0))
    while not state.wait_ready(timeout=1.0):
        worker.notify()  # a long load is not a hung worker
    gc.collect()  # common.freeze_heap (the master imports no project module): out of the collector's full passes
    gc.freeze()
    if worker.age in getattr(worker.cfg, "reload_ages", ()):  # a reload's new worker, connected (on_reload)
        os.kill(worker.ppid, signal.SIGTTOU)  # the master stops the oldest worker


def on_reload(server):
    """SIGHUP: a new engine loads the model (and new code) beside the old one, and new workers start beside
    the old ones, which serve until each new worker has connected to the new engine and asked the master
    (SIGTTOU) to stop the oldest: no request waits on a load. The old engine exits after its workers."""
    server.cfg.reload_ages = range(server.worker_age + 1, server.worker_age + server.cfg.workers + 1)
    server.num_workers = server.cfg.workers + len(server.WORKERS)  # so the spawn kills no old worker
    old = server.engines[os.environ["GPT2I_ENGINE_SOCKET"]]
    start_engine(server)
    old.send_signal(signal.SIGUSR1)


def start_engine(server):
    """A new engine generation, listening on its own socket: the workers forked from now on connect to it
    (GPT2I_ENGINE_SOCKET). Started here, in the master's main thread, not between two of its forks."""
    if not hasattr(server, "engines"):
        server.engine_dir, server.engines = tempfile.mkdtemp(prefix="gpt2i-"), {}
    path = os.path.join(server.engine_dir, f"engine{len(server.engines)}.sock")
    os.environ["GPT2I_ENGINE_SOCKET"] = path
    server.engines[path] = _engine_process()
    threading.Thread(target=_keep_engine, args=(server, path), name="gpt2i-engine", daemon=True).start()


def _keep_engine(server, path):
    """In the master, a thread per engine generation: a new process each time it dies while it is the newest
    generation; or gunicorn's exit when it never listened."""
    while True:
        while server.engines[path].poll() is None:  # 0 when the arbiter reaped it first
            time.sleep(0.1)
        if getattr(server, "stopping", False) or os.environ["GPT2I_ENGINE_SOCKET"] != path:
            return  # stopped, or retired by a reload once its workers had gone
        if not os.path.exists(path):
            _failed(server)
        server.log.error("the engine process (pid %s) exited; starting a new one", server.engines[path].pid)
        os.unlink(path)
        server.engines[path] = _engine_process()


def _failed(server):
    """An engine process exited before it listened, having printed why in one line: gunicorn stops, exit 2."""
    server.kill_workers(signal.SIGKILL)
    on_exit(server)
    os._exit(2)


def _engine_process():  # in gunicorn's working folder, as the workers: the project, a relative GPT2I_CKPT
    return subprocess.Popen(ENGINE, preexec_fn=_die_with_parent)


def worker_int(worker):
    """Ctrl+C or a quick stop (SIGINT, SIGQUIT), and every exit (worker_exit): stop admission, end running
    streams with an error event, close the connection to the engine (which cancels what is left)."""
    app = getattr(worker, "wsgi", None)
    if app is not None:
        app.extensions["gpt2i"].close(0)  # the graceful time is up, or this is a quick stop


def worker_exit(server, worker):
    worker_int(worker)  # after SIGTERM (reload, stop), once the graceful time is up
    if worker.booted:
        # skip the interpreter's teardown: under load it can outlast the master's wait, and torch's threads
        # used to abort there. A worker that failed to boot keeps its exit status (the master stops on it).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def on_starting(server):
    """Before gunicorn binds: nginx is installed, and the run folder holds nginx.conf filled in for this run."""
    if not NGINX_LISTEN:
        return
    if NGINX is None:
        print("error: nginx is not installed (apt-get install nginx)", file=sys.stderr)
        raise SystemExit(2)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        os.makedirs(os.path.join(RUN_DIR, "tmp", sub), exist_ok=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "nginx.conf")) as f:
        text = f.read()
    fields = {"LISTEN": NGINX_LISTEN, "RUN_DIR": RUN_DIR, "UPSTREAM": f"unix:{RUN_DIR}/gunicorn.sock",
              "STATIC_DIR": os.path.abspath(os.environ.get("GPT2I_STATIC_DIR", "static"))}
    for key, value in fields.items():
        text = text.replace(f"@{key}@", value)
    with open(os.path.join(RUN_DIR, "nginx.conf.tmp"), "w") as f:
        f.write(text)
    os.replace(os.path.join(RUN_DIR, "nginx.conf.tmp"), os.path.join(RUN_DIR, "nginx.conf"))


def _die_with_parent():
    """In nginx's or the engine's process before it starts: SIGTERM when gunicorn's master dies (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def when_ready(server):
    """gunicorn's socket is bound: start the engine process, and nginx in front of gunicorn; both are children
    of this master."""
    start_engine(server)
    engine = server.engines[path := os.environ["GPT2I_ENGINE_SOCKET"]]
    while not os.path.exists(path):  # the workers fork once it listens
        if engine.poll() is not None:  # it said why (its configuration, its model): before any worker boots
            _failed(server)
        if not server.SIG_QUEUE.empty() and engine.poll() is None:
            break  # Ctrl+C, SIGTERM: handled at once, not after the load
        time.sleep(0.05)
    if not NGINX_LISTEN:
        return
    conf, pid_file = os.path.join(RUN_DIR, "nginx.conf"), os.path.join(RUN_DIR, "nginx.pid")  # conf: on_starting
    if os.path.exists(pid_file):
        os.remove(pid_file)  # left by a run that was killed; nginx writes it once it listens
    # -e: errors before the config is read go to stderr too, not to a system log file it may not open;
    # as root, nginx would hand its workers to "nobody", who cannot write the temp folders.
    cmd = [NGINX, "-e", "stderr", "-p", RUN_DIR, "-c", conf] + (["-g", "user root;"] if os.geteuid() == 0 else [])
    # its own process group: a Ctrl+C reaches gunicorn, which ends its streams before it stops nginx;
    # and nginx ends with gunicorn's master, even one killed by SIGKILL
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_die_with_parent)
    while not os.path.exists(pid_file):  # written once nginx has bound its port
        if proc.poll() is not None:  # it said why on stderr (port in use, bad address...)
            print(f"error: nginx did not start (exit {proc.returncode}); see its message above", file=sys.stderr)
            raise SystemExit(2)
        time.sleep(0.05)
    # nginx is the one proxy hop: the app takes the client's address from the X-Forwarded-For it sets
    os.environ.setdefault("GPT2I_TRUST_PROXY", "1")
    server.nginx = proc  # on the arbiter: a reload re-reads this file but keeps the arbiter
    server.log.info("nginx listening at %s in front of gunicorn (pid %s)", NGINX_LISTEN, proc.pid)


def on_exit(server):
    """Stop the engine and nginx with gunicorn: the workers have gone, and nginx's own in-flight requests are
    done by now."""
    server.stopping = True  # _keep_engine replaces none
    for engine in getattr(server, "engines", {}).values():
        engine.terminate()
    shutil.rmtree(getattr(server, "engine_dir", ""), ignore_errors=True)
    proc = getattr(server, "nginx", None)
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGQUIT)  # graceful: stop listening, finish what is in flight
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
