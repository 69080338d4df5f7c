"""The image's files (the Dockerfile's COPY lines into /app) are enough to start the server: a copy of
just those files imports serve and gunicorn.conf and answers inference.py --help."""

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copied_paths():
    paths = []
    with open(os.path.join(ROOT, "Dockerfile"), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if words and words[0] == "COPY":
            paths += words[1:-1]
    return paths


def test_the_image_holds_every_module_the_server_imports(tmp_path):
    paths = copied_paths()
    assert "requirements.txt" in paths and "serve.py" in paths
    for p in paths:
        src, dst = os.path.join(ROOT, p), tmp_path / p.rstrip("/")
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    code = "import runpy, serve; runpy.run_path('gunicorn.conf.py'); serve.create_app"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in (["-c", code], ["inference.py", "--help"]):
        proc = subprocess.run([sys.executable, "-B", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not re.search(r"Traceback", proc.stderr)
