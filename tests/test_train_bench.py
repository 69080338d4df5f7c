"""bench/train_throughput.py runs the real Trainer step and reports a JSON summary (no timing asserted)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_throughput_bench_smoke_on_cpu():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_throughput.py"), "--device", "cpu", "--n-layer", "1",
           "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--vocab-size", "256", "--batch-sizes", "2,4",
           "--steps", "1", "--warmup", "1", "--compile", "off"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["data"] == "random tokens" and summary["tokens_per_step"] == 64
    assert [(r["batch_size"], r["grad_accum"]) for r in summary["results"]] == [(2, 2), (4, 1)]
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is None for r in summary["results"])  # CPU: no MFU
    assert summary["best"]["batch_size"] in (2, 4)
